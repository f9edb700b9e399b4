"""A real Triton server (the PyTriton wheel's tritonserver, 127.0.0.1, free ports) on fsdeploy repositories.

References: `fsdeploy predict`'s path (`predict_images`) and `adapt_task`, run locally on the same images and
tasks. Needs the serving venv (`bash scripts/triton_env.sh`); run with `python -m pytest -m triton`.
"""
from __future__ import annotations

import json
import multiprocessing
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fsdeploy.data.folders import scan_image_folder
from fsdeploy.bundle import Bundle
from fsdeploy.runtime import TaskArtefact, adapt_task, predict_images
from tests.helpers import glyph_folder, make_checkpoint

pytestmark = pytest.mark.triton

WEIGHTS = Path(__file__).resolve().parents[1] / "fsdeploy" / "weights"
TASK_LETTERS = {"t_abcd": "ABCD", "t_efgh": "EFGH", "t_ijkl": "IJKL"}


@pytest.fixture(scope="module")
def server_kit() -> None:
    from fsdeploy.errors import MissingDependency
    from fsdeploy.serving.server import find_server

    try:
        find_server()
    except MissingDependency as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory, server_kit: None) -> Path:
    root = tmp_path_factory.mktemp("triton")
    for i, (task, letters) in enumerate(TASK_LETTERS.items()):
        glyph_folder(root / "support" / task, letters, per_class=3, seed=i)
        glyph_folder(root / "query" / task, letters, per_class=3, seed=100 + i)
    glyph_folder(root / "support" / "live", "MNOP", per_class=4, seed=50)
    glyph_folder(root / "query" / "live", "MNOP", per_class=2, seed=150)
    glyph_folder(root / "support" / "big", "QRSTUV", per_class=10, seed=60)  # a slower adapt, to kill mid-way
    return root


def _export(kind: str, root: Path) -> Bundle:
    from fsdeploy.pipeline.export import export_bundle

    if kind == "case":
        b, _ = export_bundle("efficientnet_b0", root / "b_case", adapter="case", img_size=32,
                             checkpoint=WEIGHTS / "efficientnet_b0_glyphs_case.safetensors")
    elif kind == "plain":
        b, _ = export_bundle("efficientnet_b0", root / "b_plain", img_size=32, checkpoint=WEIGHTS / "efficientnet_b0_glyphs.safetensors")
    else:
        ck = make_checkpoint("resnet18", root / "r18.safetensors", 32)
        b, _ = export_bundle("resnet18", root / "b_r18", checkpoint=ck, img_size=32)
    return b


