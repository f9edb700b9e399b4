"""Warm sessions (issue #21, target 3): `fsdeploy.Adapter(keep_warm=True)` keeps its engines and state buffers
from task to task, and every task it adapts equals what a cold, one-shot `fsdeploy.adapt` gives for the same
folder: same γ, same head, same predictions, whatever task came before. The cold path still releases each
support-pass engine as soon as the pass no longer needs it."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import fsdeploy
from fsdeploy.deps import available
from fsdeploy.engines import EngineOptions
from fsdeploy.errors import InvalidInput
from fsdeploy.pipeline.export import export_bundle
from tests.helpers import glyph_folder

BACKENDS = ["ort", pytest.param("openvino", marks=pytest.mark.skipif(not available("openvino"), reason="openvino not installed"))]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A CaSE resnet18 bundle at 32 px with CaSE blocks far from identity (γ depends on the support set), and
    three different tasks: other classes, other images, other sizes (12, 15 and 8 images)."""
    from types import SimpleNamespace

    from tests.test_case_export import _case_checkpoint

    tmp = tmp_path_factory.mktemp("warm")
    ckpt, _ = _case_checkpoint("resnet18", tmp / "case.safetensors")
    bundle, _ = export_bundle("resnet18", tmp / "bundle", adapter="case", checkpoint=ckpt, img_size=32, validate=False)
    tasks = [glyph_folder(tmp / "t1", classes="ABC", per_class=4, seed=1),
             glyph_folder(tmp / "t2", classes="DEFGH", per_class=3, seed=2),
             glyph_folder(tmp / "t3", classes="XY", per_class=4, seed=3)]
    queries = glyph_folder(tmp / "queries", classes="ABCDEFGHXY", per_class=1, seed=4)
    return SimpleNamespace(tmp=tmp, bundle=bundle, tasks=tasks, queries=queries)


def _assert_same_task(got, want) -> None:
    assert got.classes == want.classes
    assert got.task_state.keys() == want.task_state.keys() == {"gamma"}
    np.testing.assert_allclose(got.task_state["gamma"], want.task_state["gamma"], rtol=0, atol=1e-6)
    assert got.model_state.keys() == want.model_state.keys()
    for k in want.model_state:
        if np.asarray(want.model_state[k]).dtype.kind == "f":
            np.testing.assert_allclose(got.model_state[k], want.model_state[k], rtol=0, atol=1e-6)
        else:
            np.testing.assert_array_equal(got.model_state[k], want.model_state[k])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch", [4, 32], ids=["chunked", "one-batch"])
