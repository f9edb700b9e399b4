"""The Triton repository writer and its Python-model roles, without a server (the default suite).

References: the bundle's own graphs and `fsdeploy predict`'s path (load_checked → feature_path →
TaskModel), a numpy re-statement of CaSE's per-row scaling for the batched-γ rewrite, and Triton's rule
that an ensemble step may only map names its model declares.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from fsdeploy.data.images import load_checked
from fsdeploy.errors import BundleError, InvalidInput, UnknownName
from fsdeploy.bundle import load_bundle
from fsdeploy.heads.pipeline import TaskModel
from fsdeploy.runtime import feature_path
from fsdeploy.serving.batched_gamma import batched_gamma_graph, validate_batched
from fsdeploy.serving.repository import write_repository
from fsdeploy.serving.roles import (
    FeaturesRole,
    HeadRole,
    PreprocessRole,
    TaskStateRole,
    make_role,
)
from fsdeploy.serving.store import TaskStore, UnknownTask, add_task, remove_task
from fsdeploy.runtime import TaskArtefact, adapt_task
from tests.helpers import glyph_folder, make_checkpoint


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A resnet18 bundle at 32 px (realistic random init), a support and a query folder, one linear-head task."""
    from fsdeploy.pipeline.export import export_bundle

    root = tmp_path_factory.mktemp("triton_plain")
    ck = make_checkpoint("resnet18", root / "r18.safetensors", 32)
    bundle, _ = export_bundle("resnet18", root / "bundle", checkpoint=ck, img_size=32)
    support = glyph_folder(root / "support", "ABC", per_class=3, seed=0)
    query = glyph_folder(root / "query", "ABC", per_class=2, seed=7)
    # linear: the squared-Euclidean NCC head is not batch-size invariant to 1e-5 in float32 (see test_triton_server)
    task, _ = adapt_task(bundle, support, root / "letters.npz", head="linear")
    return {"root": root, "bundle": bundle, "task": task, "task_path": root / "letters.npz", "query": sorted(query.rglob("*.png"))}


def _configs(repo: Path) -> dict[str, str]:
    return {p.parent.name: p.read_text() for p in (repo / "models").glob("*/config.pbtxt")}


def _io_names(text: str, key: str) -> set[str]:
    block = re.search(rf"^{key} \[\n(.*?)\n\]", text, re.S | re.M)
    return set(re.findall(r'name: "([^"]+)"', block.group(1))) if block else set()


def _check_ensembles(configs: dict[str, str]) -> int:
    """Every ensemble step maps only inputs/outputs its model declares; ensemble tensors flow from an input or
    an earlier step. Returns the number of steps checked."""
    checked = 0
    for name, text in configs.items():
        if 'platform: "ensemble"' not in text:
            continue
        available = _io_names(text, "input")
        for step in re.findall(r"\{\n\s+model_name: \"(\w+)\"(.*?)\n    \}", text, re.S):
            model, body = step
            ins = dict(re.findall(r'input_map \{ key: "(\w+)" value: "(\w+)" \}', body))
            outs = dict(re.findall(r'output_map \{ key: "(\w+)" value: "(\w+)" \}', body))
            assert set(ins) <= _io_names(configs[model], "input"), (name, model, ins)
            assert set(outs) <= _io_names(configs[model], "output"), (name, model, outs)
            assert set(ins.values()) <= available, (name, model, ins, available)
            available |= set(outs.values())
            checked += 1
        assert _io_names(text, "output") <= available
    return checked


def test_python_repository_layout_and_ensemble_wiring(plain: dict, tmp_path: Path) -> None:
    info = write_repository(plain["bundle"].path, [plain["task_path"]], tmp_path / "repo", max_batch=16, topk=2, threads=1)
    repo = info.path
    assert (repo / "tasks" / "letters.npz").is_file() and (repo / "bundle" / "manifest.json").is_file()
    load_bundle(repo / "bundle")  # the copy is hash-checked
    configs = _configs(repo)
    assert set(configs) == {"preprocess", "task_state", "features", "head", "adapt", "classify", "classify_pixels"}
    assert _check_ensembles(configs) == 7  # classify: 4 steps, classify_pixels: 3
    for name in ("preprocess", "task_state", "features", "head"):
        assert "max_batch_size: 16" in configs[name] and "dynamic_batching" in configs[name]
        assert (repo / "models" / name / "1" / "model.py").is_file()
    assert "max_batch_size: 0" in configs["adapt"] and "dynamic_batching" not in configs["adapt"]
    assert (repo / "models" / "features" / "1" / "model.onnx").read_bytes() == plain["bundle"].graph_path("features").read_bytes()
    assert 'key: "topk" value: { string_value: "2" }' in configs["head"]


