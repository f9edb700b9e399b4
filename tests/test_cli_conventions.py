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
    for name in ("quantize", "tune"):
        usage = runner.invoke(app, [name, "--help"], env={"COLUMNS": "200"}).output
        assert "--calib" in usage and "calib_dir" not in usage.lower()  # the old positional is hidden, usage line too


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


# ------------------------------------------------------------------------------------------------ output


def strict_json(text: str):
    """json.loads that refuses NaN/Infinity (what jq and JavaScript refuse)."""
    def bad(name: str):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=bad)


def test_bench_macs_json_csv_and_80_columns(tiny_workspace, monkeypatch) -> None:
    """--json: only strict JSON on stdout, the rows --out writes; not a terminal: CSV tables; rich tables fit 80 columns."""
    import csv

    from fsdeploy.bench.render import read_rows

    w = tiny_workspace
    out = w.tmp / "macs.json"
    code, stdout, _ = cli("bench", "macs", str(w.path), "--shots", "1,5", "--json", "--out", str(out))
    assert code == 0
    rows = strict_json(stdout)
    assert {r["setting"] for r in rows} == {"5-way 1-shot", "5-way 5-shot"}
    assert [r["method"] for r in rows] == [r["method"] for r in read_rows(out)]
    one = [r for r in rows if r["setting"] == "5-way 1-shot"]
    five = [r for r in rows if r["setting"] == "5-way 5-shot"]
    ncc1, ncc5 = (next(r for r in t if r["method"] == "ncc") for t in (one, five))
    assert ncc5["adapt_macs"] == pytest.approx(5 * ncc1["adapt_macs"], rel=0.01)  # one forward per support image
    code, stdout, _ = cli("bench", "macs", str(w.path), "--shots", "1,5")
    lines = stdout.splitlines()
    assert lines[0].startswith("# MACs to adapt one task")
    table = list(csv.reader([ln for ln in lines if not ln.startswith(("#", "not costed")) and ln.strip()]))
    header, body = table[0], table[1:]
    assert header[:2] == ["method", "setting"] and len(body) == len(rows) and all(len(r) == len(header) for r in body)
    monkeypatch.setenv("FSDEPLOY_TABLES", "rich")
    code, stdout, _ = cli("bench", "macs", str(w.path))
    assert code == 0 and "┃" in stdout and max(len(line) for line in stdout.splitlines()) <= 80


def test_bench_latency_json_and_which_is_faster(tiny_workspace, monkeypatch) -> None:
    """The ratio reads the right way round: '<a> is N.Nx faster than <b>' with N from the medians (>= 1)."""
    w = tiny_workspace
    args = ("bench", "latency", str(w.path), "--compare", "ort,torch", "--batches", "1", "--iters", "2", "--warmup", "1",
            "--rounds", "1", "--threads", "1", "--methods", "")
    code, stdout, stderr = cli(*args, "--json")
    assert code == 0 and "timing" in stderr
    rows = strict_json(stdout)
    (median,) = [r for r in rows if r.get("stat") == "median_ms"]
    assert median["ort_faster"] == pytest.approx(median["torch"] / median["ort"])
    assert median["speedup"] == pytest.approx(median["ort"] / median["torch"])
    code, stdout, _ = cli(*args)
    (line,) = [ln for ln in stdout.splitlines() if ln.startswith("batch 1:")]
    fast, ratio, slow = re.match(r"batch 1: (\w+) is ([\d.]+)x faster than (\w+)", line).groups()
    assert {fast, slow} == {"ort", "torch"} and float(ratio) >= 1.0
    # the run above is a fresh measurement: check the sentence against its own table
    table = {ln.split(",")[1]: ln.split(",") for ln in stdout.splitlines() if ln.startswith("1,")}
    med = {"ort": float(table["median_ms"][2]), "torch": float(table["median_ms"][3])}
    assert fast == min(med, key=med.get)
    assert float(ratio) == pytest.approx(max(med.values()) / min(med.values()), rel=0.06)
    monkeypatch.setenv("FSDEPLOY_TABLES", "rich")
    code, stdout, _ = cli(*args)
    assert code == 0 and max(len(line) for line in stdout.splitlines()) <= 80


