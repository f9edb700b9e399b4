"""tune: agreement measures against hand computations, the gate decides, the record drives adapt/predict."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from fsdeploy.agreement import agreement_of_features, centred_cosines, draw_episodes, row_cosines
from fsdeploy.errors import BundleError, InvalidInput
from fsdeploy.bundle import load_bundle
from fsdeploy.pipeline.tune import TUNED_KEY, Candidate, Gate, resolve_choice, tune_bundle


def _ncc(support: np.ndarray, labels: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Nearest class mean by squared Euclidean distance, written out (independent of fsdeploy.heads)."""
    protos = np.stack([support[labels == c].mean(0) for c in range(labels.max() + 1)])
    d = ((query[:, None, :].astype(np.float64) - protos[None]) ** 2).sum(-1)
    return d.argmin(1)


def test_centred_cosine_sees_what_raw_cosine_hides() -> None:
    rng = np.random.default_rng(0)
    mu = 10 * np.abs(rng.standard_normal(64))  # post-ReLU features share a large mean
    ref = mu + rng.standard_normal((50, 64))
    noise = mu + rng.standard_normal((50, 64))  # image-specific part replaced by noise
    assert row_cosines(noise, ref).min() > 0.97
    cc = centred_cosines(noise, ref, ref.mean(0))
    want = [(a - ref.mean(0)) @ (b - ref.mean(0)) / np.linalg.norm(a - ref.mean(0)) / np.linalg.norm(b - ref.mean(0)) for a, b in zip(noise, ref)]
    np.testing.assert_allclose(cc, want, rtol=1e-10)
    assert abs(cc.mean()) < 0.2


def test_decision_agreement_matches_a_hand_count() -> None:
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(6), 8)
    ref = (rng.standard_normal((6, 16))[labels] + 0.9 * rng.standard_normal((48, 16))).astype(np.float32)
    got = (ref + 0.6 * rng.standard_normal(ref.shape)).astype(np.float32)
    a = agreement_of_features(got, ref, labels, ways=4, shots=2, queries=3, episodes=30, seed=5)
    same = total = 0
    for ep in draw_episodes(labels, ways=4, shots=2, queries=3, episodes=30, seed=5):
        p_got = _ncc(got[ep.support], ep.support_labels, got[ep.query])
        p_ref = _ncc(ref[ep.support], ep.support_labels, ref[ep.query])
        same, total = same + int((p_got == p_ref).sum()), total + len(p_ref)
    assert a.decisions == total == 30 * 4 * 3 and a.decision_agreement == pytest.approx(same / total)
    assert 0.3 < a.decision_agreement < 1.0  # the perturbation flips some decisions, not all
    assert agreement_of_features(ref, ref, labels, episodes=5).decision_agreement == 1.0


def test_episodes_need_two_classes_with_enough_images() -> None:
    with pytest.raises(InvalidInput, match="need 2 classes with >= 6 images"):
        draw_episodes(np.array([0, 0, 0, 1]), ways=5, shots=5, queries=5, episodes=1)


class FakeTimer:
    """Latency by candidate label, so the test decides which engine is fastest."""

    def __init__(self, ms: dict[str, float]) -> None:
        self.ms = ms
        self.timed: list[str] = []

    def __call__(self, fns, batch):
        self.timed = list(fns)
        for fn in fns.values():
            fn()  # the query call really runs
        return {k: (self.ms.get(k.split(" (")[0], 50.0), self.ms.get(k.split(" (")[0], 50.0)) for k in fns}


CANDIDATES = [Candidate("ort", "fp32"), Candidate("ort", "int8"), Candidate("torch", "fp32")]


@pytest.fixture()
def bundle(int8_resnet18, tmp_path: Path):
    return load_bundle(shutil.copytree(int8_resnet18.bundle.path, tmp_path / "b"))


def test_a_faster_engine_is_chosen_only_when_it_passes(bundle, int8_resnet18) -> None:
    kw = {"batch": 2, "episodes": 6, "candidates": CANDIDATES, "record": False}
    fast_torch = FakeTimer({"ort fp32": 10.0, "ort int8": 2.0, "torch fp32": 1.0})
    rec = tune_bundle(bundle, int8_resnet18.glyphs, gate=Gate(0.0, -1.0), timer=fast_torch, **kw)
    assert sorted(fast_torch.timed) == ["ort fp32", "ort int8", "torch fp32"]
    assert (rec.backend, rec.precision) == ("torch", "fp32")  # everything passes: the fastest wins
    rows = {(r["backend"], r["precision"]): r for r in rec.rows}
    assert rows[("torch", "fp32")]["agreement"]["decision_agreement"] == 1.0  # torch is the FP32 module itself
    assert rows[("torch", "fp32")]["agreement"]["centred_cosine_min"] > 0.9999
    class Failing(Gate):
        def passes(self, a) -> bool:  # no candidate passes; the reference always qualifies
            return False

    failing = Failing()
    rec = tune_bundle(bundle, int8_resnet18.glyphs, gate=failing, timer=fast_torch, **kw)
    assert (rec.backend, rec.precision) == ("ort", "fp32")
    assert [r["passed"] for r in rec.rows] == [True, False, False] and [r["chosen"] for r in rec.rows] == [True, False, False]
    # int8 fastest but gated on its own measured agreement
    fast_int8 = FakeTimer({"ort fp32": 10.0, "ort int8": 1.0, "torch fp32": 5.0})
    int8 = rows[("ort", "int8")]["agreement"]
    gate = Gate(min_agreement=int8["decision_agreement"] + 1e-9, min_centred_cosine=-1.0)
    assert (tune_bundle(bundle, int8_resnet18.glyphs, gate=gate, timer=fast_int8, **kw).backend) == "torch"
    gate = Gate(min_agreement=int8["decision_agreement"], min_centred_cosine=-1.0)
    rec = tune_bundle(bundle, int8_resnet18.glyphs, gate=gate, timer=fast_int8, **kw)
    assert (rec.backend, rec.precision) == ("ort", "int8")


