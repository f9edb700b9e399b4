"""What each Python-backend model of the repository computes, free of Triton types so it is testable alone.

A role takes the requests of one `execute` call (each a dict of input name → numpy array, batch first)
and returns, per request, a dict of outputs or the exception that request failed with. One bad request
(an unknown task, an undecodable image) fails alone; the others in the same batch are answered.
Roles that run an engine merge every request's rows into one engine run: that is the dynamic batching.
"""
from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

from fsdeploy.errors import InvalidInput
from fsdeploy.serving import links
from fsdeploy.serving.store import TaskEntry, TaskStore, check_task_id

Request = dict[str, np.ndarray]
Result = dict[str, np.ndarray] | Exception
MANIFEST = "fsdeploy_repository.json"


class Role(Protocol):
    inputs: tuple[str, ...]

    def run(self, requests: Sequence[Request]) -> list[Result]: ...

    def close(self) -> None: ...


def _strings(arr: np.ndarray) -> list[str]:
    return [x.decode("utf-8") if isinstance(x, bytes | np.bytes_) else str(x) for x in np.asarray(arr).reshape(-1)]


def _bytes_array(rows: list[list[str]]) -> np.ndarray:
    width = max((len(r) for r in rows), default=0)
    out = np.empty((len(rows), width), dtype=object)
    for i, r in enumerate(rows):
        out[i] = [s.encode("utf-8") for s in r] + [b""] * (width - len(r))
    return out