def test_bench_accuracy_json_and_plain_progress(tiny_workspace, monkeypatch) -> None:
    from tests.helpers import glyph_folder

    w = tiny_workspace
    data = glyph_folder(w.tmp / "acc-glyphs", classes="ABCDE", per_class=5, seed=4)
    code, stdout, stderr = cli("bench", "accuracy", str(w.path), "--data", str(data), "--ways", "3", "--shots", "1,2",
                               "--queries", "2", "--episodes", "3", "--methods", "ncc", "--json")
    assert code == 0
    rows = strict_json(stdout)
    assert [(r["shots"], r["episodes"]) for r in rows] == [(1, 3), (2, 3)]
    assert "3-way 2-shot: 3/3" in stderr  # non-TTY progress: plain lines on stderr, the last count always shown
    monkeypatch.setenv("FSDEPLOY_TABLES", "rich")
    code, stdout, _ = cli("bench", "accuracy", str(w.path), "--data", str(data), "--ways", "3", "--shots", "1,2",
                          "--queries", "2", "--episodes", "3", "--methods", "ncc")
    assert code == 0 and "┃" in stdout and max(len(line) for line in stdout.splitlines()) <= 80


def test_step_reports_become_throttled_progress_lines(capsys) -> None:
    from fsdeploy.commands import progress as progress_mod
    from fsdeploy.commands.output import out_console
    from fsdeploy.steps import step

    step("nobody listens", 1, 2)  # no reporter: nothing happens
    with progress_mod.progress_steps(out_console(), "fitting"):
        for i in range(1, 41):
            step("fitting on the support set", i, 40, f"loss {1 / i:.3f}")
    err = capsys.readouterr().err.splitlines()
    assert "fitting on the support set: step 1/40, loss 1.000" in err[1]
    assert err[-1].endswith("step 40/40, loss 0.025") and len(err) < 10


def test_durations_read_as_people_read_them() -> None:
    from fsdeploy.commands.core import _duration

    assert [_duration(ms) for ms in (412, 5_300, 59_990, 334_297, 119_700)] == ["412 ms", "5.3 s", "1 min 0 s", "5 min 34 s", "2 min 0 s"]


def test_adapt_tsa_shows_fit_steps_and_names_the_fit(tiny_workspace, tmp_path) -> None:
    w = tiny_workspace
    code, stdout, stderr = cli("adapt", str(w.path), str(w.support), "--adapter", "tsa", "--steps", "2", "--out", str(tmp_path / "t.npz"))
    assert code == 0, stderr
    assert "fitting on the support set: step 2/2" in stderr
    assert "tsa fit + fold + re-export" in stdout


def test_adapt_json_is_one_object(tiny_workspace, tmp_path) -> None:
    from fsdeploy.runtime import TaskArtefact

    w = tiny_workspace
    code, stdout, _ = cli("adapt", str(w.path), str(w.support), "--head", "ncc", "--json", "--out", str(tmp_path / "t.npz"))
    assert code == 0
    row = strict_json(stdout)
    task = TaskArtefact.load(tmp_path / "t.npz")
    assert row["classes"] == list(task.classes) == ["A", "B", "C"] and row["support"] == 12 and row["head"] == "ncc"
    assert row["backend"] == "ort" and all(row[k] >= 0 for k in ("load_ms", "features_ms", "fit_ms", "write_ms"))


