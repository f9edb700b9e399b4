"""Issue #20, CLI conventions: one spelling per idea (old spellings hidden and noted), --device, --calib, --backend
for TensorRT, machine-readable bench output, 80-column tables and the Python API."""
from __future__ import annotations

import json
import re

import pytest
import typer
from typer.testing import CliRunner

from fsdeploy.cli import app

runner = CliRunner()

# (command path, old spelling, new spelling, the parameter it sets, a value, what the parameter then holds)
RENAMES = [
    (("build",), "--batch", "--profile", "batch", "1:2:4", "1:2:4"),
    (("compare",), "--n", "--batch", "batch", "4", 4),
    (("bench", "latency"), "--batch", "--batches", "batch", "1,2", "1,2"),
    (("bench", "accuracy"), "--heads", "--methods", "methods", "ncc", "ncc"),
    (("pretrain",), "--batch-size", "--batch", "batch_size", "8", 8),
    (("distill",), "--batch-size", "--batch", "batch_size", "8", 8),
    (("data", "glyphs"), "--size", "--img-size", "size", "24", 24),
]
REQUIRED = {  # arguments/options each command needs to parse at all
    "build": ["b"], "compare": ["b"], "latency": ["b"], "accuracy": ["b", "--data", "d"],
    "pretrain": ["m", "--data", "d", "--out", "o"], "distill": ["--teacher", "t", "--student", "s", "--data", "d", "--out", "o"],
    "glyphs": ["--out", "o"],
}


def command(path: tuple[str, ...]):
    cmd = typer.main.get_command(app)
    for name in path:
        cmd = cmd.commands[name]
    return cmd


def parse(path: tuple[str, ...], args: list[str]) -> dict:
    """Parse `args` for the command at `path` without running it: the parameters it would get."""
    cmd = command(path)
    return cmd.make_context(path[-1], [*REQUIRED[path[-1]], *args]).params


@pytest.mark.parametrize(("path", "old", "new", "param", "value", "parsed"), RENAMES, ids=[" ".join(r[0]) + r[1] for r in RENAMES])
def test_renamed_option_new_spelling_old_alias_hidden(path, old, new, param, value, parsed, capsys) -> None:
    """The new spelling sets the parameter; the old one still does, with one note on stderr; --help shows only the new."""
    assert parse(path, [new, value])[param] == parsed
    assert "note:" not in capsys.readouterr().err
    assert parse(path, [old, value])[param] == parsed
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and old in err and new in err
    assert parse(path, [f"{old}={value}"])[param] == parsed  # --old=value too
    capsys.readouterr()
    result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "200"})
    names = set(re.findall(r"(?<![\w-])--[a-z][\w-]*", result.output))
    assert new in names and old not in names


def test_rewrite_stops_at_double_dash() -> None:
    from fsdeploy.commands.aliases import rewrite

    assert rewrite(["--batch", "1", "--", "--batch"], {"--batch": "--profile"}) == ["--profile", "1", "--", "--batch"]


def test_calib_is_an_option_and_the_positional_is_a_noted_alias(tiny_workspace, capsys) -> None:
    """quantize and tune take --calib DIR; the former positional parses into the hidden alias and is noted."""
    from fsdeploy.commands.aliases import calib_folder
    from fsdeploy.errors import InvalidInput

    for name in ("quantize", "tune"):
        params = command((name,)).make_context(name, ["b", "--calib", "imgs"]).params
        assert str(params["calib"]) == "imgs" and params["calib_dir"] is None
        params = command((name,)).make_context(name, ["b", "imgs"]).params
        assert str(params["calib_dir"]) == "imgs" and params["calib"] is None
    assert calib_folder("new", None, "quantize") == "new"
    assert "note:" not in capsys.readouterr().err
    assert calib_folder(None, "old", "quantize") == "old"
    assert "--calib" in capsys.readouterr().err
    with pytest.raises(InvalidInput, match="--calib"):
        calib_folder(None, None, "tune")
    with pytest.raises(InvalidInput, match="once"):
        calib_folder("a", "b", "tune")
    result = runner.invoke(app, ["quantize", str(tiny_workspace.path)])
    assert result.exit_code != 0 and "--calib" in str(result.exception)


# ------------------------------------------------------------------------------------------------ --device