def decode_image(data: bytes, cfg: links.Preprocess, what: str = "image") -> NDArray[np.float32]:
    """Encoded image bytes → `(3, H, W)` float32, the same decode and transform as `fsdeploy predict`.

    Raises:
        InvalidInput: the bytes are not a decodable image.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(bytes(data))) as img:
            img.load()  # full decode, so a truncated file fails here
            rgb = links.to_rgb(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        size = len(bytes(data))
        raise InvalidInput(f"{what} ({size} bytes) is not a decodable image ({type(exc).__name__}); send the bytes of a PNG or JPEG file") from None
    return links.preprocess_image(rgb, cfg)


class PreprocessRole:
    """IMAGE `(n, 1)` bytes → PIXELS `(n, 3, H, W)`."""

    inputs = ("IMAGE",)

    def __init__(self, cfg: links.Preprocess) -> None:
        self.cfg = cfg

    def run(self, requests: Sequence[Request]) -> list[Result]:
        out: list[Result] = []
        for req in requests:
            try:
                blobs = np.asarray(req["IMAGE"]).reshape(-1)
                pixels = [decode_image(b, self.cfg, f"image {i} of the request") for i, b in enumerate(blobs)]
                out.append({"PIXELS": np.stack(pixels).astype(np.float32)})
            except Exception as exc:  # one request's failure must not fail the batch
                out.append(exc)
        return out

    def close(self) -> None:
        pass


class TaskStateRole:
    """TASK_ID `(n, 1)` → TASK_KEY `(n, 1)` (id@version) and, for CaSE, GAMMA `(n, G)`."""

    inputs = ("TASK_ID",)

    def __init__(self, store: TaskStore, case: bool) -> None:
        self.store = store
        self.case = case

    def run(self, requests: Sequence[Request]) -> list[Result]:
        out: list[Result] = []
        for req in requests:
            try:
                entries = [self.store.resolve(t) for t in _strings(req["TASK_ID"])]
                res: dict[str, np.ndarray] = {"TASK_KEY": _bytes_array([[e.key] for e in entries])}
                if self.case:
                    res["GAMMA"] = np.stack([np.asarray(e.artefact.task_state["gamma"], np.float32) for e in entries])
                out.append(res)
            except Exception as exc:  # one request's failure must not fail the batch
                out.append(exc)
        return out

    def close(self) -> None:
        pass


@dataclass
class _Rows:
    request: int
    start: int
    stop: int


class FeaturesRole:
    """PIXELS `(n, 3, H, W)` (+ GAMMA `(n, G)` for CaSE, + TASK_KEY for folded tasks) → FEATURES `(n, D)`.

    All requests of one execute call run as one engine batch (in slices of `max_rows`): for CaSE the
    batched-γ graph takes each row's own γ, so different tasks share the run. Tasks with a folded graph
    (TSA, BN-affine) run their own graph, one run per task.
    """

    inputs = ("PIXELS", "GAMMA", "TASK_KEY")

    def __init__(self, graph: str | Path, *, case: bool, store: TaskStore | None, threads: int | None, max_rows: int) -> None:
        self.options = links.EngineOptions(threads=threads)
        self.engine = links.open_engine(graph, "ort", self.options)
        self.case = case
        self.store = store
        self.max_rows = max_rows
        self.task_engines: dict[str, links.Engine] = {}  # version key -> folded task graph, newest last

    def _task_engine(self, entry: TaskEntry) -> links.Engine:
        if entry.key not in self.task_engines:
            if len(self.task_engines) >= 8:  # keep a few folded graphs open (each holds a whole backbone)
                oldest = next(iter(self.task_engines))
                self.task_engines.pop(oldest).close()
            self.task_engines[entry.key] = links.open_engine(entry.artefact.task_state[links.TASK_GRAPH_KEY].tobytes(), "ort", self.options)
        return self.task_engines[entry.key]

    def _run(self, engine: links.Engine, feeds: dict[str, np.ndarray]) -> np.ndarray:
        n = len(feeds["images"])
        parts = [engine.run({k: v[i : i + self.max_rows] for k, v in feeds.items()})["features"] for i in range(0, n, self.max_rows)]
        return np.concatenate(parts)

    def run(self, requests: Sequence[Request]) -> list[Result]:
        out: list[Result | None] = [None] * len(requests)
        groups: dict[str | None, list[tuple[int, int]]] = {}  # engine key -> (request, row)
        entries: dict[str, TaskEntry] = {}
        for r, req in enumerate(requests):
            try:
                n = len(req["PIXELS"])
                if self.case:
                    if "GAMMA" not in req or len(req["GAMMA"]) != n:
                        raise InvalidInput("features: CaSE requests need one GAMMA row per image; send them through classify")
                    keys: list[str | None] = [None] * n
                else:
                    keys = []
                    for key in _strings(req["TASK_KEY"]) if "TASK_KEY" in req else [""] * n:
                        if not key:
                            keys.append(None)
                            continue
                        entry = self.store.by_key(key) if self.store is not None else None
                        has_graph = entry is not None and links.TASK_GRAPH_KEY in entry.artefact.task_state
                        if has_graph:
                            entries[key] = entry  # type: ignore[assignment]
                        keys.append(key if has_graph else None)
                for row, key in enumerate(keys):
                    groups.setdefault(key, []).append((r, row))
            except Exception as exc:  # this request fails alone
                out[r] = exc
        feats: dict[int, np.ndarray] = {}
        for key, rows in groups.items():
            try:
                feeds = {"images": np.stack([requests[r]["PIXELS"][i] for r, i in rows]).astype(np.float32, copy=False)}
                if self.case:
                    feeds["gamma"] = np.stack([requests[r]["GAMMA"][i] for r, i in rows]).astype(np.float32, copy=False)
                engine = self.engine if key is None else self._task_engine(entries[key])
                got = self._run(engine, feeds)
                for (r, i), f in zip(rows, got):
                    if r not in feats:
                        feats[r] = np.empty((len(requests[r]["PIXELS"]), got.shape[1]), np.float32)
                    feats[r][i] = f
            except Exception as exc:  # a broken folded graph fails only its task's requests
                for r, _ in rows:
                    out[r] = exc
        for r, req in enumerate(requests):
            if out[r] is None:
                out[r] = {"FEATURES": feats.get(r, np.zeros((0, 0), np.float32))}
        return out  # type: ignore[return-value]

    def close(self) -> None:
        self.engine.close()
        for e in self.task_engines.values():
            e.close()


class HeadRole:
    """FEATURES `(n, D)` + TASK_KEY `(n, 1)` → PROBS `(n, K)`, LABELS `(n, k)`, SCORES `(n, k)` (top-k).

    One model for every task: rows are grouped by task version and each group goes through that task's
    numpy TaskModel (transform + head), exactly as `fsdeploy predict` applies it.
    """

    inputs = ("FEATURES", "TASK_KEY")

    def __init__(self, store: TaskStore, topk: int) -> None:
        self.store = store
        self.topk = topk

    def run(self, requests: Sequence[Request]) -> list[Result]:
        out: list[Result] = []
        for req in requests:
            try:
                keys = _strings(req["TASK_KEY"])
                feats = np.asarray(req["FEATURES"], np.float32)
                probs_rows: list[np.ndarray] = [np.empty(0, np.float32)] * len(keys)
                labels_rows: list[list[str]] = [[] for _ in keys]
                for key in dict.fromkeys(keys):
                    idx = [i for i, k in enumerate(keys) if k == key]
                    entry = self.store.by_key(key)
                    probs = entry.model.predict_proba(feats[idx]).astype(np.float32)
                    k = max(1, min(self.topk, probs.shape[1]))
                    order = np.argsort(-probs, axis=1)[:, :k]
                    for j, row, o in zip(idx, probs, order):
                        probs_rows[j] = row
                        labels_rows[j] = [entry.artefact.classes[c] for c in o]
                width = max(len(p) for p in probs_rows)
                probs_out = np.zeros((len(keys), width), np.float32)
                for j, p in enumerate(probs_rows):
                    probs_out[j, : len(p)] = p
                scores = np.zeros((len(keys), max(len(lab) for lab in labels_rows)), np.float32)
                for j, p in enumerate(probs_rows):
                    top = np.sort(p)[::-1][: len(labels_rows[j])]
                    scores[j, : len(top)] = top
                out.append({"PROBS": probs_out, "LABELS": _bytes_array(labels_rows), "SCORES": scores})
            except Exception as exc:  # one request's failure must not fail the batch
                out.append(exc)
        return out

    def close(self) -> None:
        pass


class AdaptRole:
    """IMAGES `(m,)` bytes + LABELS `(m,)` class names + TASK_ID `(1,)` [+ HEAD, TRANSFORM, HEAD_OPTS, SEED]
    → INFO `(1,)` JSON: fits the task on the server (CaSE γ by the exact chunked context pass, then the head)
    and writes `tasks/<id>.npz` atomically, where the serving models pick it up on their next request."""

    inputs = ("IMAGES", "LABELS", "TASK_ID", "HEAD", "TRANSFORM", "HEAD_OPTS", "SEED")

    def __init__(self, bundle: links.Bundle, store: TaskStore, threads: int | None, batch: int = 32) -> None:
        self.bundle = bundle
        self.store = store
        self.threads = threads
        self.batch = batch

    def run(self, requests: Sequence[Request]) -> list[Result]:
        out: list[Result] = []
        for req in requests:
            try:
                out.append({"INFO": np.array([json.dumps(self.adapt(req)).encode()], dtype=object)})
            except Exception as exc:  # one request's failure must not fail the batch
                out.append(exc)
        return out

    def adapt(self, req: Request) -> dict[str, Any]:
        """Fit and store one task; returns a JSON-able summary."""
        import time

        t0 = time.perf_counter()
        task_id = check_task_id(_strings(req["TASK_ID"])[0])
        blobs = np.asarray(req["IMAGES"]).reshape(-1)
        names = _strings(req["LABELS"])
        if len(blobs) != len(names):
            raise InvalidInput(f"adapt got {len(blobs)} images but {len(names)} labels; send one label per image")
        classes = sorted(set(names))
        if len(classes) < 2:
            raise InvalidInput(f"adapt needs at least 2 classes, got {len(classes)} ({', '.join(classes)}); label the support images")
        head = _strings(req["HEAD"])[0] if "HEAD" in req else "linear"
        transform = _strings(req["TRANSFORM"])[0] if "TRANSFORM" in req else "none"
        head_opts = json.loads(_strings(req["HEAD_OPTS"])[0]) if "HEAD_OPTS" in req else {}
        seed = int(np.asarray(req["SEED"]).reshape(-1)[0]) if "SEED" in req else 0
        cfg = self.bundle.manifest.preprocess
        images = np.stack([decode_image(b, cfg, f"support image {i}") for i, b in enumerate(blobs)])
        labels = np.searchsorted(np.asarray(classes), np.asarray(names)).astype(np.int64)
        model = links.TaskModel.create(head, transform, **head_opts)  # bad names fail before the engines run
        options = links.EngineOptions(threads=self.threads)
        kw = {"chunked": True} if self.bundle.manifest.adapter == links.CASE_ADAPTER else {}
        path = links.feature_path(self.bundle, "ort", options, **kw)
        try:
            feats, state = path.support(images[i : i + self.batch] for i in range(0, len(images), self.batch))
        finally:
            path.close()
        model.fit(feats, labels, rng=np.random.default_rng(seed))
        m = self.bundle.manifest
        task = links.TaskArtefact(
            bundle_id=m.bundle_id, model=m.model, adapter=m.adapter, classes=tuple(classes), model_state=model.state(),
            task_state=state, info={"head": head, "transform": transform, "support": len(images), "seed": seed,
                                    "precision": "fp32", "fsdeploy": links.__version__, "adapted_by": "triton"},
        )
        task.save(self.store.path(task_id))  # atomic: a kill mid-write leaves the old task (or none)
        return {"task": task_id, "classes": classes, "support": len(images), "head": head, "transform": transform,
                "seconds": round(time.perf_counter() - t0, 3)}

    def close(self) -> None:
        pass


def read_manifest(repo: str | Path) -> dict[str, Any]:
    """The repository's `fsdeploy_repository.json`."""
    path = Path(repo) / MANIFEST
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise InvalidInput(f"{repo} is not an fsdeploy Triton repository (no {MANIFEST}); write one with `fsdeploy triton export`") from None


def make_role(name: str, repo: str | Path, params: dict[str, str]) -> Role:
    """Build the role a Python-backend model plays, from the repository it lives in."""
    repo = Path(repo)
    info = read_manifest(repo)
    case = info["adapter"] == links.CASE_ADAPTER
    store = TaskStore(repo / "tasks", info["bundle_id"], info.get("gamma_size") if case else None,
                      folded=bool(info.get("folded_tasks")), keep_graphs=name == "features")
    threads = int(params["threads"]) if params.get("threads") else None
    if name == "preprocess":
        return PreprocessRole(links.Preprocess.from_dict(info["preprocess"]))
    if name == "task_state":
        return TaskStateRole(store, case)
    if name == "features":
        return FeaturesRole(repo / "models" / "features" / "1" / "model.onnx", case=case, store=store, threads=threads,
                            max_rows=int(info["max_batch"]))
    if name == "head":
        return HeadRole(store, int(params.get("topk", info.get("topk", 5))))
    if name == "adapt":
        return AdaptRole(links.load_bundle(repo / "bundle"), store, threads)
    raise InvalidInput(f"unknown fsdeploy serving role {name!r}; known: preprocess, task_state, features, head, adapt")
