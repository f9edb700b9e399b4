"""The contract every registered head and transform keeps, parametrized over the registries.

HEAD_CASES / TRANSFORM_CASES list option sets per registered name; a name with no case fails
`test_every_registered_name_has_cases`, so a new head cannot slip in untested. Other head test files
import these tables.
"""
from __future__ import annotations

import io
import re
import subprocess
import sys
import tokenize
from pathlib import Path

import numpy as np
import pytest

from fsdeploy.errors import InvalidInput, UnknownName
from fsdeploy.heads import HEADS, TRANSFORMS, TaskModel, head_from_state, make_head, make_transform
from fsdeploy.heads.transforms import transform_from_state

# short recipes keep the suite fast; the published defaults are exercised in the torch reference tests
HEAD_CASES: dict[str, list[dict]] = {
    "ncc": [{}, {"distance": "cosine"}, {"distance": "cosine", "scale": 3.0}],
    "linear": [{"iters": 40}, {"iters": 40, "optimizer": "rollback", "rollback": 0.05, "rollback_bias": 0.01},
               {"iters": 30, "batch": 8}],
    "baseline": [{"epochs": 5}, {"epochs": 5, "optimizer": "rollback"}, {"epochs": 3, "dampening": 0.0}],
    "baseline++": [{"epochs": 5}, {"epochs": 5, "optimizer": "rollback", "rollback_norm": 0.02},
                   {"epochs": 3, "scale": 10.0}, {"epochs": 2, "scale": "auto"}],
    "lt-ncc": [{"steps": 5}, {"steps": 0}, {"steps": 5, "optimizer": "rollback", "lr": 0.1}],
    "linear-newton": [{}, {"standardise": False}, {"steps": 2, "cg_steps": 3, "l2": 1e-2}],
    "bd-cspn": [{}, {"epsilon": 1.0}, {"top_z": 2, "shift": False, "scale": 3.0}],
}
TRANSFORM_CASES: dict[str, list[dict]] = {
    "none": [{}],
    "l2": [{}],
    "cl2n": [{"mean": "given"}],
    "cl2n-support": [{}],
    "ci": [{}, {"k": 2.0}, {"normalise": False}],
}
RANDOMISED = {"linear", "baseline", "baseline++"}  # heads whose fit draws from the generator


def make_task(seed: int = 0, k: int = 4, shots: int = 5, dim: int = 12, queries: int = 6, nonneg: bool = True):
    """Gaussian classes (shifted non-negative when `nonneg`, like post-ReLU features): support and query."""
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((k, dim))
    ys, yq = np.repeat(np.arange(k), shots), np.repeat(np.arange(k), queries)
    xs = means[ys] + 0.8 * rng.standard_normal((ys.size, dim))
    xq = means[yq] + 0.8 * rng.standard_normal((yq.size, dim))
    if nonneg:
        xs, xq = np.maximum(xs + 1.0, 0), np.maximum(xq + 1.0, 0)
    return xs.astype(np.float32), ys.astype(np.int64), xq.astype(np.float32), yq.astype(np.int64)


def _params(table: dict[str, list[dict]]) -> list:
    return [pytest.param(name, opts, id=f"{name}-{i}") for name, cases in table.items() for i, opts in enumerate(cases)]


def head_params() -> list:
    return _params(HEAD_CASES)


def transform_params() -> list:
    return _params(TRANSFORM_CASES)


def build_transform(name: str, opts: dict, dim: int):
    opts = dict(opts)
    if opts.get("mean") == "given":
        opts["mean"] = np.linspace(0.0, 1.0, dim, dtype=np.float32)
    return make_transform(name, **opts)


