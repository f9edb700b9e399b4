"""GPU readiness without a GPU: one ONNX Runtime distribution, CUDA EP options, device-resident I/O, TensorRT-RTX targets.

The CUDA paths run through a real CPU InferenceSession whose device names are recorded and mapped to the
CPU, so the data flow (what is bound where, what is uploaded when) is checked, and results are compared
with a plain session.
"""
from __future__ import annotations

from importlib import metadata

import numpy as np
import pytest

from fsdeploy.engines import ort_cuda
from fsdeploy.engines.ort_dist import check_single_distribution, installed_distributions
from fsdeploy.engines.trt_targets import check_build_target
from fsdeploy.errors import EngineError, MissingDependency


def _versions(*installed: str):
    def version(name: str) -> str:
        if name in installed:
            return "1.31.1"
        raise metadata.PackageNotFoundError(name)

    return version


def test_both_onnxruntime_distributions_give_a_one_line_fix() -> None:
    with pytest.raises(MissingDependency, match=r"onnxruntime==1.31.1 and onnxruntime-gpu==1.31.1 are both installed") as exc:
        check_single_distribution(_versions("onnxruntime", "onnxruntime-gpu"))
    msg = str(exc.value)
    assert "\n" not in msg and "pip uninstall -y onnxruntime onnxruntime-gpu && pip install 'fsdeploy[gpu]'" in msg
    check_single_distribution(_versions("onnxruntime"))
    check_single_distribution(_versions("onnxruntime-gpu"))
    assert installed_distributions(_versions("onnxruntime-gpu")) == ["onnxruntime-gpu==1.31.1"]
    assert any(d.startswith("onnxruntime==") for d in installed_distributions())  # this machine: the CPU build only


def test_require_runs_the_check_before_importing(monkeypatch) -> None:
    from fsdeploy import deps
    from fsdeploy.engines import ort_dist

    def refuse() -> None:
        raise MissingDependency("both installed")

    monkeypatch.setattr(ort_dist, "check_once", refuse)
    with pytest.raises(MissingDependency, match="both installed"):
        deps.require("onnxruntime")
    with pytest.raises(MissingDependency, match="both installed"):
        deps.require("onnxruntime.quantization")
    assert deps.require("numpy") is np


def test_cuda_provider_options_and_preload(monkeypatch) -> None:
    assert ort_cuda.provider_list(("CUDAExecutionProvider", "CPUExecutionProvider")) == [
        ("CUDAExecutionProvider", {"cudnn_conv_algo_search": "HEURISTIC", "device_id": "0"}), "CPUExecutionProvider"]
    assert ort_cuda.provider_list(("CPUExecutionProvider",)) == ["CPUExecutionProvider"]
    calls = []

    class FakeOrt:
        def preload_dlls(self) -> None:
            calls.append(1)

    fake = FakeOrt()
    ort_cuda._preloaded.cache_clear()
    assert ort_cuda.preload_cuda(fake, ("CPUExecutionProvider",)) is False and calls == []
    assert ort_cuda.preload_cuda(fake, ("CUDAExecutionProvider", "CPUExecutionProvider")) is True
    assert ort_cuda.preload_cuda(fake, ("CUDAExecutionProvider",)) is True and calls == [1]  # once per process
    ort_cuda._preloaded.cache_clear()
    assert ort_cuda.preload_cuda(object(), ("CUDAExecutionProvider",)) is False  # onnxruntime < 1.21: nothing to call
    ort_cuda._preloaded.cache_clear()


class _Recorder:
    """Routes "cuda" buffers of onnxruntime to the CPU and records each request."""

    def __init__(self, ort, monkeypatch) -> None:
        self.uploads: list[tuple[str, tuple[int, ...]]] = []
        self.bound_outputs: list[tuple[str, str]] = []
        self.sessions: list[dict] = []
        real_value, real_session = ort.OrtValue.ortvalue_from_numpy, ort.InferenceSession
        rec = self

        def value(arr, device="cpu", device_id=0):
            rec.uploads.append((device, arr.shape))
            return real_value(arr, "cpu", 0)

        class Binding:
            def __init__(self, inner) -> None:
                self.inner = inner

            def bind_ortvalue_input(self, name, v):
                self.inner.bind_ortvalue_input(name, v)

            def bind_output(self, name, device="cpu", device_id=0, *a):
                rec.bound_outputs.append((name, device))
                self.inner.bind_output(name, "cpu")

            def get_outputs(self):
                return self.inner.get_outputs()

        class Session:
            def __init__(self, model, sess_options=None, providers=None) -> None:
                rec.sessions.append({"providers": providers})
                self.inner = real_session(model, sess_options=sess_options, providers=["CPUExecutionProvider"])

            def get_providers(self):
                return ["CUDAExecutionProvider", "CPUExecutionProvider"]

            def io_binding(self):
                return Binding(self.inner.io_binding())

            def run_with_iobinding(self, b):
                self.inner.run_with_iobinding(b.inner)

            def __getattr__(self, name):
                return getattr(self.inner, name)

        monkeypatch.setattr(ort.OrtValue, "ortvalue_from_numpy", staticmethod(value))
        monkeypatch.setattr(ort, "InferenceSession", Session)
        monkeypatch.setattr(ort, "preload_dlls", lambda: None, raising=False)