@pytest.mark.parametrize("device", ["gpu", "cpu"], ids=["tensorrt_fp16", "openvino"])  # an id "gpu" would be skipped as a GPU test
def test_onnxruntime_configs(plain: dict, tmp_path: Path, device: str) -> None:
    info = write_repository(plain["bundle"].path, [plain["task_path"]], tmp_path / "repo", backend="onnxruntime", device=device)
    configs = _configs(info.path)
    feats = configs["features"]
    assert 'platform: "onnxruntime_onnx"' in feats and "backend:" not in feats
    assert _io_names(feats, "input") == {"images"} and _io_names(feats, "output") == {"features"}
    if device == "gpu":
        assert "KIND_GPU" in feats and "gpu_execution_accelerator" in feats
        assert 'name : "tensorrt"' in feats and 'key: "precision_mode" value: "FP16"' in feats
    else:
        assert "KIND_CPU" in feats and 'cpu_execution_accelerator : [ { name : "openvino" } ]' in feats
    assert _check_ensembles(configs) == 7
    # the graph Triton's ONNX Runtime backend will load takes a batch dimension on every input
    graph = onnx.load(str(info.path / "models" / "features" / "1" / "model.onnx"))
    assert all(i.type.tensor_type.shape.dim[0].dim_param for i in graph.graph.input)


def test_tensorrt_config_and_plan_script(plain: dict, tmp_path: Path) -> None:
    info = write_repository(plain["bundle"].path, [], tmp_path / "repo", backend="tensorrt", max_batch=8)
    feats = _configs(info.path)["features"]
    assert 'platform: "tensorrt_plan"' in feats and "KIND_GPU" in feats and "max_batch_size: 8" in feats
    script = (info.path / "models" / "features" / "build_plan.sh").read_text()
    assert "--fp16" in script and "--maxShapes=images:8x3x32x32" in script and "--saveEngine=model.plan" in script
    assert info.pending == ("models/features/1/model.plan",)
    from fsdeploy.serving.server import TritonServer

    with pytest.raises(InvalidInput, match="build_plan.sh"):
        TritonServer(info.path)
    with pytest.raises(InvalidInput, match="runs on a GPU"):
        write_repository(plain["bundle"].path, [], tmp_path / "r2", backend="tensorrt", device="cpu")


def test_bad_exports_are_refused_and_leave_nothing(plain: dict, tmp_path: Path) -> None:
    with pytest.raises(UnknownName, match="--backend"):
        write_repository(plain["bundle"].path, [], tmp_path / "r", backend="tflite")
    with pytest.raises(InvalidInput, match="task id"):
        write_repository(plain["bundle"].path, [f"bad id={plain['task_path']}"], tmp_path / "r")
    folded = TaskArtefact(**{**plain["task"].__dict__, "task_state": {"graph": np.frombuffer(b"x", np.uint8)}})
    folded.save(tmp_path / "folded.npz")
    with pytest.raises(InvalidInput, match="--backend python"):
        write_repository(plain["bundle"].path, [tmp_path / "folded.npz"], tmp_path / "r", backend="onnxruntime")
    other = TaskArtefact(**{**plain["task"].__dict__, "bundle_id": "0" * 64})
    other.save(tmp_path / "other.npz")
    with pytest.raises(BundleError, match="re-run `fsdeploy adapt`"):
        write_repository(plain["bundle"].path, [tmp_path / "other.npz"], tmp_path / "r")
    assert not (tmp_path / "r").exists() and not list(tmp_path.glob(".r.*"))


