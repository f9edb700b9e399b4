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


@pytest.mark.parametrize("name", ["efficientnet_b0", "resnet18", "vit_tiny_patch16_224"])
def test_resizing_only_the_crop_gives_timms_bytes_on_many_sizes(name: str, monkeypatch) -> None:
    """Where `exact_span` allows it the crop alone is resized (a quarter less work); on 120 random sizes (square,
    portrait, landscape, up- and down-scaling) every result still equals timm's resize-then-crop to the byte
    level. efficientnet_b0's crop_pct 0.875 resizes the shorter side to 256 px, so the crop-only path is taken
    for many of them; resnet18's 0.95 (235 px) and the ViT's 0.9 (248 px) rarely allow it."""
    from fsdeploy.data import images

    model, pre = create_backbone(name)
    timm_tf = create_transform(**resolve_data_config({}, model=model))
    boxes: list[bool] = []
    real = Image.Image.resize

    def spy(self, size, resample=None, box=None, reducing_gap=None):
        if box is not None:  # ours (timm's torchvision resize passes none)
            boxes.append(tuple(box) != (0, 0, *self.size))
        return real(self, size, resample, box, reducing_gap)

    monkeypatch.setattr(Image.Image, "resize", spy)
    rng = np.random.default_rng(7)
    for _ in range(120):
        w = int(rng.integers(16, 800))
        h = w if rng.random() < 0.4 else int(rng.integers(16, 800))
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        ours = images.preprocess_image(img, pre)
        ref = timm_tf(img).numpy()
        np.testing.assert_allclose(ours, ref, atol=1e-5, err_msg=f"{w}x{h}")  # one pixel level is 0.017 here
    assert len(boxes) == 120
    if name == "efficientnet_b0":
        assert 0.2 < np.mean(boxes) < 1.0  # both paths ran


def test_exact_span_refuses_what_pil_would_round_differently() -> None:
    from fsdeploy.data.images import exact_span

    assert exact_span(320, 256, 16, 224) == (20.0, 300.0)  # 320 / 256 = 1.25: centres exact
    assert exact_span(357, 341, 58, 224) is None  # 357 / 341 has no exact double
    assert exact_span(2**40 + 1, 256, 16, 224) is None  # centres would need more than a double's bits


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
    # into a caller's buffer (a warm session's): its first rows, the same values, nothing past them touched
    buf = np.full((7, 3, 32, 32), -7.0, np.float32)
    got = load_checked(paths, pre, workers=2, out=buf)
    assert got.base is buf and got.shape == one.shape
    np.testing.assert_array_equal(got, one)
    assert (buf[5:] == -7.0).all()
    with pytest.raises(ValueError, match=r"5 images need \(5, 3, 32, 32\) float32"):
        load_checked(paths, pre, out=buf[:4])