def test_int8_agreement_recomputed_with_plain_sessions(bundle, int8_resnet18) -> None:
    import onnxruntime as ort

    from fsdeploy.data.folders import scan_image_folder
    from fsdeploy.data.images import load_checked

    rec = tune_bundle(bundle, int8_resnet18.glyphs, batch=1, episodes=8, candidates=CANDIDATES[:2], timer=FakeTimer({}), record=False)
    files = scan_image_folder(int8_resnet18.glyphs)
    x = load_checked(files.paths, bundle.manifest.preprocess)

    def feats(path: Path) -> np.ndarray:
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["features"], {"images": x})[0]

    ref, got = feats(bundle.graph_path("features")), feats(bundle.file(bundle.manifest.find_variants("features", kind="onnx", precision="int8")[0].file))
    row = next(r for r in rec.rows if r["precision"] == "int8")["agreement"]
    mu = ref.astype(np.float64).mean(0)
    cc = row_cosines(got - mu, ref - mu)
    assert row["centred_cosine_min"] == pytest.approx(cc.min(), abs=1e-5)
    assert row["centred_cosine_mean"] == pytest.approx(cc.mean(), abs=1e-5)
    same = total = 0
    for ep in draw_episodes(files.labels, ways=5, shots=5, queries=5, episodes=8):
        a = _ncc(got[ep.support], ep.support_labels, got[ep.query])
        b = _ncc(ref[ep.support], ep.support_labels, ref[ep.query])
        same, total = same + int((a == b).sum()), total + len(a)
    assert row["decision_agreement"] == pytest.approx(same / total) and row["decisions"] == total


def test_record_drives_adapt_and_predict(bundle, int8_resnet18, monkeypatch) -> None:
    before = bundle.manifest
    rec = tune_bundle(bundle, int8_resnet18.glyphs, batch=1, episodes=4, gate=Gate(0.0, -1.0), candidates=CANDIDATES,
                      timer=FakeTimer({"ort fp32": 9.0, "ort int8": 1.0, "torch fp32": 5.0}))
    b = load_bundle(bundle.path)  # hashes still check: only the manifest changed
    assert b.manifest.bundle_id == before.bundle_id and b.manifest.extra[TUNED_KEY] == rec.to_dict()
    choice = resolve_choice(b, None, None)
    assert (choice.backend, choice.options.precision) == ("ort", "int8") and "tuned choice" in choice.note
    assert resolve_choice(b, "ort", None).options.precision == "fp32"  # told otherwise: the record is not used
    assert resolve_choice(b, None, "fp32").backend == "ort"
    monkeypatch.setattr("fsdeploy.pipeline.tune.machine_key", lambda: "another-cpu")
    other = resolve_choice(b, None, None)
    assert (other.backend, other.options.precision) == ("ort", "fp32") and "tuned on another CPU" in other.note
    monkeypatch.undo()
    import dataclasses

    stale = dataclasses.replace(b.manifest, files={**b.manifest.files, b.manifest.find_variants("features", kind="onnx", precision="int8")[0].file: "0" * 64})
    with pytest.raises(BundleError, match="re-run `fsdeploy tune"):
        resolve_choice(dataclasses.replace(b, manifest=stale), None, None)


def test_cli_tune_info_adapt(bundle, int8_resnet18, tmp_path) -> None:
    from tests.test_quantize import invoke

    code, out = invoke("tune", str(bundle.path), "--calib", str(int8_resnet18.glyphs), "--episodes", "3", "--iters", "4",
                       "--min-agreement", "1", "--min-centred-cosine", "1.5")  # only the reference can qualify
    assert code == 0, out
    assert "ort fp32 *" in out and "reference" in out and "centred cos" in out
    code, out = invoke("info", str(bundle.path))
    assert code == 0 and "tuned at batch 1: ort fp32" in out
    code, out = invoke("adapt", str(bundle.path), str(int8_resnet18.glyphs), "--head", "ncc", "--out", str(tmp_path / "t.npz"))
    assert code == 0, out
    code, out = invoke("tune", str(bundle.path), "--calib", str(int8_resnet18.glyphs), "--min-agreement", "2")
    assert code == 1 and "--min-agreement is a share between 0 and 1" in out


def test_openvino_candidates_include_bf16_mixed_where_the_cpu_has_bf16(bundle, monkeypatch) -> None:
    pytest.importorskip("openvino")
    import openvino as ov

    from fsdeploy.pipeline.tune import available_candidates

    for caps, reason in ((["FP32", "BF16"], ""), (["FP32"], "no bf16")):
        monkeypatch.setattr(ov.Core, "get_property", lambda self, device, name, caps=caps: caps)
        listed = {(c.backend, c.precision): r for c, r in available_candidates(bundle, 16)}
        assert ("openvino", "bf16-mixed") in listed and (reason in listed[("openvino", "bf16-mixed")]) and (
            listed[("openvino", "bf16-mixed")] == listed[("openvino", "bf16")])
        assert bool(listed[("openvino", "bf16-mixed")]) == bool(reason)