def test_roles_equal_fsdeploy_predict_path(plain: dict, tmp_path: Path) -> None:
    """preprocess → task_state → features → head, called as Triton would (several requests per execute)."""
    info = write_repository(plain["bundle"].path, [plain["task_path"]], tmp_path / "repo")
    bundle, task, files = plain["bundle"], plain["task"], plain["query"]
    pre = make_role("preprocess", info.path, {})
    state = make_role("task_state", info.path, {})
    feats = make_role("features", info.path, {"threads": "1"})
    head = make_role("head", info.path, {"topk": "3"})
    reqs = [{"IMAGE": np.array([[f.read_bytes()]], dtype=object)} for f in files[:3]]
    reqs.append({"IMAGE": np.array([[f.read_bytes()] for f in files[3:]], dtype=object)})
    pixels = pre.run(reqs)
    ref_pixels = load_checked(files, bundle.manifest.preprocess)
    np.testing.assert_array_equal(np.concatenate([p["PIXELS"] for p in pixels]), ref_pixels)
    ids = [{"TASK_ID": np.array([[b"letters"]] * len(p["PIXELS"]), dtype=object)} for p in pixels]
    keys = state.run(ids)
    freqs = [{"PIXELS": p["PIXELS"], "TASK_KEY": k["TASK_KEY"]} for p, k in zip(pixels, keys)]
    got_feats = feats.run(freqs)
    path = feature_path(bundle)
    try:
        ref_feats = path.query(ref_pixels, {})
    finally:
        path.close()
    np.testing.assert_allclose(np.concatenate([f["FEATURES"] for f in got_feats]), ref_feats, atol=1e-5, rtol=0)
    outs = head.run([{"FEATURES": f["FEATURES"], "TASK_KEY": k["TASK_KEY"]} for f, k in zip(got_feats, keys)])
    probs = np.concatenate([o["PROBS"] for o in outs])
    ref = TaskModel.from_state(task.model_state).predict_proba(ref_feats)
    np.testing.assert_allclose(probs, ref, atol=1e-5, rtol=0)
    labels = np.concatenate([o["LABELS"] for o in outs])
    assert [row[0].decode() for row in labels] == [task.classes[i] for i in ref.argmax(1)]
    scores = np.concatenate([o["SCORES"] for o in outs])
    np.testing.assert_allclose(scores, -np.sort(-ref, axis=1)[:, :3], atol=1e-6)
    for role in (pre, state, feats, head):
        role.close()


def test_per_request_errors_leave_other_requests_answered(plain: dict, tmp_path: Path) -> None:
    info = write_repository(plain["bundle"].path, [plain["task_path"]], tmp_path / "repo")
    tasks = info.path / "tasks"
    pre = PreprocessRole(plain["bundle"].manifest.preprocess)
    good = plain["query"][0].read_bytes()
    out = pre.run([{"IMAGE": np.array([[good]], dtype=object)}, {"IMAGE": np.array([[good[:40]]], dtype=object)}])
    assert out[0]["PIXELS"].shape == (1, 3, 32, 32)
    assert isinstance(out[1], InvalidInput) and "not a decodable image" in str(out[1])
    store = TaskStore(tasks, plain["bundle"].manifest.bundle_id)
    state = TaskStateRole(store, case=False)
    ask = lambda t: {"TASK_ID": np.array([[t.encode()]], dtype=object)}
    res = state.run([ask("letters"), ask("nope"), ask("../etc")])
    assert res[0]["TASK_KEY"][0, 0].decode().startswith("letters@")
    assert isinstance(res[1], UnknownTask) and "letters" in str(res[1])
    assert isinstance(res[2], InvalidInput) and "not valid" in str(res[2])
    # replaced on disk: the next request sees the new version; the old key still resolves for requests in flight
    old_key = res[0]["TASK_KEY"][0, 0].decode()
    add_task(tasks, "letters", plain["task_path"])
    new_key = state.run([ask("letters")])[0]["TASK_KEY"][0, 0].decode()
    assert new_key != old_key and store.by_key(old_key).version == old_key.split("@")[1]
    # corrupted in place, then deleted
    (tasks / "letters.npz").write_bytes(b"not an npz at all")
    res = state.run([ask("letters")])
    assert isinstance(res[0], BundleError) and "unusable" in str(res[0])
    remove_task(tasks, "letters")
    assert isinstance(state.run([ask("letters")])[0], UnknownTask)
    with pytest.raises(UnknownTask):
        remove_task(tasks, "letters")
    head = HeadRole(TaskStore(tasks, plain["bundle"].manifest.bundle_id), topk=2)
    res = head.run([{"FEATURES": np.zeros((1, 512), np.float32), "TASK_KEY": np.array([[new_key.encode()]], dtype=object)}])
    assert isinstance(res[0], UnknownTask)