def npz_round_trip(state: dict) -> dict:
    buf = io.BytesIO()
    np.savez(buf, **state)
    buf.seek(0)
    with np.load(buf, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def test_every_registered_name_has_cases() -> None:
    assert set(HEAD_CASES) == set(HEADS), "add the new head to HEAD_CASES"
    assert set(TRANSFORM_CASES) == set(TRANSFORMS), "add the new transform to TRANSFORM_CASES"


@pytest.mark.parametrize("name,opts", head_params())
def test_head_probabilities_and_state_round_trip(name: str, opts: dict) -> None:
    xs, ys, xq, _ = make_task()
    head = make_head(name, **opts).fit(xs, ys, rng=np.random.default_rng(3))
    probs = head.predict_proba(xq)
    assert probs.shape == (xq.shape[0], 4) and probs.dtype == np.float32
    assert np.all(probs >= 0)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(head.predict(xq), probs.argmax(axis=1))
    state = npz_round_trip(head.state())
    assert state["head"].shape == () and str(state["head"]) == name
    again = head_from_state(state)
    assert type(again) is type(head)
    np.testing.assert_array_equal(again.predict_proba(xq), probs)
    # the options come back too: refitting the restored head gives the same model
    refit = again.fit(xs, ys, rng=np.random.default_rng(3))
    np.testing.assert_allclose(refit.predict_proba(xq), probs, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name,opts", head_params())
def test_head_randomness_comes_from_the_generator(name: str, opts: dict) -> None:
    xs, ys, xq, _ = make_task(seed=1)
    first = make_head(name, **opts).fit(xs, ys, rng=np.random.default_rng(5)).predict_proba(xq)
    same = make_head(name, **opts).fit(xs, ys, rng=np.random.default_rng(5)).predict_proba(xq)
    np.testing.assert_array_equal(first, same)
    seeded = make_head(name, **opts, seed=5).fit(xs, ys).predict_proba(xq)  # seed -> default_rng(seed)
    np.testing.assert_array_equal(first, seeded)
    other = make_head(name, **opts).fit(xs, ys, rng=np.random.default_rng(6)).predict_proba(xq)
    if name in RANDOMISED:
        assert not np.array_equal(first, other)
    else:
        np.testing.assert_array_equal(first, other)


@pytest.mark.parametrize("name", sorted(HEAD_CASES))
def test_head_rejects_bad_input(name: str) -> None:
    xs, ys, xq, _ = make_task()
    head = make_head(name, **HEAD_CASES[name][0])
    with pytest.raises(InvalidInput, match="not fitted"):
        head.predict_proba(xq)
    with pytest.raises(InvalidInput, match="K >= 2"):
        head.fit(xs, np.zeros_like(ys))
    with pytest.raises(InvalidInput, match="cover 0..K-1"):
        head.fit(xs, np.where(ys == 1, 3, ys))  # class 1 missing
    with pytest.raises(InvalidInput, match=r"expected features \(N, D\)"):
        head.fit(xs[:, 0], ys)
    with pytest.raises(InvalidInput, match=r"expected features \(N, D\)"):
        head.fit(xs, ys[:-1])
    head.fit(xs, ys)
    with pytest.raises(InvalidInput, match="fitted on features of size 12"):
        head.predict_proba(xq[:, :5])


def test_bad_options_and_names_raise() -> None:
    with pytest.raises(UnknownName, match="unknown head 'svm'"):
        make_head("svm")
    with pytest.raises(UnknownName, match="unknown transform 'pca'"):
        make_transform("pca")
    with pytest.raises(InvalidInput, match="ncc distance must be one of"):
        make_head("ncc", distance="manhattan")
    for name in ("linear", "baseline", "baseline++", "lt-ncc"):
        with pytest.raises(InvalidInput, match="optimizer must be one of"):
            make_head(name, optimizer="rmsprop")
    with pytest.raises(InvalidInput, match=r"lt-ncc init must be \(12, 12\)"):
        xs, ys, _, _ = make_task()
        make_head("lt-ncc", init=np.eye(3)).fit(xs, ys)
    with pytest.raises(UnknownName, match="unknown head 'gone'"):
        head_from_state({"head": np.asarray("gone")})


@pytest.mark.parametrize("name,opts", transform_params())
def test_transform_shape_and_state_round_trip(name: str, opts: dict) -> None:
    xs, _, xq, _ = make_task()
    tr = build_transform(name, opts, xs.shape[1]).fit(xs)
    out = tr.apply(xq)
    assert out.shape == xq.shape and out.dtype == np.float32 and np.all(np.isfinite(out))
    state = npz_round_trip(tr.state())
    assert str(state["transform"]) == name
    again = transform_from_state(state)
    np.testing.assert_array_equal(again.apply(xq), out)
    np.testing.assert_array_equal(again.fit(xq).apply(xq), tr.fit(xq).apply(xq))  # options survive


@pytest.mark.parametrize("name,opts", transform_params())
def test_task_model_round_trip(name: str, opts: dict) -> None:
    xs, ys, xq, _ = make_task(seed=2)
    model = TaskModel(build_transform(name, opts, xs.shape[1]), make_head("ncc", distance="cosine"))
    probs = model.fit(xs, ys).predict_proba(xq)
    again = TaskModel.from_state(npz_round_trip(model.state()))
    np.testing.assert_array_equal(again.predict_proba(xq), probs)
    direct = make_head("ncc", distance="cosine").fit(model.transform.apply(xs), ys)
    np.testing.assert_allclose(direct.predict_proba(model.transform.apply(xq)), probs, rtol=1e-6)


def test_task_model_create_and_bad_state() -> None:
    xs, ys, xq, _ = make_task()
    model = TaskModel.create("linear", "l2", iters=20, transform_opts={})
    assert model.head.iters == 20 and model.transform.name == "l2"
    model.fit(xs, ys, rng=np.random.default_rng(0))
    assert model.predict(xq).shape == (xq.shape[0],)
    with pytest.raises(InvalidInput, match="lacks 'transform.transform'"):
        TaskModel.from_state({k: v for k, v in model.state().items() if not k.startswith("transform.")})


HEADS_DIR = Path(__file__).resolve().parents[1] / "fsdeploy" / "heads"


def test_heads_never_import_torch() -> None:
    code = "import sys, fsdeploy.heads; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
    for path in HEADS_DIR.glob("*.py"):
        assert not re.search(r"^\s*(import|from)\s+torch", path.read_text(), re.M), path


RAW_NUMPY_PRODUCTS = ("dot", "matmul", "inner", "einsum", "tensordot", "vdot", "linalg")


def _raw_products(source: str) -> list[str]:
    """Matrix products written outside ops: the @ operator (not decorators), np.dot/matmul/einsum/..., linalg."""
    found, prev, prev2 = [], None, None
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type in (tokenize.COMMENT, tokenize.NL):
            continue
        starts_line = prev is None or prev.type in (tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT)
        if tok.type == tokenize.OP and tok.string in ("@", "@=") and not starts_line:
            found.append(f"line {tok.start[0]}: {tok.line.strip()}")
        if tok.type == tokenize.NAME and prev is not None and prev.string == "." and prev2 is not None:
            if prev2.string == "np" and tok.string in RAW_NUMPY_PRODUCTS:
                found.append(f"line {tok.start[0]}: {tok.line.strip()}")
        prev2, prev = prev, tok
    return found


def test_products_only_through_ops() -> None:
    """Every product must pass through fsdeploy.heads.ops, or the counted-run MAC tests would miss it."""
    assert _raw_products("y = a @ b\n@dec\ndef f(): pass\nz = np.dot(a, b)\n") == [
        "line 1: y = a @ b", "line 4: z = np.dot(a, b)"]  # the scanner itself works
    for path in HEADS_DIR.glob("*.py"):
        if path.name != "ops.py":
            assert _raw_products(path.read_text()) == [], path.name
