"""`export --adapter toast`: a toast-tune checkpoint becomes one validated graph; MACs are recorded."""
from __future__ import annotations

import numpy as np
import torch

from fsdeploy.runtime import open_graph
from fsdeploy.pipeline.export import export_bundle
from fsdeploy.modules.toast_checkpoint import load_toast
from fsdeploy.train.toast import tune_toast
from tests.helpers import glyph_folder, make_checkpoint


def test_toast_checkpoint_exports_and_matches_pytorch(tmp_path) -> None:
    name = "vit_tiny_patch16_224"
    backbone = make_checkpoint(name, tmp_path / "vit.safetensors", img_size=32)
    data = glyph_folder(tmp_path / "data", classes="ABC", per_class=3, size=32)
    ckpt = tmp_path / "toast.safetensors"
    tune_toast(name, data, checkpoint=backbone, img_size=32, epochs=1, warmup_epochs=0, batch_size=9, max_steps=2, lite_rank=2, out=ckpt)
    bundle, report = export_bundle(
        name, tmp_path / "b", adapter="toast", checkpoint=ckpt, options={"backbone_checkpoint": str(backbone)}
    )
    assert report is not None and report.passed
    extra = bundle.manifest.extra
    assert extra["inference_macs"] > 2 * extra["plain_vit_macs"]
    ref = load_toast(name, ckpt, backbone_checkpoint=backbone, img_size=32)
    x = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        want = ref(torch.from_numpy(x)).numpy()
    assert np.abs(want).mean() > 1e-2
    for backend in ("ort", "torch"):
        with open_graph(bundle, "features", backend) as eng:
            got = eng.run({"images": x})["features"]
        assert np.abs(got - want).max() <= 1e-4, backend
