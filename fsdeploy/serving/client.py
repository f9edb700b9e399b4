"""A small client for a served repository, on `tritonclient.http`.

    with Client("127.0.0.1:8000") as c:
        c.classify([open("cat.png", "rb").read()], "pets")   # -> [Answer(labels, scores, probs)]
        c.adapt("pets2", images, labels)                      # fits a new task on the server
"""
from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fsdeploy.errors import EngineError, MissingDependency


def _tritonclient() -> Any:
    """tritonclient.http, from this Python or, failing that, the serving venv (appended, so it fills gaps only)."""
    try:
        import tritonclient.http as http
    except ImportError:
        from fsdeploy.serving.server import venv_site_packages

        sp = str(venv_site_packages())
        if sp not in sys.path:
            sys.path.append(sp)
        try:
            import tritonclient.http as http
        except ImportError:
            raise MissingDependency("tritonclient is not installed; `pip install tritonclient[http]` or run scripts/triton_env.sh") from None
    return http


@dataclass(frozen=True)
class Answer:
    """One image's answer: top-k labels with probabilities, and every class's probability in class order."""

    labels: tuple[str, ...]
    scores: tuple[float, ...]
    probs: np.ndarray


class ServerError(EngineError):
    """The server answered a request with an error (the message is the server's)."""


class Client:
    """Synchronous HTTP client; one per thread."""

    def __init__(self, url: str, *, timeout_s: float = 120.0) -> None:
        self.http = _tritonclient()
        self.client = self.http.InferenceServerClient(url, connection_timeout=timeout_s, network_timeout=timeout_s)

    def _infer(self, model: str, inputs: list[tuple[str, np.ndarray, str]], outputs: Sequence[str]) -> Any:
        from tritonclient.utils import InferenceServerException

        ins = []
        for name, arr, dtype in inputs:
            t = self.http.InferInput(name, list(arr.shape), dtype)
            t.set_data_from_numpy(arr, binary_data=True)
            ins.append(t)
        outs = [self.http.InferRequestedOutput(o, binary_data=True) for o in outputs]
        try:
            return self.client.infer(model, ins, outputs=outs)
        except InferenceServerException as exc:
            raise ServerError(f"{model}: {exc.message()}") from None

    @staticmethod
    def _answers(res: Any) -> list[Answer]:
        labels, scores, probs = res.as_numpy("LABELS"), res.as_numpy("SCORES"), res.as_numpy("PROBS")
        return [Answer(tuple(x.decode() for x in lab if x), tuple(float(s) for s in sc[: len([x for x in lab if x])]), p)
                for lab, sc, p in zip(labels, scores, probs)]

    def classify(self, images: Sequence[bytes], task_id: str) -> list[Answer]:
        """Classify encoded images (PNG/JPEG bytes) with one task; one request, `len(images)` rows."""
        blobs = np.array([[bytes(b)] for b in images], dtype=object)
        ids = np.array([[task_id.encode()]] * len(images), dtype=object)
        res = self._infer("classify", [("IMAGE", blobs, "BYTES"), ("TASK_ID", ids, "BYTES")], ("LABELS", "SCORES", "PROBS"))
        return self._answers(res)

    def classify_pixels(self, pixels: np.ndarray, task_id: str) -> list[Answer]:
        """Classify preprocessed images `(n, 3, H, W)` float32 (fsdeploy's preprocessing already applied)."""
        pixels = np.ascontiguousarray(pixels, dtype=np.float32)
        ids = np.array([[task_id.encode()]] * len(pixels), dtype=object)
        res = self._infer("classify_pixels", [("PIXELS", pixels, "FP32"), ("TASK_ID", ids, "BYTES")], ("LABELS", "SCORES", "PROBS"))
        return self._answers(res)

    def adapt(self, task_id: str, images: Sequence[bytes], labels: Sequence[str], *, head: str = "linear",
              transform: str = "none", head_opts: dict[str, Any] | None = None, seed: int = 0) -> dict[str, Any]:
        """Fit a task on the server from support images and their class names; it serves at once."""
        inputs = [
            ("IMAGES", np.array([bytes(b) for b in images], dtype=object), "BYTES"),
            ("LABELS", np.array([s.encode() for s in labels], dtype=object), "BYTES"),
            ("TASK_ID", np.array([task_id.encode()], dtype=object), "BYTES"),
            ("HEAD", np.array([head.encode()], dtype=object), "BYTES"),
            ("TRANSFORM", np.array([transform.encode()], dtype=object), "BYTES"),
            ("HEAD_OPTS", np.array([json.dumps(head_opts or {}).encode()], dtype=object), "BYTES"),
            ("SEED", np.array([seed], dtype=np.int64), "INT64"),
        ]
        res = self._infer("adapt", inputs, ("INFO",))
        return json.loads(res.as_numpy("INFO")[0])

    def batch_stats(self, model: str) -> dict[int, int]:
        """Executions per batch size (rows per execution) the server has recorded for `model`."""
        stats = self.client.get_inference_statistics(model)
        out: dict[int, int] = {}
        for m in stats.get("model_stats", []):
            for b in m.get("batch_stats", []):
                out[int(b["batch_size"])] = out.get(int(b["batch_size"]), 0) + int(b["compute_infer"]["count"])
        return out

    def stats(self, model: str) -> dict[str, Any]:
        """The server's raw statistics for `model` (inference and execution counts, times in ns)."""
        return self.client.get_inference_statistics(model)

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