class Kits:
    """Bundles and task artefacts per kind, built on first use (id → file). tsa: a folded TSA task + a linear-head task."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.built: dict[str, tuple[Bundle, dict[str, Path]]] = {}

    def __getitem__(self, kind: str) -> tuple[Bundle, dict[str, Path]]:
        if kind not in self.built:
            b = _export(kind, self.work)
            tasks: dict[str, Path] = {}
            ids = list(TASK_LETTERS) if kind != "tsa" else list(TASK_LETTERS)[:2]
            for j, task in enumerate(ids):
                path = self.work / f"{kind}_{task}.npz"
                if kind == "tsa" and j == 0:
                    adapt_task(b, self.work / "support" / task, path, adapter="tsa", steps=10)
                else:
                    # linear, not ncc: fsdeploy's squared-Euclidean NCC gives probabilities that differ by ~1e-4
                    # between a batch of 1 and of 12 rows on these features (float32 cancellation in
                    # |x|^2 - 2x.p + |p|^2 at |x|^2 ~ 4e3, times scale 10), locally as much as on the server
                    adapt_task(b, self.work / "support" / task, path, head="linear")
                tasks[task] = path
            self.built[kind] = (b, tasks)
        return self.built[kind]


@pytest.fixture(scope="module")
def kits(work: Path) -> Kits:
    return Kits(work)


def _serve(repo: Path) -> Iterator:
    from fsdeploy.serving import TritonServer

    server = TritonServer(repo, log=repo.parent / f"{repo.name}.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _write(kind: str, kits: dict, work: Path, name: str | None = None, **kw: object) -> Path:
    from fsdeploy.serving import write_repository

    bundle, tasks = kits[kind]
    info = write_repository(bundle.path, [f"{t}={p}" for t, p in tasks.items()], work / (name or f"repo_{kind}"), threads=1, **kw)
    return info.path


def _local(bundle: Bundle, task_path: Path, files: list[Path]) -> list:
    task = TaskArtefact.load(task_path)
    return predict_images(bundle, task, files, topk=len(task.classes))


@pytest.mark.parametrize("kind", ["plain", "case", "tsa"])
def test_classify_equals_local_predict(kind: str, kits: dict, work: Path) -> None:
    from fsdeploy.data.images import load_checked
    from fsdeploy.serving import Client

    bundle, tasks = kits[kind]
    repo = _write(kind, kits, work, topk=4)
    for server in _serve(repo):
        with Client(server.url) as c:
            for task_id, path in tasks.items():
                files = sorted((work / "query" / task_id).rglob("*.png"))
                local = _local(bundle, path, files)
                one_by_one = [c.classify([f.read_bytes()], task_id)[0] for f in files]
                batched = c.classify([f.read_bytes() for f in files], task_id)
                pixels = c.classify_pixels(load_checked(files, bundle.manifest.preprocess), task_id)
                for how, answers in (("one by one", one_by_one), ("batched", batched), ("pixels", pixels)):
                    for a, ref in zip(answers, local, strict=True):
                        assert a.labels == ref.labels[:4], (task_id, how)
                        np.testing.assert_allclose(a.scores, ref.probs[:4], atol=1e-5, rtol=0, err_msg=f"{task_id} {how}")
                        np.testing.assert_allclose(np.sort(a.probs)[::-1], ref.probs, atol=1e-5, rtol=0, err_msg=f"{task_id} {how}")
            # a multi-image request runs as one features execution (merging single-image requests: the load test)
            assert max(c.batch_stats("features")) > 1


def test_load_16_clients_with_live_adapt(kits: dict, work: Path) -> None:
    """16 clients x 3 tasks x 200 requests on the CaSE repository while a new task is adapted on the server."""
    from fsdeploy.serving import Client

    bundle, tasks = kits["case"]
    repo = _write("case", kits, work, name="repo_load", max_batch=32)
    pools = {}
    for task_id, path in tasks.items():
        files = sorted((work / "query" / task_id).rglob("*.png"))
        pools[task_id] = [(f.read_bytes(), ref) for f, ref in zip(files, _local(bundle, path, files))]
    # local predict, one image per call, as the per-request baseline
    t0 = time.perf_counter()
    local_ms = []
    for task_id, path in tasks.items():
        task = TaskArtefact.load(path)
        for f in sorted((work / "query" / task_id).rglob("*.png")):
            s = time.perf_counter()
            predict_images(bundle, task, [f])
            local_ms.append((time.perf_counter() - s) * 1e3)
    local_rate = len(local_ms) / (time.perf_counter() - t0)
    # and with the engines already open (predict_images opens them per call, as the CLI does)
    from fsdeploy.data.images import load_checked
    from fsdeploy.heads.pipeline import TaskModel
    from fsdeploy.runtime import feature_path

    warm_ms = []
    path = feature_path(bundle)
    try:
        for task_id, p in tasks.items():
            task = TaskArtefact.load(p)
            model = TaskModel.from_state(task.model_state)
            for f in sorted((work / "query" / task_id).rglob("*.png")):
                s = time.perf_counter()
                model.predict_proba(path.query(load_checked([f], bundle.manifest.preprocess), task.task_state))
                warm_ms.append((time.perf_counter() - s) * 1e3)
    finally:
        path.close()
    clients, per_task = 16, 200
    errors: list[str] = []
    latencies: list[float] = []
    lock = threading.Lock()
    live_info: dict = {}

    def worker(k: int, url: str) -> None:
        rng = np.random.default_rng(k)
        mine: list[float] = []
        with Client(url) as c:
            for i in range(per_task * len(pools)):
                task_id = list(pools)[i % len(pools)]
                blob, ref = pools[task_id][int(rng.integers(len(pools[task_id])))]
                s = time.perf_counter()
                try:
                    a = c.classify([blob], task_id)[0]
                except Exception as exc:  # collected and asserted below
                    with lock:
                        errors.append(str(exc))
                    continue
                mine.append((time.perf_counter() - s) * 1e3)
                if a.labels[0] != ref.labels[0] or np.abs(np.asarray(a.scores) - np.asarray(ref.probs[: len(a.scores)])).max() > 1e-5:
                    with lock:
                        errors.append(f"{task_id}: {a.labels} {a.scores} != {ref.labels} {ref.probs}")
        with lock:
            latencies.extend(mine)

    def adapter(url: str) -> None:
        time.sleep(3.0)  # the load is running by then
        files = scan_image_folder(work / "support" / "live")
        with Client(url) as c:
            live_info.update(c.adapt("live", [Path(p).read_bytes() for p in files.paths],
                                     [files.classes[i] for i in files.labels], head="linear"))

    for server in _serve(repo):
        threads = [threading.Thread(target=worker, args=(k, server.url)) for k in range(clients)]
        threads.append(threading.Thread(target=adapter, args=(server.url,)))
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        with Client(server.url) as c:
            stats = c.batch_stats("features")
            # the task adapted on the server answers like one adapted locally on the same support set
            local_task, _ = adapt_task(bundle, work / "support" / "live", work / "live_local.npz", head="linear")
            served = TaskArtefact.load(repo / "tasks" / "live.npz")
            np.testing.assert_allclose(served.task_state["gamma"], local_task.task_state["gamma"], atol=1e-5, rtol=0)
            files = sorted((work / "query" / "live").rglob("*.png"))
            local = _local(bundle, work / "live_local.npz", files)
            got = c.classify([f.read_bytes() for f in files], "live")
            for a, ref in zip(got, local, strict=True):
                assert a.labels[0] == ref.labels[0]
                np.testing.assert_allclose(a.scores[0], ref.probs[0], atol=1e-4)
        assert server.ready()
    assert not errors, errors[:5]
    assert len(latencies) == clients * per_task * len(pools)
    assert live_info["task"] == "live" and live_info["classes"] == list("MNOP")
    assert max(stats) > 1, stats
    report = {
        "requests": len(latencies), "wall_s": round(wall, 2), "throughput_per_s": round(len(latencies) / wall, 1),
        "p50_ms": round(float(np.percentile(latencies, 50)), 2), "p99_ms": round(float(np.percentile(latencies, 99)), 2),
        "local_predict_per_s": round(local_rate, 1), "local_p50_ms": round(float(np.percentile(local_ms, 50)), 2),
        "local_p99_ms": round(float(np.percentile(local_ms, 99)), 2),
        "local_warm_per_s": round(1e3 / float(np.mean(warm_ms)), 1), "local_warm_p50_ms": round(float(np.percentile(warm_ms, 50)), 2),
        "features_batches": {str(k): v for k, v in sorted(stats.items())}, "adapt_s": live_info.get("seconds"),
    }
    print("\ntriton load report:", json.dumps(report))
    (work / "load_report.json").write_text(json.dumps(report, indent=2))


def test_faults_and_live_task_changes(kits: dict, work: Path) -> None:
    from fsdeploy.serving import Client, ServerError, add_task, remove_task

    bundle, tasks = kits["plain"]
    repo = _write("plain", kits, work, name="repo_faults")
    files = sorted((work / "query" / "t_abcd").rglob("*.png"))
    ref = _local(bundle, tasks["t_abcd"], files)
    # The steady client runs in a spawned process, not a thread: tritonclient's HTTP client is gevent-based, and with
    # a second client looping in another thread of the same process, a request of the main thread once reached the
    # server with an unparseable binary part. (A forked child inherits the parent's gevent hub and hangs.)
    ctx = multiprocessing.get_context("spawn")
    stop, served, bad = ctx.Event(), ctx.Value("i", 0), ctx.Manager().list()
    expected = [(r.labels[0], float(r.probs[0])) for r in ref]

    for server in _serve(repo):
        t = ctx.Process(target=_steady, args=(server.url, files, expected, stop, served, bad))
        t.start()
        deadline = time.monotonic() + 120  # a spawned interpreter imports fsdeploy and tritonclient first
        while served.value < 3 and t.is_alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        try:
            with Client(server.url) as c:
                image = files[0].read_bytes()
                with pytest.raises(ServerError, match="unknown task id 'nope'"):
                    c.classify([image], "nope")
                with pytest.raises(ServerError, match="not a decodable image"):
                    c.classify([image[: len(image) // 2]], "t_efgh")
                with pytest.raises(ServerError, match="not a decodable image"):
                    c.classify([b"GIF89a garbage"], "t_efgh")
                (repo / "tasks" / "t_efgh.npz").unlink()
                with pytest.raises(ServerError, match="unknown task id 't_efgh'"):
                    c.classify([image], "t_efgh")
                (repo / "tasks" / "t_ijkl.npz").write_bytes(b"PK\x03\x04 this is not a task")
                with pytest.raises(ServerError, match="unusable"):
                    c.classify([image], "t_ijkl")
                # tasks added, replaced and removed while serving
                add_task(repo / "tasks", "again", tasks["t_efgh"])
                efgh_files = sorted((work / "query" / "t_efgh").rglob("*.png"))
                efgh_ref = _local(bundle, tasks["t_efgh"], efgh_files)
                got = c.classify([f.read_bytes() for f in efgh_files], "again")
                assert [a.labels[0] for a in got] == [r.labels[0] for r in efgh_ref]
                add_task(repo / "tasks", "t_ijkl", tasks["t_ijkl"])  # repaired by replacing the file
                assert c.classify([image], "t_ijkl")[0].labels[0] in "IJKL"
                remove_task(repo / "tasks", "again")
                with pytest.raises(ServerError, match="unknown task id 'again'"):
                    c.classify([image], "again")
                with pytest.raises(ServerError, match="at least 2 classes"):
                    c.adapt("one", [image, image], ["A", "A"])
                with pytest.raises(ServerError, match="not valid"):
                    c.adapt("../evil", [image, image], ["A", "B"])
            time.sleep(0.5)
        finally:
            stop.set()
            t.join()
        assert server.ready()
    assert served.value > 5 and not bad, list(bad)[:5]


def _steady(url: str, files: list[Path], expected: list[tuple[str, float]], stop, served, bad) -> None:
    """Classify `files` for task t_abcd in a loop until `stop`, recording any answer that differs from `expected`."""
    from fsdeploy.serving import Client

    with Client(url) as c:
        while not stop.is_set():
            i = served.value % len(files)
            try:
                a = c.classify([files[i].read_bytes()], "t_abcd")[0]
                if a.labels[0] != expected[i][0] or abs(a.scores[0] - expected[i][1]) > 1e-5:
                    bad.append(f"changed answer {a} vs {expected[i]}")
            except Exception as exc:  # collected and asserted by the test
                bad.append(str(exc))
            served.value += 1


def _stub_pid(model_dir: Path) -> int:
    """The Python-backend stub process serving `model_dir` (its command line names the model's model.py)."""
    want = str(model_dir.resolve() / "1" / "model.py")
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if want in (proc / "cmdline").read_bytes().decode(errors="replace"):
                    return int(proc.name)
            except OSError:
                continue
    raise AssertionError(f"no stub process for {model_dir}")


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (/proc/PID/stat fields 14 and 15)."""
    import os

    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_kill_mid_adapt_leaves_repository_loadable(kits: dict, work: Path) -> None:
    from fsdeploy.serving import Client, ServerError, TritonServer

    bundle, tasks = kits["plain"]
    repo = _write("plain", kits, work, name="repo_kill")
    before = {p.name: p.read_bytes() for p in (repo / "tasks").iterdir()}
    files = scan_image_folder(work / "support" / "big")
    images = [Path(p).read_bytes() for p in files.paths]
    labels = [files.classes[i] for i in files.labels]
    server = TritonServer(repo, log=work / "kill.log").start()
    outcome: list[object] = []

    def adapt() -> None:
        try:
            with Client(server.url) as c:
                outcome.append(c.adapt("big", images, labels, head="linear", head_opts={"iters": 100_000, "batch": 16}))
        except Exception as exc:  # the connection dies with the server
            outcome.append(exc)

    t = threading.Thread(target=adapt)
    t.start()
    # kill once the adapt model's stub has spent 1 s of CPU on this request: decoding and features are done
    # and the long head fit (100,000 steps) is under way, on a fast machine as on a loaded one
    stub = _stub_pid(repo / "models" / "adapt")
    start = _cpu_s(stub)
    deadline = time.monotonic() + 120
    while _cpu_s(stub) - start < 1.0 and time.monotonic() < deadline and not outcome:
        time.sleep(0.05)
    server.kill()
    t.join(60)
    server.stop()
    assert outcome and isinstance(outcome[0], Exception), outcome  # it was killed before finishing
    names = {p.name for p in (repo / "tasks").iterdir() if not p.name.startswith(".")}
    assert names == set(before)  # no half-written (or any) big.npz; the old tasks are byte-identical
    for name, data in before.items():
        assert (repo / "tasks" / name).read_bytes() == data
    # the repository loads and serves again; the interrupted task can be adapted now
    for server2 in _serve(repo):
        with Client(server2.url) as c:
            q = sorted((work / "query" / "t_abcd").rglob("*.png"))
            ref = _local(bundle, tasks["t_abcd"], q)
            assert [a.labels[0] for a in c.classify([f.read_bytes() for f in q], "t_abcd")] == [r.labels[0] for r in ref]
            with pytest.raises(ServerError, match="unknown task id 'big'"):
                c.classify([images[0]], "big")
            info = c.adapt("big", images, labels, head="ncc")
            assert info["classes"] == list("QRSTUV")
            assert c.classify([images[0]], "big")[0].labels[0] == labels[0]


def test_cli_serve_prints_endpoints_and_stops_on_ctrl_c(kits: dict, work: Path) -> None:
    import os
    import signal
    import subprocess
    import sys

    from fsdeploy.serving import Client

    bundle, tasks = kits["plain"]
    repo = _write("plain", kits, work, name="repo_cli")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen([sys.executable, "-m", "fsdeploy.cli", "triton", "serve", str(repo), "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        endpoints = json.loads(proc.stdout.readline())
        assert endpoints["http"].startswith("http://127.0.0.1:")
        files = sorted((work / "query" / "t_abcd").rglob("*.png"))[:2]
        ref = _local(bundle, tasks["t_abcd"], files)
        with Client(endpoints["http"].removeprefix("http://")) as c:
            assert [a.labels[0] for a in c.classify([f.read_bytes() for f in files], "t_abcd")] == [r.labels[0] for r in ref]
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0, proc.stderr.read()
