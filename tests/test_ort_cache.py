"""ONNX Runtime's optimised-graph cache: a warm open loads the saved graph and computes exactly what the
plain session computes; damaged entries, changed sources, an unwritable folder and `off` all behave."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from fsdeploy.engines.ort import OrtEngine, OrtOptions
from fsdeploy.engines.ort_cache import DEFAULT_MAX_MB, ENV, MAX_ENV, cache_dir, cache_limit_bytes, evict
from fsdeploy.errors import InvalidInput

CPU = ("CPUExecutionProvider",)


def _conv_net(path: Path, seed: int = 0) -> Path:
    """Conv 8->16 (3x3) + BatchNorm + Relu + global pool: a graph the NCHWc pass rewrites."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(rng.standard_normal((16, 8, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "b"),
        numpy_helper.from_array((1 + rng.random(16)).astype(np.float32), "scale"),
        numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "shift"),
        numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "mean"),
        numpy_helper.from_array((1 + rng.random(16)).astype(np.float32), "var"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "scale", "shift", "mean", "var"], ["n"]),
        helper.make_node("Relu", ["n"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 16, 1, 1])], inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def _run(engine: OrtEngine, x: np.ndarray) -> np.ndarray:
    return engine.run({"x": x})["y"]


@pytest.fixture
def x() -> np.ndarray:
    return np.random.default_rng(1).standard_normal((2, 8, 16, 16)).astype(np.float32)


def test_warm_open_loads_the_saved_graph_and_matches(tmp_path: Path, x: np.ndarray) -> None:
    src = _conv_net(tmp_path / "net.onnx")
    cache = tmp_path / "cache"
    plain = _run(OrtEngine(src, OrtOptions(providers=CPU)), x)
    cold = OrtEngine(src, OrtOptions(providers=CPU, cache_dir=cache))
    saved = list(cache.glob("net-*.onnx"))
    assert len(saved) == 1 and not list(cache.glob(".*tmp"))
    ops = {n.op_type for n in onnx.load(saved[0]).graph.node}
    assert "ReorderInput" in ops or "ReorderOutput" in ops  # really ORT's optimised graph, not a copy
    content = saved[0].read_bytes()
    os.utime(saved[0], ns=(1, 1))
    warm = OrtEngine(src, OrtOptions(providers=CPU, cache_dir=cache))
    assert Path(warm.session._model_path) == saved[0]  # loaded from the cache ...
    assert saved[0].read_bytes() == content  # ... without rewriting it,
    assert saved[0].stat().st_mtime_ns > 1  # but marked as used
    np.testing.assert_array_equal(_run(cold, x), plain)
    np.testing.assert_array_equal(_run(warm, x), plain)


def test_damaged_entry_is_rebuilt(tmp_path: Path, x: np.ndarray) -> None:
    src = _conv_net(tmp_path / "net.onnx")
    cache = tmp_path / "cache"
    OrtEngine(src, OrtOptions(providers=CPU, cache_dir=cache))
    (entry,) = cache.glob("net-*.onnx")
    entry.write_bytes(b"not an onnx graph")
    engine = OrtEngine(src, OrtOptions(providers=CPU, cache_dir=cache))
    np.testing.assert_array_equal(_run(engine, x), _run(OrtEngine(src, OrtOptions(providers=CPU)), x))
    onnx.load(entry)  # rewritten with a loadable graph


def test_a_changed_source_gets_a_new_entry(tmp_path: Path, x: np.ndarray) -> None:
    src = _conv_net(tmp_path / "net.onnx", seed=0)
    cache = tmp_path / "cache"
    first = _run(OrtEngine(src, OrtOptions(providers=CPU, cache_dir=cache)), x)
    _conv_net(src, seed=1)  # re-exported in place: new bytes, new mtime
    os.utime(src, ns=(src.stat().st_atime_ns, src.stat().st_mtime_ns + 10**9))
    second = _run(OrtEngine(src, OrtOptions(providers=CPU, cache_dir=cache)), x)
    assert len(list(cache.glob("net-*.onnx"))) == 2
    np.testing.assert_array_equal(second, _run(OrtEngine(src, OrtOptions(providers=CPU)), x))
    assert not np.array_equal(first, second)


