"""The CLI end to end through Typer's runner: export -> adapt -> predict, and every bad input."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from fsdeploy.cli import app
from tests.helpers import glyph_folder, make_checkpoint

runner = CliRunner()


def invoke(*args: str):
    """Run the CLI the way the console script does (errors -> one line, exit 1)."""
    from fsdeploy import cli

    result = runner.invoke(app, list(args), standalone_mode=False, catch_exceptions=True)
    code = result.exit_code
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        if isinstance(result.exception, cli.FsdeployError):
            return 1, str(result.exception)
        raise result.exception
    return code, result.output


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    ckpt = make_checkpoint("resnet18", tmp / "w.safetensors", img_size=32)
    code, out = invoke("export", "resnet18", "--checkpoint", str(ckpt), "--out", str(tmp / "bundle"))
    assert code == 0, out
    assert "✓" in out and "✗" not in out
    glyph_folder(tmp / "support", classes="ABC", per_class=4, seed=0)
    glyph_folder(tmp / "query", classes="ABC", per_class=2, seed=1)
    return tmp


ROUND_TRIPS = [
    ("linear", ()), ("ncc", ()), ("ncc", ("--transform", "cl2n-support")), ("linear-newton", ()), ("baseline", ()),
    ("baseline++", ()), ("lt-ncc", ("--transform", "l2")), ("linear", ("--head-opt", "optimizer=rollback", "--head-opt", "iters=50")),
]


@pytest.mark.parametrize(("head", "extra"), ROUND_TRIPS)
def test_round_trip(workspace, head, extra) -> None:
    """Every head (and the transforms / head options) through adapt -> predict."""
    task = workspace / f"task_{head}.npz"
    code, out = invoke("adapt", str(workspace / "bundle"), str(workspace / "support"), "--head", head, *extra, "--out", str(task))
    assert code == 0, out
    assert task.is_file() and "3 classes" in out
    code, out = invoke("predict", str(workspace / "bundle"), str(task), str(workspace / "query"), "--topk", "2", "--json")
    assert code == 0, out
    rows = [json.loads(line) for line in out.strip().splitlines()]
    assert len(rows) == 6
    for r in rows:
        assert len(r["labels"]) == 2 and set(r["labels"]) <= {"A", "B", "C"}
        assert r["probs"][0] >= r["probs"][1] and 0 < sum(r["probs"]) <= 1 + 1e-6


def test_predict_equals_library_path(workspace) -> None:
    """The CLI's probabilities equal engine features + the stored head computed directly."""
    from fsdeploy.data.folders import list_images
    from fsdeploy.data.images import load_checked
    from fsdeploy.runtime import open_graph
    from fsdeploy.bundle import load_bundle
    from fsdeploy.heads.pipeline import TaskModel
    from fsdeploy.runtime import TaskArtefact

    task = workspace / "task_ncc_direct.npz"
    assert invoke("adapt", str(workspace / "bundle"), str(workspace / "support"), "--head", "ncc", "--out", str(task))[0] == 0
    code, out = invoke("predict", str(workspace / "bundle"), str(task), str(workspace / "query"), "--json")
    cli_probs = [json.loads(line)["probs"][0] for line in out.strip().splitlines()]
    b = load_bundle(workspace / "bundle")
    t = TaskArtefact.load(task)
    paths = list_images([workspace / "query"])
    with open_graph(b, "features", "ort") as eng:
        feats = eng.run({"images": load_checked(paths, b.manifest.preprocess)})["features"]
    probs = TaskModel.from_state(t.model_state).predict_proba(feats)
    np.testing.assert_allclose(cli_probs, probs.max(axis=1), rtol=1e-5)


def test_pth_checkpoint_and_info(workspace, tmp_path) -> None:
    from safetensors.torch import load_file

    pth = tmp_path / "w.pth"
    torch.save(load_file(str(workspace / "w.safetensors")), pth)
    code, out = invoke("export", "resnet18", "--checkpoint", str(pth), "--img-size", "32", "--out", str(tmp_path / "b"))
    assert code == 0, out
    code, out = invoke("info", str(tmp_path / "b"))
    assert code == 0 and "features.onnx" in out and "resnet18" in out


def _assert_fails(args, pattern, *absent) -> None:
    code, out = invoke(*args)
    assert code != 0, out
    assert pattern in out, out
    assert "\n" not in out.strip(), "errors are one line"
    for p in absent:
        assert not p.exists(), f"partial file {p} left behind"


