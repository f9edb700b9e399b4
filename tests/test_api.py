"""The Python API (`fsdeploy.export`, `fsdeploy.adapt`, `fsdeploy.predict`) end to end on a tiny 32 px bundle,
checked against nearest-centroid decisions computed here from the bundle's engine features."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import fsdeploy
from tests.helpers import glyph_folder, make_checkpoint


def test_import_fsdeploy_stays_light() -> None:
    out = subprocess.run([sys.executable, "-c", "import sys, fsdeploy; print(sorted(m for m in ('torch', 'onnxruntime', "
                          "'timm', 'typer') if m in sys.modules))"], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    assert {"export", "adapt", "predict"} <= set(dir(fsdeploy))
    with pytest.raises(AttributeError):
        fsdeploy.no_such_function  # noqa: B018


def test_export_adapt_predict_end_to_end(tmp_path) -> None:
    from fsdeploy.data.folders import scan_image_folder
    from fsdeploy.data.images import load_checked
    from fsdeploy.errors import InvalidInput
    from fsdeploy.runtime import TaskArtefact, open_graph

    ckpt = make_checkpoint("resnet18", tmp_path / "w.safetensors", img_size=32)
    support = glyph_folder(tmp_path / "support", classes="ABC", per_class=4, seed=0)
    query = glyph_folder(tmp_path / "query", classes="ABC", per_class=3, seed=1)

    bundle = fsdeploy.export("resnet18", tmp_path / "bundle", checkpoint=ckpt)
    assert bundle.manifest.validation["checks"] and bundle.manifest.preprocess.input_size[-1] == 32
    task = fsdeploy.adapt(bundle, support, tmp_path / "task.npz", head="ncc")
    assert (tmp_path / "task.npz").is_file() and list(task.classes) == ["A", "B", "C"]
    preds = fsdeploy.predict(tmp_path / "bundle", tmp_path / "task.npz", query, topk=3, device="cpu")
    assert len(preds) == 9 and all(len(p.labels) == 3 and abs(sum(p.probs) - 1) < 1e-4 for p in preds)

    # reference: class means of the engine's support features, nearest by squared Euclidean distance
    pre = bundle.manifest.preprocess
    s, q = scan_image_folder(support), scan_image_folder(query)
    with open_graph(bundle, "features", "ort") as engine:
        fs = engine.run({"images": load_checked(s.paths, pre)})["features"]
        fq = engine.run({"images": load_checked([p.image for p in preds], pre)})["features"]
    means = np.stack([fs[np.asarray(s.labels) == k].mean(0) for k in range(len(s.classes))])
    nearest = ((fq[:, None, :] - means[None]) ** 2).sum(-1).argmin(1)
    assert [p.labels[0] for p in preds] == [s.classes[k] for k in nearest]
    assert len(q.paths) == 9

    # the same task object and an in-memory adapt agree with the files; simpleshot needs a base mean
    again = fsdeploy.predict(bundle, TaskArtefact.load(tmp_path / "task.npz"), [str(p) for p in q.paths], topk=1)
    assert [p.labels[0] for p in again] == [p.labels[0] for p in preds]
    mem = fsdeploy.adapt(tmp_path / "bundle", support, head="linear-newton")
    assert mem.info["head"] == "linear-newton"
    with pytest.raises(InvalidInput, match="topk"):
        fsdeploy.predict(bundle, task, query, topk=4)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(InvalidInput):
        fsdeploy.export("resnet18", mine, checkpoint=ckpt)
    assert (mine / "notes.txt").read_text() == "keep"
    with pytest.raises(InvalidInput, match="head"):
        fsdeploy.adapt(bundle, support, head="svm")
