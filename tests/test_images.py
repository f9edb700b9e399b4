"""Preprocessing equals timm's eval transform; every PIL mode becomes RGB; bad files are named."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from timm.data import create_transform, resolve_data_config

from fsdeploy.backbones import create_backbone
from fsdeploy.data.images import load_checked, load_image, preprocess_image, to_rgb
from fsdeploy.errors import InvalidInput


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0", "vit_tiny_patch16_224"])
@pytest.mark.parametrize("size", [(300, 411), (411, 300), (224, 224), (320, 320), (257, 999), (750, 1000), (97, 131)])
def test_preprocess_matches_timm_eval_transform(name: str, size: tuple[int, int]) -> None:
    model, pre = create_backbone(name)
    timm_tf = create_transform(**resolve_data_config({}, model=model))
    rng = np.random.default_rng(1)
    img = Image.fromarray((rng.random((*size, 3)) * 255).astype(np.uint8))
    ours = preprocess_image(img, pre)
    ref = timm_tf(img).numpy()
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, atol=1e-5)


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "I;16", "CMYK", "1"])
def test_modes_convert_to_rgb(mode: str) -> None:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray((rng.random((8, 8, 3)) * 255).astype(np.uint8))
    if mode == "I;16":
        src = Image.fromarray((rng.random((8, 8)) * 65535).astype(np.uint16))
        assert src.mode.startswith("I;16")
        out = to_rgb(src)
        expect = np.clip(np.asarray(src, np.float64) / 65535 * 255 + 0.5, 0, 255).astype(np.uint8)
        np.testing.assert_array_equal(np.asarray(out)[..., 0], expect)
    else:
        out = to_rgb(rgb.convert(mode))
    assert out.mode == "RGB" and out.size == (8, 8)


def test_rgba_transparent_pixels_become_white() -> None:
    img = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    assert np.asarray(to_rgb(img)).min() == 255


def test_corrupt_truncated_and_non_images_are_all_named(tmp_path) -> None:
    good = tmp_path / "good.png"
    Image.new("RGB", (16, 16), (1, 2, 3)).save(good)
    trunc = tmp_path / "trunc.png"
    trunc.write_bytes(good.read_bytes()[:40])
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(InvalidInput, match="cannot decode image .*trunc.png"):
        load_image(trunc)
    _, pre = create_backbone("resnet18", img_size=32)
    with pytest.raises(InvalidInput, match=r"2 unreadable image file\(s\): .*trunc.png.*notes.png"):
        load_checked([good, trunc, text], pre)
    with pytest.raises(InvalidInput, match=r"2 unreadable image file\(s\): .*trunc.png.*notes.png"):
        load_checked([good, trunc, text], pre, workers=2)


def test_threaded_loading_gives_the_same_batch_in_order(tmp_path) -> None:
    rng = np.random.default_rng(4)
    paths = []
    for i, size in enumerate([(40, 30), (30, 40), (33, 33), (64, 48), (17, 50)]):
        p = tmp_path / f"img{i}.jpg"
        Image.fromarray((rng.random((*size, 3)) * 255).astype(np.uint8)).save(p)
        paths.append(p)
    _, pre = create_backbone("resnet18", img_size=32)
    one = load_checked(paths, pre)
    assert one.shape == (5, 3, 32, 32)
    np.testing.assert_array_equal(load_checked(paths, pre, workers=3), one)
    np.testing.assert_array_equal(one[3], preprocess_image(load_image(paths[3]), pre))