def test_device_names_map_to_each_backend() -> None:
    from fsdeploy.engines.devices import openvino_device, ort_providers, parse_device
    from fsdeploy.errors import InvalidInput

    assert parse_device("cuda:1") == ("cuda", 1) and parse_device("CPU") == ("cpu", None)
    assert ort_providers("cuda:1") == (("CUDAExecutionProvider", "CPUExecutionProvider"), 1)
    assert ort_providers("cpu") == (("CPUExecutionProvider",), 0) and ort_providers(None) == (None, 0)
    assert openvino_device("gpu:1") == "GPU.1" and openvino_device("gpu") == "GPU" and openvino_device("cpu") == "CPU"
    for bad in ("tpu", "cuda:x", "cpu:0", ""):
        with pytest.raises(InvalidInput, match="--device"):
            parse_device(bad)
    with pytest.raises(InvalidInput, match="openvino"):
        openvino_device("cuda")


def test_ort_engine_opens_on_the_device_asked(tiny_workspace) -> None:
    from fsdeploy.engines import EngineOptions
    from fsdeploy.runtime import open_graph

    with open_graph(tiny_workspace.bundle, "features", "ort", EngineOptions(device="cpu")) as engine:
        assert "CPUExecutionProvider" in engine.name


def cli(*args: str) -> tuple[int, str, str]:
    """Run the console entry point in-process: (exit code, stdout, stderr)."""
    from fsdeploy import cli as cli_mod

    result = runner.invoke(app, list(args), standalone_mode=False, catch_exceptions=True)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        if isinstance(result.exception, cli_mod.FsdeployError):
            return 1, result.stdout, str(result.exception)
        raise result.exception
    return result.exit_code or 0, result.stdout, result.stderr


def test_predict_and_adapt_take_device_batch_threads(tiny_workspace, tmp_path) -> None:
    """--device cpu gives the same predictions as the default; --batch/--threads are accepted by predict."""
    w = tiny_workspace
    code, plain, _ = cli("predict", str(w.path), str(w.task), str(w.query), "--json", "--topk", "2")
    assert code == 0
    code, on_cpu, _ = cli("predict", str(w.path), str(w.task), str(w.query), "--json", "--topk", "2", "--device", "cpu",
                          "--batch", "2", "--threads", "1")
    assert code == 0
    a, b = ([json.loads(x) for x in out.splitlines()] for out in (plain, on_cpu))
    assert [r["labels"] for r in a] == [r["labels"] for r in b] and len(a) == 6
    assert max(abs(p - q) for r, s in zip(a, b) for p, q in zip(r["probs"], s["probs"])) < 1e-3  # batch 2 vs 32: float sums reorder
    code, _, _ = cli("adapt", str(w.path), str(w.support), "--head", "ncc", "--device", "cpu", "--out", str(tmp_path / "t.npz"))
    assert code == 0 and (tmp_path / "t.npz").is_file()


@pytest.mark.parametrize(("args", "needle"), [
    (("--device", "tpu"), "is not a device"),
    (("--backend", "trt", "--device", "cpu"), "runs on --device cuda"),
    (("--backend", "openvino", "--device", "cuda"), "runs on --device cpu or gpu"),
])
def test_bad_device_is_one_line(tiny_workspace, args, needle) -> None:
    w = tiny_workspace
    code, out, err = cli("predict", str(w.path), str(w.task), str(w.query), *args)
    assert code == 1 and needle in err and "\n" not in err.strip() and out == ""


def test_device_cuda_without_cuda_provider_is_refused(tiny_workspace) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    w = tiny_workspace
    code, _, err = cli("predict", str(w.path), str(w.task), str(w.query), "--device", "cuda")
    assert code == 1 and "onnxruntime-gpu" in err


# ------------------------------------------------------------------------------------------------ TensorRT flavour


def test_build_backend_flag_chooses_the_tensorrt_flavour(monkeypatch, tiny_workspace) -> None:
    """--backend tensorrt-rtx binds the process to TensorRT-RTX (the env var is only the fallback); a bad name is one line."""
    from fsdeploy.commands.tensorrt import choose_trt
    from fsdeploy.engines.trt_backend import ENV_CHOICE, _choose

    monkeypatch.setenv(ENV_CHOICE, "tensorrt")
    choose_trt("tensorrt-rtx")
    assert _choose(None) == "tensorrt_rtx"
    choose_trt("auto")
    assert _choose(None) == "tensorrt_rtx"  # auto leaves the choice as it is
    code, _, err = cli("build", str(tiny_workspace.path), "--backend", "cuda")
    assert code == 1 and "--backend 'cuda' is not a TensorRT" in err
