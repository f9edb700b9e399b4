"""Each iterative head against a plain PyTorch implementation of the same published recipe.

The torch side uses torch.optim (Adam, SGD, Adadelta), autograd, F.cross_entropy, weight_norm and
F.cosine_similarity, fed the batches / init / permutations the head drew from its generator. Parameters
must agree to 1e-5 and predictions must be the same.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fsdeploy.bench.reference import torch_linear_head
import torch.nn.functional as F

from fsdeploy.heads import make_head
from fsdeploy.heads.baseline import draw_epochs, uniform_init
from fsdeploy.heads.linear import draw_batches

ATOL = 1e-5


def gaussian_task(seed: int, n: int, d: int, k: int, queries: int = 20):
    rng = np.random.default_rng(seed)
    means = 1.5 * rng.standard_normal((k, d))
    ys = np.arange(n) % k
    yq = np.arange(queries) % k
    xs = (means[ys] + rng.standard_normal((n, d))).astype(np.float32)
    xq = (means[yq] + rng.standard_normal((queries, d))).astype(np.float32)
    return xs, ys.astype(np.int64), xq


def rollback_(params: list[torch.Tensor], anchors: list[torch.Tensor], ratios: list[float]) -> None:
    """OLOR by hand: theta <- (1 - lam) theta + lam theta_0."""
    with torch.no_grad():
        for p, p0, lam in zip(params, anchors, ratios, strict=True):
            p.mul_(1 - lam).add_(lam * p0)


def torch_upper_case(xs, ys, k, batches, lrs, rollback=None):
    """UpperCaSE's PyTorch loop (the one reference, `fsdeploy.bench.reference`), with the rollback by hand."""
    anchors = [torch.zeros(k, xs.shape[1]), torch.zeros(k)]  # the zero init
    step = (lambda lin: rollback_([lin.weight, lin.bias], anchors, rollback)) if rollback else None
    return torch_linear_head(xs, ys, k, batches, lrs, after_step=step)


@pytest.mark.parametrize(
    "n,d,k,opts",
    [
        (25, 48, 5, {}),  # the published recipe: 500 steps of 128, N < batch (count-weighted rows)
        (150, 16, 3, {"iters": 80}),  # N > batch: the drawn rows themselves
        (20, 16, 4, {"optimizer": "rollback", "rollback": 0.01, "rollback_bias": 0.005}),
    ],
)
def test_linear_head_matches_torch_adam(n: int, d: int, k: int, opts: dict) -> None:
    xs, ys, xq = gaussian_task(0, n, d, k)
    head = make_head("linear", **opts)
    head.fit(xs, ys, rng=np.random.default_rng(7))
    batches = draw_batches(np.random.default_rng(7), n, head.iters, head.batch)
    lrs = np.linspace(1e-3, 1e-5, head.iters)
    np.testing.assert_array_equal(lrs, head.learning_rates())
    ratios = [head.rollback, head.rollback_bias] if head.optimizer == "rollback" else None
    lin = torch_upper_case(xs, ys, k, batches, lrs, ratios)
    np.testing.assert_allclose(head.weight_, lin.weight.detach().numpy(), atol=ATOL, rtol=0)
    np.testing.assert_allclose(head.bias_, lin.bias.detach().numpy(), atol=ATOL, rtol=0)
    assert np.abs(head.weight_).max() > 1e-3  # it trained
    with torch.no_grad():
        ref = torch.softmax(lin(torch.from_numpy(xq)), dim=1).numpy()
    np.testing.assert_allclose(head.predict_proba(xq), ref, atol=ATOL)
    np.testing.assert_array_equal(head.predict(xq), ref.argmax(1))


def torch_closer_look(xs, ys, k, order, batch, init, cosine=False, scale=2.0, dampening=0.9, rollback=None):
    """Chen et al.'s set_forward_adaptation: SGD(0.01, momentum 0.9, dampening, wd 1e-3), batches of 4."""
    x, y = torch.from_numpy(xs), torch.from_numpy(ys)
    lin = torch.nn.Linear(xs.shape[1], k, bias=not cosine)
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(init[0]))
        if not cosine:
            lin.bias.copy_(torch.from_numpy(init[1]))
    if cosine:
        lin = torch.nn.utils.parametrizations.weight_norm(lin, name="weight", dim=0)
        x = x / (x.norm(dim=1, keepdim=True) + 1e-5)
        params = [lin.parametrizations.weight.original1, lin.parametrizations.weight.original0]  # v, g
    else:
        params = [lin.weight, lin.bias]
    anchors = [p.detach().clone() for p in params]
    opt = torch.optim.SGD(lin.parameters(), lr=0.01, momentum=0.9, dampening=dampening, weight_decay=1e-3)
    for perm in order:
        for i in range(0, len(perm), batch):
            idx = torch.from_numpy(perm[i : i + batch])
            opt.zero_grad()
            scores = lin(x[idx]) * (scale if cosine else 1.0)
            F.cross_entropy(scores, y[idx]).backward()
            opt.step()
            if rollback:
                rollback_(params, anchors, rollback)
    return lin