def test_bench_perf_json_is_the_report(monkeypatch) -> None:
    """perf --json prints exactly report.to_dict() (strict JSON: a NaN ratio becomes null); its steps go to stderr."""
    import fsdeploy.bench.perf as perf
    from fsdeploy.bench.perf import PerfReport, TargetResult

    def fake_run(cfg, say):
        say("target 5: fast head solver")
        return PerfReport(config={"targets": list(cfg.targets)}, results=[TargetResult(5, "solver", "c", "m", float("nan"), "met")],
                          tables={"t": [{"a": 1.5}]}, notes=["n"])

    monkeypatch.setattr(perf, "run_perf", fake_run)
    code, stdout, stderr = cli("bench", "perf", "--targets", "5", "--json")
    assert code == 0 and "target 5" in stderr
    data = strict_json(stdout)
    assert data["results"][0]["ratio"] is None and data["tables"] == {"t": [{"a": 1.5}]} and data["config"]["targets"] == [5]
    # nonsense counts stop at parsing with one line and exit 2 (a negative --support used to run 10 images)
    import subprocess
    import sys

    for args in (["--support", "-5"], ["--sizes", "0,100"], ["--targets", "7"]):
        run = subprocess.run([sys.executable, "-m", "fsdeploy.cli", "bench", "perf", "--workdir", "/nonexistent/perf", *args],
                             capture_output=True, text=True)
        lines = [line for line in run.stderr.splitlines() if not line.lstrip().startswith("[")]  # progress lines
        assert run.returncode != 0 and "Traceback" not in run.stderr and len(lines) == 1, (args, run.stderr)


def test_triton_export_device_cuda_is_tritons_gpu(monkeypatch, tiny_workspace, tmp_path, capsys) -> None:
    import fsdeploy.serving.repository as repository

    seen = []

    def fake_write(bundle, tasks, out, *, device, **kw):
        seen.append(device)
        raise SystemExit(0)

    monkeypatch.setattr(repository, "write_repository", fake_write)
    for device in ("cuda", "gpu", "cpu"):
        cli("triton", "export", str(tiny_workspace.path), "--out", str(tmp_path / "repo"), "--backend", "onnxruntime", "--device", device)
    assert seen == ["gpu", "gpu", "cpu"]


def test_heads_json_matches_the_heads_own_counts() -> None:
    from fsdeploy.heads import make_head

    code, stdout, _ = cli("heads", "--ways", "3", "--shots", "2", "--dim", "16", "--json")
    assert code == 0
    data = strict_json(stdout)
    rows = {r["name"]: r for r in data["heads"]}
    assert data["support"] == 6 and "ncc" in rows and data["transforms"]
    assert rows["ncc"]["fit_macs"] == make_head("ncc").fit_macs(6, 16, 3)


def test_every_commands_help_is_one_line_per_paragraph_and_fits_80_columns() -> None:
    """The docstrings are wrapped at 120 columns in the source; Typer's rich help keeps single line breaks, so
    unjoined they broke sentences mid-line at 80 columns. Examples (indented lines) keep their own lines."""
    import os
    import subprocess
    import sys

    from fsdeploy.cli import app, unwrap

    assert unwrap("One two\nthree.\n\nExamples:\n\n  fsdeploy a\n  fsdeploy b\nc") == \
        "One two three.\n\nExamples:\n\n  fsdeploy a\n  fsdeploy b c"

    def commands(group, prefix=()):
        for info in group.registered_commands:
            yield (*prefix, info.name or info.callback.__name__), info
        for sub in group.registered_groups:
            yield from commands(sub.typer_instance, (*prefix, sub.name))

    found = list(commands(app))
    assert len(found) > 20
    for path, info in found:
        for para in (info.help or "").split("\n\n"):
            lines = para.splitlines()
            assert all(line.startswith(" ") for line in lines[1:]), f"{' '.join(path)}: {para[:80]!r}"
    env = {**os.environ, "COLUMNS": "80"}
    out = subprocess.run([sys.executable, "-m", "fsdeploy.cli", "bench", "perf", "--help"], capture_output=True,
                         text=True, env=env, check=True).stdout
    assert max(len(line) for line in out.splitlines()) <= 80
    assert "batch 1 and 16" in out  # a phrase the source wraps across two lines now reads on one