def _gamma_graph() -> bytes:
    """features = images.mean((2, 3)) * gamma: a batch input and a γ-like input without a batch axis."""
    from onnx import TensorProto, helper

    g = helper.make_graph(
        [helper.make_node("ReduceMean", ["images"], ["m"], axes=[2, 3], keepdims=0), helper.make_node("Mul", ["m", "gamma"], ["features"])],
        "g",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, 4, 4]), helper.make_tensor_value_info("gamma", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 3])],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8).SerializeToString()


def test_cuda_sessions_bind_device_buffers_and_keep_gamma_resident(monkeypatch) -> None:
    import onnxruntime as ort

    from fsdeploy.engines.ort import OrtEngine, OrtOptions

    rec = _Recorder(ort, monkeypatch)
    eng = OrtEngine(_gamma_graph(), OrtOptions(providers=("CUDAExecutionProvider", "CPUExecutionProvider")))
    assert rec.sessions[0]["providers"][0] == ("CUDAExecutionProvider", {"cudnn_conv_algo_search": "HEURISTIC", "device_id": "0"})
    rng = np.random.default_rng(0)
    gamma = rng.standard_normal(3).astype(np.float32)
    for _ in range(3):  # three query batches of one task
        x = rng.standard_normal((2, 3, 4, 4)).astype(np.float32)
        out = eng.run({"images": x, "gamma": gamma})["features"]
        np.testing.assert_allclose(out, x.mean((2, 3)) * gamma, rtol=1e-5)
    assert [u for u in rec.uploads if u[1] == (3,)] == [("cuda", (3,))]  # γ crossed once
    assert sum(u[1] == (2, 3, 4, 4) for u in rec.uploads) == 3 and all(d == "cuda" for d, _ in rec.uploads)
    assert rec.bound_outputs == [("features", "cuda")] * 3
    gamma2 = gamma * 2  # a new task: a new γ is uploaded
    out = np.zeros((2, 3), np.float32)
    eng.run_into({"images": x, "gamma": gamma2}, {"features": out})
    np.testing.assert_allclose(out, x.mean((2, 3)) * gamma2, rtol=1e-5)
    assert [u for u in rec.uploads if u[1] == (3,)] == [("cuda", (3,))] * 2
    gamma2[0] += 1  # changed in place: the resident copy is compared by value, so it is refreshed
    eng.run({"images": x, "gamma": gamma2})
    assert len([u for u in rec.uploads if u[1] == (3,)]) == 3


@pytest.mark.parametrize(("cap", "fails"), [((9, 0), True), ((8, 0), True), ((8, 6), False), ((12, 0), False), ((7, 5), False)])
def test_tensorrt_rtx_targets(cap, fails) -> None:
    if fails:
        with pytest.raises(EngineError, match=rf"no SM{cap[0]}{cap[1]}; full TensorRT is not on PyPI") as exc:
            check_build_target("tensorrt_rtx", cap)
        assert "\n" not in str(exc.value) and "fsdeploy[gpu]" in str(exc.value)
    else:
        check_build_target("tensorrt_rtx", cap)
    check_build_target("tensorrt", cap)  # full TensorRT: no RTX target list to check


def test_hopper_message_names_it() -> None:
    with pytest.raises(EngineError, match=r"TensorRT-RTX cannot build for Hopper \(SM90\)"):
        check_build_target("tensorrt_rtx", (9, 0))


def test_tensorrt_compare_reports_centred_cosine() -> None:
    from fsdeploy.agreement import row_cosines
    from fsdeploy.pipeline.trt_compare import _centred

    rng = np.random.default_rng(0)
    want = (5.0 + rng.standard_normal((8, 32))).astype(np.float32)
    got = (5.0 + rng.standard_normal((8, 32))).astype(np.float32)  # same mean, image part replaced
    assert row_cosines(got, want).min() > 0.9 and _centred(got, want) < 0.6
    mu = want.astype(np.float64).mean(0)
    assert _centred(want + 1e-3, want) == pytest.approx(row_cosines(want + 1e-3 - mu, want - mu).min())
    assert np.isnan(_centred(got[:1], want[:1])) and np.isnan(_centred(None, want)) and np.isnan(_centred(got[:, :4, None], want[:, :4, None]))