def test_warm_session_tasks_equal_cold_adapts_and_do_not_leak(ws, backend: str, batch: int) -> None:
    # batch 4 streams several batches (ORT: the chunked stage chain with its state buffers; OpenVINO: the context
    # graph, the sets fit its one-batch limit); batch 32 is one batch (the context graph on both)
    kw = {"backend": backend, "precision": "fp32", "threads": 1, "batch": batch}
    cold = [fsdeploy.adapt(ws.bundle, folder, **kw) for folder in ws.tasks]
    gammas = [t.task_state["gamma"] for t in cold]
    assert not np.allclose(gammas[0], gammas[1], atol=1e-4)  # the tasks really differ: a leak would show
    # support_size=12 (task 1's size): on OpenVINO the one-batch context graph also runs compiled for 12 images
    for support_size in (None, 12):
        with fsdeploy.Adapter(ws.bundle, keep_warm=True, support_size=support_size, **kw) as session:
            order = [0, 1, 2, 0, 2]  # bigger then smaller sets, and a task again after others
            warm = [session.adapt(ws.tasks[i]) for i in order]
            for i, task in zip(order, warm):
                _assert_same_task(task, cold[i])
            for i in (1, 2):
                got = [p.labels for p in session.predict(warm[order.index(i)], ws.queries, topk=2)]
                want = [p.labels for p in fsdeploy.predict(ws.bundle, cold[i], ws.queries, topk=2, backend=backend,
                                                            precision="fp32", threads=1)]
                assert got == want
            context = session._session._path.engines.opened.get("context")  # type: ignore[union-attr]
            if backend == "openvino" and support_size:
                assert context is not None and context._static is not None  # the fixed-shape model is there
        with pytest.raises(InvalidInput, match="closed"):
            session.adapt(ws.tasks[0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("keep_warm", [False, True], ids=["cold", "warm"])
def test_cold_path_releases_support_engines_and_warm_path_opens_them_once(ws, monkeypatch, backend: str, keep_warm: bool) -> None:
    import fsdeploy.runtime.open as open_mod
    from fsdeploy.data.folders import scan_image_folder
    from fsdeploy.data.images import load_checked
    from fsdeploy.runtime.paths import CasePath

    opened: list[str] = []
    closed: list[str] = []
    real = open_mod.open_graph

    def counting(bundle, graph, backend="ort", options=None):
        engine = real(bundle, graph, backend, options)
        opened.append(graph)
        close = engine.close

        def tracked() -> None:
            closed.append(graph)
            close()

        engine.close = tracked  # type: ignore[method-assign]
        return engine

    monkeypatch.setattr(open_mod, "open_graph", counting)
    x = load_checked(scan_image_folder(ws.tasks[0]).paths, ws.bundle.manifest.preprocess)
    for chunked in (True, False):
        opened.clear()
        closed.clear()
        path = CasePath(ws.bundle, backend, EngineOptions(threads=1), chunked=chunked, keep_warm=keep_warm)
        try:
            for _ in range(2):
                path.support([x[:6], x[6:]])
                support_graphs = set(opened)
                assert support_graphs and support_graphs <= {*ws.bundle.manifest.case_layout().stages, "case_gamma", "context"}
                if keep_warm:  # every engine stays open, with its buffers; the second task opens nothing
                    assert set(path.engines.opened) == support_graphs and not closed
                else:  # every support-pass engine released when the pass no longer needs it
                    assert not path.engines.opened and sorted(closed) == sorted(opened)
            assert len(opened) == (len(support_graphs) if keep_warm else 2 * len(support_graphs))
            held = path._store.free if path._store is not None else []  # the state buffers kept for the next task
            assert bool(held) == (keep_warm and chunked)
        finally:
            path.close()
        assert sorted(closed) == sorted(opened)  # close() releases whatever a warm session held


def test_one_shot_adapt_task_releases_its_engines(ws, monkeypatch) -> None:
    """`fsdeploy adapt` (adapt_task) stays cold: a fresh session without keep_warm, closed at the end."""
    from fsdeploy.runtime import adapt as adapt_mod

    made: list[object] = []
    real = adapt_mod.TaskAdapter

    class Spy(real):  # type: ignore[misc, valid-type]
        def __init__(self, *a, **kw) -> None:
            super().__init__(*a, **kw)
            made.append(self)

    monkeypatch.setattr(adapt_mod, "TaskAdapter", Spy)
    adapt_mod.adapt_task(ws.bundle, ws.tasks[0], None, options=EngineOptions(threads=1), batch=4)
    assert len(made) == 1 and made[0].keep_warm is False and made[0]._path is None  # type: ignore[attr-defined]


def test_adapter_refuses_bad_options_in_one_line(ws) -> None:
    with pytest.raises(InvalidInput, match=r"keep_warm='yes': pass True .* or False"):
        fsdeploy.Adapter(ws.bundle, keep_warm="yes")  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="batch"):
        fsdeploy.Adapter(ws.bundle, batch=0)
    for bad in (0, "100", 2.5, True):
        with pytest.raises(InvalidInput, match=r"support_size=.*: pass the number of support images per task"):
            fsdeploy.Adapter(ws.bundle, support_size=bad)  # type: ignore[arg-type]
    with fsdeploy.Adapter(ws.bundle, threads=1) as session:
        task = session.adapt(ws.tasks[0], ws.tmp / "task.npz")
        assert (ws.tmp / "task.npz").is_file()
        with pytest.raises(InvalidInput, match="topk"):
            session.predict(task, ws.queries, topk=4)
        with pytest.raises(InvalidInput):
            session.adapt(Path(ws.tmp / "no-such-folder"))
    session.close()  # twice is fine
    assert "Adapter" in dir(fsdeploy)


@pytest.mark.parametrize("keep_warm", [False, True], ids=["cold", "warm"])
def test_warm_stage_engines_stop_spinning_after_their_run(ws, keep_warm: bool) -> None:
    """A one-shot pass releases each stage right after it, so its ORT workers may spin between runs; a warm session
    keeps all of them open, where a stage still spinning would take a core from the next one (measured: warm 1.20 s
    per task against 0.92 s cold at 2 threads before this rule)."""
    from fsdeploy.runtime.paths import CasePath

    path = CasePath(ws.bundle, "ort", EngineOptions(threads=2), keep_warm=keep_warm)
    try:
        stages = ws.bundle.manifest.case_layout().stages
        modes = {_options(path, name).spinning for name in stages}
        assert modes == {"run" if keep_warm else "always"}
        assert _options(path, "query").spinning is None  # the query graph keeps the session's rule ("run")
    finally:
        path.close()
    explicit = CasePath(ws.bundle, "ort", EngineOptions(threads=2, spinning="off"), keep_warm=keep_warm)
    assert {_options(explicit, n).spinning for n in stages} == {"off"}  # a caller's choice wins
    explicit.close()


def _options(path, graph: str) -> EngineOptions:
    return path.engines.overrides.get(graph, path.engines.options)


@pytest.mark.parametrize("backend", BACKENDS)
def test_support_batch_is_the_whole_set_where_the_context_graph_takes_it_in_one_run(ws, backend: str) -> None:
    from fsdeploy.runtime.paths import CasePath, one_batch_limit

    path = CasePath(ws.bundle, backend, EngineOptions(threads=1))
    limit = one_batch_limit(backend, ws.bundle.manifest.case_layout())
    try:
        assert path.support_batch(20, 32) == 20  # fits one engine batch anyway
        # larger than a batch: one run only where the backend has a one-batch budget (OpenVINO), else streamed
        assert path.support_batch(40, 32) == (40 if limit >= 40 else 32)
        assert path.support_batch(limit + 1, 32) == 32 if limit else True
        assert CasePath(ws.bundle, backend, EngineOptions(threads=1), chunked=True).support_batch(20, 4) == 4
        assert CasePath(ws.bundle, backend, EngineOptions(threads=1), chunked=False).support_batch(500, 4) == 500
        # support_size asks for a fixed-shape context graph only where the context graph takes that size in one run
        for kw, size, want in [({}, 20, 20), ({"chunked": True}, 20, None), ({"chunked": False}, 5000, 5000),
                               ({}, limit + 1 if limit else 20, None if limit else 20)]:
            sized = CasePath(ws.bundle, backend, EngineOptions(threads=1), support_size=size, **kw)
            assert _options(sized, "context").static_batch == want, (kw, size)
    finally:
        path.close()
