"""CaSE bundles: `export --adapter case` graphs against PyTorch, the exact chunked context pass on ONNX
Runtime, the query pass, γ-length refusal, checkpoints of both kinds, and the torch rebuild from a bundle."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fsdeploy.backbones import create_backbone, family_of, save_checkpoint
from fsdeploy.engines.ort import OrtEngine
from fsdeploy.errors import BundleError, InvalidInput
from fsdeploy.bundle import TORCH_WEIGHTS
from fsdeploy.pipeline.export import export_bundle
from fsdeploy.adapters import build_adapted
from fsdeploy.backbones import BuildRequest
from fsdeploy.runtime.case_pass import batches_of, context_pass, query_pass
from fsdeploy.modules.case_checkpoint import case_checkpoint_state
from fsdeploy.modules.casenet import CaseNet
from tests.helpers import realistic_

SIZE = 32


def _case_checkpoint(name: str, path: Path, seed: int = 0) -> tuple[Path, CaseNet]:
    """A metatrain-format checkpoint with O(1) activations and CaSE blocks far from identity."""
    backbone, pre = create_backbone(name, img_size=SIZE)
    net = CaseNet(realistic_(backbone, seed), family=family_of(name)).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for case in net.cases:
            for p in case.mlp[-1].parameters():
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
    save_checkpoint(case_checkpoint_state(net), path, name=name, preprocess=pre,
                    extra={"adapter": "case", "case_sites": [s.name for s in net.layout]})
    return path, net


# export's own validation (every graph vs torch, both input sets) runs for resnet18; efficientnet_b0's
# graphs are checked by the tests below only (context/query vs torch, chunked vs one-batch), to save time
@pytest.fixture(scope="module", params=[("resnet18", True), ("efficientnet_b0", False)], ids=["resnet18", "efficientnet_b0"])
def bundle(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    name, validate = request.param
    tmp = tmp_path_factory.mktemp(name)
    ckpt, net = _case_checkpoint(name, tmp / "case.safetensors")
    b, report = export_bundle(name, tmp / "bundle", adapter="case", checkpoint=ckpt, img_size=SIZE, validate=validate)
    engines: dict[str, OrtEngine] = {}

    def open_graph(graph: str) -> OrtEngine:
        open_graph.opened.append(graph)  # type: ignore[attr-defined]
        if graph not in engines:
            engines[graph] = OrtEngine(b.graph_path(graph))
        return engines[graph]

    open_graph.opened = []  # type: ignore[attr-defined]

    yield name, b, report, net, open_graph
    for e in engines.values():
        e.close()


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, SIZE, SIZE)).astype(np.float32)


def test_bundle_validates_every_graph(bundle) -> None:
    _, b, report, net, _ = bundle
    graphs = b.manifest.graphs
    stages = b.manifest.extra["chunked"]["stages"]
    assert set(graphs) == {"context", "query", "case_gamma", *stages} and len(stages) == len(net.layout) + 1
    if report is not None:
        assert report.passed and {c.graph for c in report.checks} == set(graphs)
        assert max(c.max_abs for c in report.checks) > 0  # compared real numbers, not empty outputs
    assert graphs["query"].inputs["gamma"].shape == (net.gamma_size,)  # static γ length
    assert b.manifest.extra["gamma_size"] == net.gamma_size
    layout = b.manifest.extra["gamma_layout"]
    assert [s["name"] for s in layout] == [s.name for s in net.layout]
    assert layout[-1]["offset"] + layout[-1]["length"] == net.gamma_size
    assert b.manifest.feature_dim == net.backbone.num_features


def test_onnx_context_and_query_match_torch(bundle) -> None:
    _, _, _, net, open_graph = bundle
    x, y = _images(5), _images(3, seed=1)
    with torch.no_grad():
        feats, gamma = net(torch.from_numpy(x))
        q_feats = net.query(torch.from_numpy(y), gamma)
    assert gamma.std() > 0.05 and feats.abs().mean() > 1e-2
    out = open_graph("context").run({"images": x})
    np.testing.assert_allclose(out["gamma"], gamma.numpy(), rtol=0, atol=1e-4)
    np.testing.assert_allclose(out["features"], feats.numpy(), rtol=0, atol=1e-4)
    got = query_pass(open_graph("query"), y, out["gamma"])
    np.testing.assert_allclose(got, q_feats.numpy(), rtol=0, atol=1e-4)


def test_query_with_context_gamma_reproduces_context_features(bundle) -> None:
    _, b, _, _, open_graph = bundle
    x = _images(6, seed=2)
    feats, gamma = context_pass(open_graph, [x], b.manifest.extra)
    np.testing.assert_allclose(query_pass(open_graph("query"), x, gamma, b.manifest.extra), feats, rtol=0, atol=1e-5)


@pytest.mark.parametrize("chunk", [2, 3, 5])
def test_chunked_context_is_exact(bundle, chunk: int) -> None:
    _, b, _, _, open_graph = bundle
    x = _images(5, seed=3)  # chunks 2+2+1, 3+2, and one chunk forced through the stages
    feats, gamma = context_pass(open_graph, [x], b.manifest.extra)
    released: list[str] = []
    c_feats, c_gamma = context_pass(open_graph, batches_of(x, chunk), b.manifest.extra, chunked=True, release=released.append)
    np.testing.assert_allclose(c_gamma, gamma, rtol=0, atol=1e-5)
    np.testing.assert_allclose(c_feats, feats, rtol=0, atol=1e-5 * max(1.0, float(np.abs(feats).max())))
    assert released[: len(b.manifest.extra["chunked"]["stages"])] == b.manifest.extra["chunked"]["stages"]
    # the last chunk alone gives a different γ: the scheme really pools over every chunk
    if chunk < 5:
        last = x[(4 // chunk) * chunk :]
        assert np.abs(context_pass(open_graph, [last], b.manifest.extra)[1] - gamma).max() > 1e-3


def test_stage_chunks_split_batches_and_reuse_state_buffers(bundle, monkeypatch: pytest.MonkeyPatch) -> None:
    from fsdeploy.runtime.case_pass import StateStore

    _, b, _, _, open_graph = bundle
    x = _images(5, seed=5)
    feats, gamma = context_pass(open_graph, [x], b.manifest.extra)
    buffers: set[int] = set()
    takes = []
    real_take = StateStore.take

    def spy(self, nbytes: int, n_images: int = 0):
        buf = real_take(self, nbytes, n_images)
        buffers.add(id(buf))
        takes.append(n_images)
        return buf

    monkeypatch.setattr(StateStore, "take", spy)
    # one batch of 5 forced through the stages in chunks of 2: runs of 2, 2 and 1 images
    c_feats, c_gamma = context_pass(open_graph, [x], b.manifest.extra, chunked=True, chunk=2)
    np.testing.assert_allclose(c_gamma, gamma, rtol=0, atol=1e-5)
    np.testing.assert_allclose(c_feats, feats, rtol=0, atol=1e-5 * max(1.0, float(np.abs(feats).max())))
    assert takes[:3] == [2, 2, 1]
    assert len(takes) > 3 * 2  # every stage with a state takes a buffer per chunk ...
    assert len(buffers) <= 3 + 1  # ... but only one cut's worth plus one chunk is ever made
    with pytest.raises(InvalidInput, match="chunk must be >= 1"):
        context_pass(open_graph, [x], b.manifest.extra, chunked=True, chunk=0)


def test_several_batches_default_to_the_chunked_scheme(bundle) -> None:
    _, b, _, _, open_graph = bundle
    opened = open_graph.opened
    opened.clear()
    x = _images(4, seed=4)
    context_pass(open_graph, batches_of(x, 2), b.manifest.extra)
    assert "context" not in opened and "stage_00" in opened
    opened.clear()
    context_pass(open_graph, batches_of(x, 2), b.manifest.extra, chunked=False)
    assert opened == ["context"]


def test_wrong_gamma_and_bad_inputs_are_refused(bundle) -> None:
    _, b, _, net, open_graph = bundle
    x = _images(2)
    with pytest.raises(InvalidInput, match=rf"takes a vector of {net.gamma_size} values"):
        query_pass(open_graph("query"), x, np.ones(net.gamma_size - 1, np.float32), b.manifest.extra)
    with pytest.raises(InvalidInput, match="takes a vector"):
        query_pass(open_graph("query"), x, np.ones((1, net.gamma_size), np.float32))
    with pytest.raises(InvalidInput, match="support set is empty"):
        context_pass(open_graph, [], b.manifest.extra)
    with pytest.raises(BundleError, match="no chunked context graphs"):
        context_pass(open_graph, batches_of(x, 1), {"gamma_layout": b.manifest.extra["gamma_layout"]})


def test_torch_module_rebuilds_from_the_bundle(bundle) -> None:
    name, b, _, net, _ = bundle
    built = build_adapted("case", BuildRequest(name, img_size=SIZE))
    built.module.load_state_dict(load_file(str(b.file(TORCH_WEIGHTS))))
    x = torch.from_numpy(_images(3))
    with torch.no_grad():
        f1, g1 = built.module(x)
        f0, g0 = net(x)
    torch.testing.assert_close(g1, g0, rtol=0, atol=0)
    torch.testing.assert_close(f1, f0, rtol=0, atol=0)


def test_plain_backbone_checkpoint_gives_identity_case(tmp_path: Path) -> None:
    from tests.helpers import make_checkpoint

    ckpt = make_checkpoint("resnet18", tmp_path / "plain.safetensors", img_size=SIZE)
    built = build_adapted("case", BuildRequest("resnet18", checkpoint=ckpt, img_size=SIZE))
    plain, _ = create_backbone("resnet18", checkpoint=ckpt)
    x = torch.from_numpy(_images(2))
    with torch.no_grad():
        feats, gamma = built.module(x)
        torch.testing.assert_close(feats, plain(x), rtol=0, atol=1e-6)
    assert torch.equal(gamma, torch.ones_like(gamma))


def test_one_batch_limit_runs_small_sets_in_one_context_run(bundle) -> None:
    """`one_batch_up_to`: several batches whose total fits run the `context` graph once; a larger set streams
    through the stages with every batch it held back; both equal the one-batch result."""
    _, b, _, _, open_graph = bundle
    opened = open_graph.opened
    x = _images(5, seed=6)
    feats, gamma = context_pass(open_graph, [x], b.manifest.extra)
    opened.clear()
    got = context_pass(open_graph, batches_of(x, 2), b.manifest.extra, one_batch_up_to=5)
    assert opened == ["context"]
    opened.clear()
    streamed = context_pass(open_graph, batches_of(x, 2), b.manifest.extra, one_batch_up_to=3)
    assert "context" not in opened and "stage_00" in opened
    for f, g in (got, streamed):
        np.testing.assert_allclose(g, gamma, rtol=0, atol=1e-5)
        np.testing.assert_allclose(f, feats, rtol=0, atol=1e-5 * max(1.0, float(np.abs(feats).max())))