def test_unwritable_cache_runs_without_it(tmp_path: Path, x: np.ndarray) -> None:
    src = _conv_net(tmp_path / "net.onnx")
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the folder should be")
    engine = OrtEngine(src, OrtOptions(providers=CPU, cache_dir=blocker))
    np.testing.assert_array_equal(_run(engine, x), _run(OrtEngine(src, OrtOptions(providers=CPU)), x))
    assert blocker.read_text() == "a file where the folder should be"


def test_in_memory_graphs_and_other_levels_skip_the_cache(tmp_path: Path, x: np.ndarray) -> None:
    src = _conv_net(tmp_path / "net.onnx")
    cache = tmp_path / "cache"
    OrtEngine(src.read_bytes(), OrtOptions(providers=CPU, cache_dir=cache))
    OrtEngine(src, OrtOptions(providers=CPU, cache_dir=cache, graph_opt="basic"))
    assert not cache.exists()


@pytest.mark.parametrize(("value", "expect"), [("off", None), ("0", None), ("/some/where", Path("/some/where"))])
def test_env_switch(monkeypatch: pytest.MonkeyPatch, value: str, expect: Path | None) -> None:
    monkeypatch.setenv(ENV, value)
    assert cache_dir() == expect


def test_default_folder_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_dir() == tmp_path / "fsdeploy" / "ort"


def test_bundle_engines_use_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fsdeploy.engines import EngineOptions
    from fsdeploy.runtime import open_graph
    from fsdeploy.pipeline.export import export_bundle

    bundle, _ = export_bundle("resnet18", tmp_path / "b", img_size=32)
    monkeypatch.setenv(ENV, str(tmp_path / "cache"))
    cold = open_graph(bundle, "features", "ort", EngineOptions(providers=CPU))
    warm = open_graph(bundle, "features", "ort", EngineOptions(providers=CPU))
    assert len(list((tmp_path / "cache").glob("features-*.onnx"))) == 1
    assert Path(warm.session._model_path).parent == tmp_path / "cache"  # type: ignore[attr-defined]
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    np.testing.assert_array_equal(warm.run({"images": x})["features"], cold.run({"images": x})["features"])


def test_least_recently_used_entries_leave_past_the_size_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    srcs = [_conv_net(tmp_path / f"net{i}.onnx", seed=i) for i in range(3)]
    OrtEngine(srcs[0], OrtOptions(providers=CPU, cache_dir=cache))
    OrtEngine(srcs[1], OrtOptions(providers=CPU, cache_dir=cache))
    (e0,), (e1,) = cache.glob("net0-*.onnx"), cache.glob("net1-*.onnx")
    os.utime(e0, ns=(10**9, 10**9))  # net0 used first, net1 later ...
    os.utime(e1, ns=(2 * 10**9, 2 * 10**9))
    OrtEngine(srcs[0], OrtOptions(providers=CPU, cache_dir=cache))  # ... then net0 again: net1 is now the oldest
    room = e0.stat().st_size + e1.stat().st_size + 1000  # two entries fit, three do not
    monkeypatch.setenv(MAX_ENV, str(room / 2**20))
    OrtEngine(srcs[2], OrtOptions(providers=CPU, cache_dir=cache))
    assert sorted(p.name.split("-")[0] for p in cache.glob("*.onnx")) == ["net0", "net2"]


def test_evict_keeps_the_new_entry_and_stops_under_the_limit(tmp_path: Path) -> None:
    files = []
    for i, size in enumerate((100, 200, 300)):
        f = tmp_path / f"g{i}.onnx"
        f.write_bytes(b"x" * size)
        os.utime(f, ns=(i * 10**9, i * 10**9))
        files.append(f)
    assert evict(tmp_path, 600) == []
    assert evict(tmp_path, 500) == [files[0]]  # 600 -> 500 bytes: only the oldest goes
    assert evict(tmp_path, 0, keep=files[1]) == [files[2]]  # never the kept one, even over the limit
    assert [f.exists() for f in files] == [False, True, False]


@pytest.mark.parametrize("value", ["lots", "-5", "nan"])
def test_a_bad_size_limit_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(MAX_ENV, value)
    with pytest.raises(InvalidInput, match=f"{MAX_ENV}=.*set it to e.g. 2048"):
        cache_limit_bytes()


def test_default_size_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(MAX_ENV, raising=False)
    assert cache_limit_bytes() == DEFAULT_MAX_MB * 2**20