def _toy_case_graph(path: Path, channels: tuple[int, ...] = (3, 5)) -> None:
    """images (N,3,4,4) → per site: scale by γ slice (Slice axis 0, Reshape (1,C,1,1)), 1x1 conv to the next
    width; features = spatial mean scaled by the last slice (Reshape (1,-1)), as the CaSE export writes."""
    rng = np.random.default_rng(0)
    nodes, inits = [], []
    x, offset, prev = "images", 0, 3
    for k, c in enumerate(channels):
        w = rng.standard_normal((c, prev, 1, 1)).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{k}")]
        nodes.append(helper.make_node("Conv", [x, f"w{k}"], [f"conv{k}"]))
        for name, val in ((f"s{k}", [offset]), (f"e{k}", [offset + c]), (f"a{k}", [0]), (f"t{k}", [1])):
            nodes.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.array(val, np.int64))))
        nodes.append(helper.make_node("Constant", [], [f"sh{k}"], value=numpy_helper.from_array(np.array([1, c, 1, 1], np.int64))))
        nodes.append(helper.make_node("Slice", ["gamma", f"s{k}", f"e{k}", f"a{k}", f"t{k}"], [f"g{k}"]))
        nodes.append(helper.make_node("Reshape", [f"g{k}", f"sh{k}"], [f"r{k}"]))
        nodes.append(helper.make_node("Mul", [f"conv{k}", f"r{k}"], [f"x{k}"]))
        x, offset, prev = f"x{k}", offset + c, c
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["pool"]))
    nodes.append(helper.make_node("Flatten", ["pool"], ["flat"]))
    for name, val in (("sL", [offset]), ("eL", [offset + prev]), ("aL", [0]), ("tL", [1]), ("shL", [1, -1])):
        nodes.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.array(val, np.int64))))
    nodes += [helper.make_node("Slice", ["gamma", "sL", "eL", "aL", "tL"], ["gL"]),
              helper.make_node("Reshape", ["gL", "shL"], ["rL"]), helper.make_node("Mul", ["flat", "rL"], ["features"])]
    g = sum(channels) + prev
    graph = helper.make_graph(
        nodes, "toy_case",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, 4, 4]), helper.make_tensor_value_info("gamma", TensorProto.FLOAT, [g])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", prev])], initializer=inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def test_batched_gamma_rewrite_scales_each_row_by_its_own_gamma(tmp_path: Path) -> None:
    _toy_case_graph(tmp_path / "q.onnx")
    batched = batched_gamma_graph(tmp_path / "q.onnx")
    model = onnx.load_from_string(batched)
    gamma_in = [i for i in model.graph.input if i.name == "gamma"][0]
    assert [d.dim_param or d.dim_value for d in gamma_in.type.tensor_type.shape.dim] == ["batch", 13]
    rng = np.random.default_rng(1)
    images = rng.standard_normal((4, 3, 4, 4)).astype(np.float32)
    gammas = rng.uniform(0.5, 1.5, (4, 13)).astype(np.float32)
    got = ort.InferenceSession(batched, providers=["CPUExecutionProvider"]).run(None, {"images": images, "gamma": gammas})[0]
    # numpy reference of the toy graph, one row at a time with its own γ
    init = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(tmp_path / "q.onnx")).graph.initializer}
    ref = []
    for img, gam in zip(images, gammas):
        x = img
        x = np.einsum("oc,chw->ohw", init["w0"][:, :, 0, 0], x) * gam[0:3, None, None]
        x = np.einsum("oc,chw->ohw", init["w1"][:, :, 0, 0], x) * gam[3:8, None, None]
        ref.append(x.mean((1, 2)) * gam[8:13])
    np.testing.assert_allclose(got, np.stack(ref), atol=1e-5, rtol=1e-5)
    check = validate_batched(tmp_path / "q.onnx", batched, (3, 4, 4), gammas[:3])
    assert check.passed and check.max_abs < 1e-6 and check.rows == 6