def test_bad_inputs(workspace, tmp_path) -> None:
    bundle = str(workspace / "bundle")
    out_task = tmp_path / "t.npz"
    _assert_fails(("adapt", bundle, str(tmp_path / "nope"), "--out", str(out_task)), "is not a folder", out_task)
    (tmp_path / "empty").mkdir()
    _assert_fails(("adapt", bundle, str(tmp_path / "empty"), "--out", str(out_task)), "no class sub-folders", out_task)
    one = glyph_folder(tmp_path / "one", classes="A")
    _assert_fails(("adapt", bundle, str(one), "--out", str(out_task)), "needs at least 2 classes", out_task)
    hole = glyph_folder(tmp_path / "hole", classes="AB")
    (hole / "C").mkdir()
    _assert_fails(("adapt", bundle, str(hole), "--out", str(out_task)), "with no images", out_task)
    bad = glyph_folder(tmp_path / "bad", classes="AB")
    (bad / "A" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    Image.new("RGB", (40, 40)).save(bad / "B" / "cut.jpg")
    data = (bad / "B" / "cut.jpg").read_bytes()
    (bad / "B" / "cut.jpg").write_bytes(data[: len(data) // 2])
    _assert_fails(("adapt", bundle, str(bad), "--out", str(out_task)), "broken.png", out_task)
    (bad / "A" / "broken.png").unlink()
    _assert_fails(("adapt", bundle, str(bad), "--out", str(out_task)), "cut.jpg", out_task)
    (bad / "B" / "cut.jpg").unlink()
    (bad / "B" / "labels.csv").write_text("a,b")
    _assert_fails(("adapt", bundle, str(bad), "--out", str(out_task)), "non-image files", out_task)

    out_bundle = tmp_path / "nb"
    _assert_fails(("export", "resnet_nope", "--out", str(out_bundle)), "unknown timm model", out_bundle)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    _assert_fails(("export", "resnet18", "--checkpoint", str(junk), "--out", str(out_bundle)), "cannot read checkpoint", out_bundle)


def test_task_from_another_bundle_is_refused(workspace, tmp_path) -> None:
    ckpt = make_checkpoint("resnet18", tmp_path / "w2.safetensors", img_size=32, seed=5)
    assert invoke("export", "resnet18", "--checkpoint", str(ckpt), "--out", str(tmp_path / "other"))[0] == 0
    task = workspace / "task_ncc.npz"
    if not task.exists():
        assert invoke("adapt", str(workspace / "bundle"), str(workspace / "support"), "--head", "ncc", "--out", str(task))[0] == 0
    _assert_fails(("predict", str(tmp_path / "other"), str(task), str(workspace / "query")), "re-run `fsdeploy adapt` with this bundle")
    shutil.copy(task, tmp_path / "corrupt.npz")
    (tmp_path / "corrupt.npz").write_bytes(b"nope")
    _assert_fails(("predict", str(workspace / "bundle"), str(tmp_path / "corrupt.npz"), str(workspace / "query")), "not a readable task artefact")


@pytest.mark.parametrize("adapter", ["tsa", "bn-affine"])
def test_finetuned_round_trip(workspace, tmp_path, adapter) -> None:
    """adapt --adapter folds per-task weights into a re-exported graph; predict runs that graph."""
    from fsdeploy.runtime import TaskArtefact

    task = tmp_path / f"{adapter}.npz"
    code, out = invoke("adapt", str(workspace / "bundle"), str(workspace / "support"), "--adapter", adapter, "--steps", "8", "--out", str(task))
    assert code == 0, out
    t = TaskArtefact.load(task)
    assert t.info["adapt_macs"] > 0 and t.info["fold_max_abs"] <= 1e-4
    # one per-task weight format: the folded graph and the weights it was folded from, in the task itself
    assert "graph" in t.task_state and any(k.startswith(("delta/", "set/")) for k in t.task_state)
    assert sorted(p.name for p in tmp_path.iterdir()) == [task.name]  # no side file
    code, out = invoke("predict", str(workspace / "bundle"), str(task), str(workspace / "support"), "--json")
    assert code == 0, out
    rows = [json.loads(line) for line in out.strip().splitlines()]
    truth = [r["image"].split("/")[-2] for r in rows]
    # fitted on these very images with a cosine NCC: the support set must be classified well
    assert np.mean([r["labels"][0] == y for r, y in zip(rows, truth)]) >= 0.75


def test_case_bundle_chunked_adapt_equals_one_batch(workspace, tmp_path) -> None:
    """adapt on a CaSE bundle with engine batches smaller than the support set gives the one-batch γ."""
    from fsdeploy.runtime import TaskArtefact

    ckpt = workspace / "w.safetensors"
    assert invoke("export", "resnet18", "--adapter", "case", "--checkpoint", str(ckpt), "--out", str(tmp_path / "cb"))[0] == 0
    tasks = {}
    for batch in ("32", "5"):
        out = tmp_path / f"t{batch}.npz"
        code, msg = invoke("adapt", str(tmp_path / "cb"), str(workspace / "support"), "--head", "ncc", "--batch", batch, "--out", str(out))
        assert code == 0, msg
        tasks[batch] = TaskArtefact.load(out)
    g1, g2 = tasks["32"].task_state["gamma"], tasks["5"].task_state["gamma"]
    assert g1.shape == g2.shape and g1.size > 0
    np.testing.assert_allclose(g1, g2, atol=1e-5)
    code, out = invoke("predict", str(tmp_path / "cb"), str(tmp_path / "t5.npz"), str(workspace / "query"), "--json")
    assert code == 0 and len(out.strip().splitlines()) == 6