@pytest.mark.parametrize(
    "opts", [{}, {"dampening": 0.0}, {"optimizer": "rollback", "rollback": 0.02, "rollback_bias": 0.01}], ids=str,
)
def test_baseline_matches_torch_sgd(opts: dict) -> None:
    n, d, k = 14, 16, 3  # 14 rows: batches of 4, 4, 4, 2
    xs, ys, xq = gaussian_task(1, n, d, k)
    head = make_head("baseline", **opts).fit(xs, ys, rng=np.random.default_rng(3))
    rng = np.random.default_rng(3)
    w0, b0 = uniform_init(rng, k, d)
    order = draw_epochs(rng, n, 100)
    ratios = [head.rollback, head.rollback_bias] if head.optimizer == "rollback" else None
    lin = torch_closer_look(xs, ys, k, order, 4, (w0, b0), dampening=head.dampening, rollback=ratios)
    np.testing.assert_allclose(head.weight_, lin.weight.detach().numpy(), atol=ATOL, rtol=0)
    np.testing.assert_allclose(head.bias_, lin.bias.detach().numpy(), atol=ATOL, rtol=0)
    assert np.abs(head.weight_ - w0).max() > 1e-2  # it trained
    with torch.no_grad():
        ref = torch.softmax(lin(torch.from_numpy(xq)), dim=1).numpy()
    np.testing.assert_allclose(head.predict_proba(xq), ref, atol=ATOL)
    np.testing.assert_array_equal(head.predict(xq), ref.argmax(1))


@pytest.mark.parametrize(
    "opts", [{}, {"scale": 10.0}, {"optimizer": "rollback", "rollback": 0.02, "rollback_norm": 0.01}], ids=str,
)
def test_baseline_plus_plus_matches_torch_weight_norm(opts: dict) -> None:
    n, d, k = 13, 16, 3
    xs, ys, xq = gaussian_task(2, n, d, k)
    head = make_head("baseline++", **opts).fit(xs, ys, rng=np.random.default_rng(4))
    rng = np.random.default_rng(4)
    v0, _ = uniform_init(rng, k, d, bias=False)
    order = draw_epochs(rng, n, 100)
    ratios = [head.rollback, head.rollback_norm] if head.optimizer == "rollback" else None
    lin = torch_closer_look(xs, ys, k, order, 4, (v0, None), cosine=True, scale=float(head.scale_), rollback=ratios)
    weight = lin.weight.detach().numpy()  # g v / |v| after training
    np.testing.assert_allclose(head.weight_, weight, atol=ATOL, rtol=0)
    g = lin.parametrizations.weight.original0.detach().numpy().ravel()
    assert np.abs(g - np.linalg.norm(v0, axis=1)).max() > 1e-3  # the norms were learned
    with torch.no_grad():
        xqt = torch.from_numpy(xq)
        ref = torch.softmax(float(head.scale_) * lin(xqt / (xqt.norm(dim=1, keepdim=True) + 1e-5)), dim=1).numpy()
    np.testing.assert_allclose(head.predict_proba(xq), ref, atol=ATOL)
    np.testing.assert_array_equal(head.predict(xq), ref.argmax(1))


def torch_url_pa(xs, ys, k, steps, lr, init=None, rollback=None):
    """URL's `pa`: beta as a 1x1 conv weight (identity init), Adadelta, NCC loss with cosine * 10."""
    x, y = torch.from_numpy(xs), torch.from_numpy(ys)
    d = xs.shape[1]
    start = torch.eye(d) if init is None else torch.from_numpy(init)
    beta = start.clone().unsqueeze(-1).unsqueeze(-1).requires_grad_(True)
    anchor = beta.detach().clone()
    opt = torch.optim.Adadelta([beta], lr=lr)

    def mapped(feats):
        return F.conv2d(feats.unsqueeze(-1).unsqueeze(-1), beta).flatten(1)

    def protos(z):
        return torch.stack([z[(y == c).nonzero().ravel()].mean(0) for c in range(k)])

    def logits(z, p):
        return F.cosine_similarity(z.unsqueeze(1), p.unsqueeze(0), dim=-1, eps=1e-30) * 10

    for _ in range(steps):
        opt.zero_grad()
        z = mapped(x)
        F.cross_entropy(logits(z, protos(z)), y).backward()
        opt.step()
        if rollback is not None:
            rollback_([beta], [anchor], [rollback])
    with torch.no_grad():
        p = protos(mapped(x))

    def predict(q: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return torch.softmax(logits(mapped(torch.from_numpy(q)), p), 1).numpy()

    return beta.detach()[:, :, 0, 0].numpy(), predict


@pytest.mark.parametrize(
    "opts", [{}, {"lr": 0.1}, {"optimizer": "rollback", "rollback": 0.05}, {"steps": 0, "init": "random"}], ids=str,
)
def test_lt_ncc_matches_torch_adadelta(opts: dict) -> None:
    n, d, k = 15, 12, 3
    xs, ys, xq = gaussian_task(3, n, d, k)
    opts = dict(opts)
    if opts.get("init") == "random":
        opts["init"] = (np.eye(d) + 0.2 * np.random.default_rng(0).standard_normal((d, d))).astype(np.float32)
    head = make_head("lt-ncc", **opts).fit(xs, ys)
    beta, predict = torch_url_pa(xs, ys, k, head.steps, head.lr, opts.get("init"),
                                 head.rollback if head.optimizer == "rollback" else None)
    np.testing.assert_allclose(head.beta_, beta, atol=ATOL, rtol=0)
    if head.steps:
        assert np.abs(head.beta_ - np.eye(d)).max() > 1e-3  # it trained
    ref = predict(xq)
    np.testing.assert_allclose(head.predict_proba(xq), ref, atol=ATOL)
    np.testing.assert_array_equal(head.predict(xq), ref.argmax(1))