def test_batched_gamma_refuses_unknown_patterns(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Add", ["images", "gamma"], ["features"])], "bad",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 4]), helper.make_tensor_value_info("gamma", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 4])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "bad.onnx"))
    with pytest.raises(BundleError, match="not a Slice on axis 0"):
        batched_gamma_graph(tmp_path / "bad.onnx")


def test_features_role_mixes_tasks_in_one_run(tmp_path: Path) -> None:
    """CaSE features: rows of different tasks in one execute equal the per-task query graph."""
    _toy_case_graph(tmp_path / "q.onnx")
    (tmp_path / "b.onnx").write_bytes(batched_gamma_graph(tmp_path / "q.onnx"))
    role = FeaturesRole(tmp_path / "b.onnx", case=True, store=None, threads=1, max_rows=3)
    rng = np.random.default_rng(2)
    reqs = [{"PIXELS": rng.standard_normal((n, 3, 4, 4)).astype(np.float32),
             "GAMMA": np.repeat(rng.uniform(0.5, 1.5, (1, 13)).astype(np.float32), n, 0)} for n in (1, 2, 4)]
    reqs.append({"PIXELS": np.zeros((2, 3, 4, 4), np.float32)})  # no γ: fails alone
    out = role.run(reqs)
    ref_sess = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"])
    for req, res in zip(reqs[:3], out[:3]):
        ref = ref_sess.run(None, {"images": req["PIXELS"], "gamma": req["GAMMA"][0]})[0]
        np.testing.assert_allclose(res["FEATURES"], ref, atol=1e-6)
    assert isinstance(out[3], InvalidInput)
    role.close()


def test_cli_export_add_remove(plain: dict, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from fsdeploy.cli import app

    runner = CliRunner()
    repo = tmp_path / "repo"
    res = runner.invoke(app, ["triton", "export", str(plain["bundle"].path), f"t1={plain['task_path']}", "--out", str(repo),
                              "--max-batch", "8", "--json"], standalone_mode=False, catch_exceptions=True)
    assert res.exception is None, res.output
    out = json.loads(res.output)
    assert out["tasks"] == ["t1"] and "classify" in out["models"] and out["backend"] == "python"
    assert "max_batch_size: 8" in (repo / "models" / "features" / "config.pbtxt").read_text()
    res = runner.invoke(app, ["triton", "add-task", str(repo), str(plain["task_path"]), "--id", "t2"], standalone_mode=False)
    assert res.exception is None and (repo / "tasks" / "t2.npz").is_file()
    res = runner.invoke(app, ["triton", "remove-task", str(repo), "t2"], standalone_mode=False)
    assert res.exception is None and not (repo / "tasks" / "t2.npz").exists()
    res = runner.invoke(app, ["triton", "remove-task", str(repo), "t2"], standalone_mode=False, catch_exceptions=True)
    assert isinstance(res.exception, UnknownTask)
    res = runner.invoke(app, ["triton", "export", str(plain["bundle"].path), "--out", str(tmp_path / "x"), "--backend", "tflite"],
                        standalone_mode=False, catch_exceptions=True)
    assert isinstance(res.exception, UnknownName) and "python, onnxruntime, tensorrt" in str(res.exception)


def test_store_keeps_at_most_max_tasks_loaded(plain: dict, tmp_path: Path) -> None:
    for name in ("a", "b", "c"):
        add_task(tmp_path, name, plain["task_path"])
    store = TaskStore(tmp_path, plain["bundle"].manifest.bundle_id, max_tasks=2)
    keys = [store.resolve(n).key for n in ("a", "b", "a", "c")]
    assert list(store._entries) == ["a", "c"]  # b was the least recently used
    assert store.resolve("b").key == keys[1]  # read again from disk, same version
    assert store.known() == ["a", "b", "c"]


def test_server_refuses_repository_paths_its_stub_cannot_take(plain: dict, tmp_path: Path) -> None:
    from fsdeploy.serving.server import TritonServer

    info = write_repository(plain["bundle"].path, [], tmp_path / "my repo")
    with pytest.raises(InvalidInput, match="move the repository"):
        TritonServer(info.path)
