"""TSA adapters, exact folding (PyTorch and ONNX Runtime), per-task fitting, and adaptation MACs.

References are independent of the code under test: hand-written layer formulas, a fresh plain timm model
loading the folded weights, ONNX Runtime on the exported plain graph, a numpy NCC loss, and MACs summed
by hand from ResNet-18's layer shapes.
"""
from __future__ import annotations

import copy
import warnings
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from timm.layers import Conv2dSame
from torch import nn

from fsdeploy.errors import BundleError, InvalidInput, UnknownName
from fsdeploy.modules.adapters import ResidualAdapterConv, adapters_of, reset_adapters, with_adapters
from fsdeploy.modules.placement import families, placement_for
from fsdeploy.modules.fold import TaskWeights, check_foldable, fold_centre_tap, folded_state, task_weights
from fsdeploy.train.tsa import bn_affine_adapt_macs, fit_bn_affine, fit_tsa, tsa_adapt_macs

IMG = 32
# every family with a placement rule needs at least one model here (test_every_family_has_a_case)
FAMILY_CASES = {"resnet": ("resnet18", "resnet26")}  # BasicBlock, Bottleneck


def _plain(name: str, seed: int = 0) -> nn.Module:
    """A frozen random-init timm backbone whose BatchNorms are randomised (timm zero-inits the last BN
    of each block, which would hide every adapter on conv2 behind a zero scale)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = timm.create_model(name, num_classes=0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(0.5 + 0.5 * torch.rand(n, generator=gen))
                m.bias.copy_(0.1 * torch.randn(n, generator=gen))
                m.running_mean.copy_(0.1 * torch.randn(n, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(n, generator=gen))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _fresh_plain(name: str, state: dict[str, torch.Tensor]) -> nn.Module:
    model = timm.create_model(name, num_classes=0).eval()
    model.load_state_dict(state, strict=True)
    return model


def _images(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))


def _onnx_features(model: nn.Module, x: torch.Tensor, path: Path) -> np.ndarray:
    ort = pytest.importorskip("onnxruntime")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (x,), str(path), opset_version=17, dynamo=False, input_names=["images"],
            output_names=["features"], dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}},
        )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"images": x.numpy()})[0]


def _randomise_alpha(model: nn.Module, seed: int, std: float = 0.02) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in adapters_of(model).values():
            w = adapter.alpha.weight
            w.copy_(std * torch.randn(w.shape, generator=gen))


@pytest.fixture(scope="module")
def resnet18() -> nn.Module:
    return _plain("resnet18")


# ---- placement


def test_every_family_has_a_case() -> None:
    assert set(families("tsa")) <= set(FAMILY_CASES)


def test_resnet18_placement_is_every_block_3x3_conv(resnet18: nn.Module) -> None:
    names = sorted(adapters_of(with_adapters(resnet18)))
    expected = sorted(f"layer{s}.{b}.conv{c}" for s in range(1, 5) for b in range(2) for c in (1, 2))
    assert names == expected  # not the stem conv, not the 1x1 downsample
    assert not adapters_of(resnet18)  # the backbone itself is untouched


def test_refusals(resnet18: nn.Module) -> None:
    with pytest.raises(InvalidInput, match="already holds"):
        with_adapters(with_adapters(resnet18))
    with pytest.raises(UnknownName, match="no TSA adapter placement"):
        placement_for("tsa", "vision_transformer")
    with pytest.raises(InvalidInput, match="padding"):
        ResidualAdapterConv(nn.Conv2d(4, 4, 3, padding=0))
    with pytest.raises(InvalidInput, match="even kernel"):
        ResidualAdapterConv(nn.Conv2d(4, 4, 2, padding=1))
    with pytest.raises(InvalidInput, match="own forward"):
        ResidualAdapterConv(Conv2dSame(4, 4, 3, stride=2))
    adapter = ResidualAdapterConv(nn.Conv2d(4, 6, 3, stride=2, padding=1))
    adapter.alpha.stride = (1, 1)
    with pytest.raises(InvalidInput, match="stride"):
        check_foldable(adapter, "x")


# ---- identity at init


def test_zero_alpha_is_exactly_the_plain_backbone(resnet18: nn.Module) -> None:
    x = _images(2)
    model = with_adapters(resnet18)
    assert reset_adapters(model, 0.0) == 16
    with torch.no_grad():
        assert torch.equal(model(x), resnet18(x))


def test_init_alpha_adds_a_scaled_strided_identity_at_layer_level() -> None:
    conv = nn.Conv2d(64, 128, 3, stride=2, padding=1, bias=False).double()  # layer2.0.conv1's shape
    adapter = ResidualAdapterConv(conv)
    x = torch.randn(2, 64, 9, 9, dtype=torch.float64)
    expected = conv(x).detach().clone()
    expected[:, :64] += 1e-4 * x[:, :, ::2, ::2]  # rectangular identity: channels 64..127 get nothing
    torch.testing.assert_close(adapter(x), expected, rtol=0, atol=1e-12)


def test_init_alpha_perturbs_the_network_to_first_order(resnet18: nn.Module) -> None:
    x = _images(2).double()
    model = with_adapters(copy.deepcopy(resnet18).double())
    with torch.no_grad():
        reset_adapters(model, 0.0)
        f0 = model(x)
        reset_adapters(model, 1e-4)
        d1 = model(x) - f0
        reset_adapters(model, 2e-4)
        d2 = model(x) - f0
    rel = (d1.norm() / f0.norm()).item()
    assert 1e-7 < rel < 1e-2  # a tiny, nonzero change
    assert ((d2 - 2 * d1).norm() / d1.norm()).item() < 1e-3  # linear in the scale: no other change


# ---- fold exactness


@pytest.mark.parametrize(
    "cin, cout, kernel, stride, padding, dilation, groups, mode",
    [
        (4, 6, 3, 1, 1, 1, 1, "zeros"),
        (4, 6, 3, 2, 1, 1, 1, "zeros"),
        (4, 6, (3, 5), 1, (1, 2), 1, 1, "zeros"),
        (8, 12, 3, 2, 1, 1, 2, "zeros"),
        (4, 4, 3, 1, 2, 2, 1, "zeros"),
        (4, 6, 5, 2, 2, 1, 1, "reflect"),
    ],
)
def test_fold_centre_tap_is_exact_per_conv(cin, cout, kernel, stride, padding, dilation, groups, mode) -> None:  # noqa: ANN001
    gen = torch.Generator().manual_seed(3)
    conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups,
                     bias=True, padding_mode=mode).double()
    adapter = ResidualAdapterConv(conv)
    with torch.no_grad():
        adapter.alpha.weight.copy_(torch.randn(adapter.alpha.weight.shape, generator=gen, dtype=torch.float64))
    folded = copy.deepcopy(conv)
    folded.weight = nn.Parameter(fold_centre_tap(conv.weight, adapter.alpha.weight))
    x = torch.randn(2, cin, 9, 11, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(folded(x), adapter(x), rtol=0, atol=1e-12)
    assert not torch.equal(adapter(x), conv(x))


@pytest.mark.parametrize("name", [n for names in FAMILY_CASES.values() for n in names])
def test_folded_plain_model_matches_adapter_network(name: str) -> None:
    plain = _plain(name)
    model = with_adapters(plain)
    _randomise_alpha(model, seed=5)
    x = _images(3)
    fresh = _fresh_plain(name, folded_state(model))
    with torch.no_grad():
        ref, got, base = model(x), fresh(x), plain(x)
    assert (ref - base).abs().max() > 0.05  # the adapters matter, so the comparison can fail
    assert (got - ref).abs().max() <= 1e-4


def test_tsa_fold_round_trips_through_task_weights_and_onnx(resnet18: nn.Module, tmp_path: Path) -> None:
    model = with_adapters(resnet18)
    _randomise_alpha(model, seed=7)
    beta = np.eye(resnet18.num_features, dtype=np.float32) * 2
    weights = TaskWeights.load(task_weights(model, beta=beta).save(tmp_path / "task.npz"))
    n_alpha = sum(a.alpha.weight.numel() for a in adapters_of(model).values())
    assert weights.nbytes == 4 * (n_alpha + beta.size)
    np.testing.assert_array_equal(weights.beta, beta)
    fresh = _fresh_plain("resnet18", weights.apply(resnet18.state_dict()))
    changed = weights.changed_weights(resnet18.state_dict())
    assert sorted(changed) == sorted(f"{n}.weight" for n in adapters_of(model))
    x = _images(3)
    with torch.no_grad():
        ref = model(x).numpy()
        assert np.abs(fresh(x).numpy() - ref).max() <= 1e-4
    assert np.abs(_onnx_features(fresh, x, tmp_path / "tsa.onnx") - ref).max() <= 1e-4


def test_bn_affine_fold_round_trips_through_task_weights_and_onnx(resnet18: nn.Module, tmp_path: Path) -> None:
    model = copy.deepcopy(resnet18)
    keys = []
    gen = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.mul_(0.5 + torch.rand(m.num_features, generator=gen))
                m.bias.add_(0.2 * torch.randn(m.num_features, generator=gen))
                keys += [f"{name}.weight", f"{name}.bias"]
    weights = TaskWeights.load(task_weights(model, replaced_keys=keys).save(tmp_path / "bn.npz"))
    assert weights.beta is None and not weights.centre_deltas and sorted(weights.replaced) == sorted(keys)
    fresh = _fresh_plain("resnet18", weights.apply(resnet18.state_dict()))
    x = _images(3)
    with torch.no_grad():
        ref = model(x).numpy()
        assert np.abs(ref - resnet18(x).numpy()).max() > 0.05
        assert np.abs(fresh(x).numpy() - ref).max() <= 1e-4
    assert np.abs(_onnx_features(fresh, x, tmp_path / "bn.onnx") - ref).max() <= 1e-4


def test_task_weights_refuse_another_backbone(resnet18: nn.Module) -> None:
    weights = task_weights(with_adapters(resnet18))
    state = dict(resnet18.state_dict())
    state["layer1.0.conv1.weight"] = torch.zeros(32, 64, 3, 3)
    with pytest.raises(BundleError, match="do not fit"):
        weights.apply(state)
    del state["layer1.0.conv1.weight"]
    with pytest.raises(BundleError, match="lacks"):
        weights.apply(state)


# ---- fitting


def _numpy_ncc_loss(feats: np.ndarray, labels: np.ndarray) -> float:
    feats = feats.astype(np.float64)
    classes = np.unique(labels)
    protos = np.stack([feats[labels == c].mean(0) for c in classes])
    cos = (feats @ protos.T) / np.outer(np.linalg.norm(feats, axis=1), np.linalg.norm(protos, axis=1))
    logits = 10.0 * cos
    logits -= logits.max(1, keepdims=True)
    log_p = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    return float(-log_p[np.arange(len(labels)), np.searchsorted(classes, labels)].mean())


def test_fit_tsa_changes_only_alpha_and_beta(resnet18: nn.Module) -> None:
    x, labels = _images(6, seed=11), np.array([3, 3, 7, 7, 9, 9])
    before = {k: v.clone() for k, v in resnet18.state_dict().items()}
    result = fit_tsa(resnet18, x.numpy(), labels, device="cpu")
    assert len(result.losses) == 40 and result.device == "cpu"
    for k, v in resnet18.state_dict().items():  # the caller's backbone is untouched
        assert torch.equal(v, before[k]), k
    fitted = result.model.state_dict()
    alpha_keys = [k for k in fitted if ".alpha." in k]
    assert len(alpha_keys) == 16
    for k, v in fitted.items():
        if k not in alpha_keys:
            assert torch.equal(v, before[k.replace(".conv.", ".")]), k
    init = with_adapters(resnet18)
    assert all(not torch.equal(fitted[k], init.state_dict()[k]) for k in alpha_keys)
    assert not np.array_equal(result.beta, np.eye(512, dtype=np.float32))
    assert not any(p.requires_grad for p in result.model.parameters())

    with torch.no_grad():
        start = _numpy_ncc_loss(init(x).numpy(), labels)  # alpha = 1e-4 I, beta = I
        end = _numpy_ncc_loss(result.model(x).numpy() @ result.beta.T.astype(np.float64), labels)
    assert result.losses[0] == pytest.approx(start, rel=1e-5)
    assert end < 0.5 * start
    assert result.losses[-1] < result.losses[0]


def test_fit_tsa_is_deterministic_and_takes_torch_inputs(resnet18: nn.Module) -> None:
    x, labels = _images(4, seed=12), torch.tensor([0, 1, 0, 1])
    a = fit_tsa(resnet18, x, labels, steps=2, device="cpu")
    b = fit_tsa(resnet18, x.numpy(), labels.numpy(), steps=2, device="cpu")
    assert a.losses == b.losses and np.array_equal(a.beta, b.beta)
    with pytest.raises(InvalidInput, match="at least 2 classes"):
        fit_tsa(resnet18, x, torch.zeros(4, dtype=torch.long), steps=1)
    with pytest.raises(InvalidInput, match="labels must be 4"):
        fit_tsa(resnet18, x, np.array([0, 1]), steps=1)


@pytest.mark.gpu
def test_fit_tsa_on_cuda_matches_cpu(resnet18: nn.Module) -> None:
    x, labels = _images(4, seed=14), np.array([0, 1, 0, 1])
    gpu = fit_tsa(resnet18, x, labels, steps=3)  # default device: CUDA when present
    cpu = fit_tsa(resnet18, x, labels, steps=3, device="cpu")
    assert gpu.device == "cuda" and next(gpu.model.parameters()).device.type == "cpu"
    np.testing.assert_allclose(gpu.losses, cpu.losses, rtol=1e-2)  # cuDNN may use TF32 convolutions


def test_fit_bn_affine_changes_only_bn_weight_and_bias(resnet18: nn.Module, tmp_path: Path) -> None:
    x, labels = _images(6, seed=13), np.array([0, 0, 1, 1, 2, 2])
    result = fit_bn_affine(resnet18, x, labels, steps=20, device="cpu")
    assert len(result.changed_keys) == 2 * sum(isinstance(m, nn.BatchNorm2d) for m in resnet18.modules())
    before, after = resnet18.state_dict(), result.model.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]) == (k not in result.changed_keys), k  # running stats frozen too
    with torch.no_grad():
        start = _numpy_ncc_loss(resnet18(x).numpy(), labels)
        end = _numpy_ncc_loss(result.model(x).numpy(), labels)
    assert result.losses[0] == pytest.approx(start, rel=1e-5)
    assert end < start
    fresh = _fresh_plain("resnet18", result.task_weights().apply(resnet18.state_dict()))
    with torch.no_grad():
        assert torch.equal(fresh(x), result.model(x))


# ---- adaptation MACs


def _resnet18_layers(size: int) -> list[tuple[str, int, int, int, int]]:
    """(name, output side, C_out, C_in, kernel) of ResNet-18's convs, by hand."""
    stem_out = (size + 2 * 3 - 7) // 2 + 1
    side = (stem_out + 2 - 3) // 2 + 1  # max-pool 3x3 / 2, padding 1
    layers = [("conv1", stem_out, 64, 3, 7)]
    cin = 64
    for stage, cout in enumerate((64, 128, 256, 512), start=1):
        if stage > 1:
            side = (side + 2 - 3) // 2 + 1
            layers.append((f"layer{stage}.0.downsample.0", side, cout, cin, 1))
        layers += [(f"layer{stage}.0.conv1", side, cout, cin, 3), (f"layer{stage}.0.conv2", side, cout, cout, 3),
                   (f"layer{stage}.1.conv1", side, cout, cout, 3), (f"layer{stage}.1.conv2", side, cout, cout, 3)]
        cin = cout
    return layers


def test_adapt_macs_match_hand_count(resnet18: nn.Module) -> None:
    layers = _resnet18_layers(IMG)
    conv = {n: s * s * co * ci * k * k for n, s, co, ci, k in layers}
    adapter = {n: s * s * co * ci for n, s, co, ci, k in layers if k == 3}
    beta = 512 * 512
    forward = sum(conv.values()) + sum(adapter.values()) + beta
    no_input_grad = conv["conv1"] + conv["layer1.0.conv1"] + adapter["layer1.0.conv1"]
    backward = (forward - no_input_grad) + sum(adapter.values()) + beta
    assert tsa_adapt_macs(resnet18, IMG, n_support=5, steps=40) == 40 * 5 * (forward + backward)
    plain = sum(conv.values())
    assert bn_affine_adapt_macs(resnet18, (IMG, IMG), n_support=5, steps=3) == 3 * 5 * (2 * plain - conv["conv1"])
