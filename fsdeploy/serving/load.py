"""Closed-loop load on a served repository: N client threads, each sending one-image `classify` requests.

Returns raw per-request latencies and the wall time (P12: measure, then render elsewhere).
"""
from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fsdeploy.serving.client import Answer, Client


@dataclass(frozen=True)
class LoadResult:
    clients: int
    samples_ms: tuple[float, ...]
    wall_s: float
    errors: tuple[str, ...]

    @property
    def throughput(self) -> float:
        """Answered requests per second."""
        return len(self.samples_ms) / self.wall_s if self.wall_s > 0 else 0.0

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.samples_ms, q)) if self.samples_ms else float("nan")


def run_load(url: str, work: Sequence[tuple[bytes, str]], *, clients: int, per_client: int, seed: int = 0,
             answers: list[tuple[int, str, Answer]] | None = None) -> LoadResult:
    """`clients` threads each send `per_client` requests, cycling through `work` (image bytes, task id) from a
    random start. When `answers` is given, every (work index, task id, answer) is appended to it."""
    lock = threading.Lock()
    samples: list[float] = []
    errors: list[str] = []
    ready = threading.Barrier(clients + 1)

    def worker(k: int) -> None:
        start = int(np.random.default_rng(seed + k).integers(len(work)))
        mine: list[float] = []
        got: list[tuple[int, str, Answer]] = []
        with Client(url) as c:
            ready.wait()
            for i in range(per_client):
                j = (start + i) % len(work)
                blob, task = work[j]
                t = time.perf_counter()
                try:
                    a = c.classify([blob], task)[0]
                except Exception as exc:  # counted; the load goes on
                    with lock:
                        errors.append(str(exc))
                    continue
                mine.append((time.perf_counter() - t) * 1e3)
                got.append((j, task, a))
        with lock:
            samples.extend(mine)
            if answers is not None:
                answers.extend(got)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    ready.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return LoadResult(clients, tuple(samples), time.perf_counter() - t0, tuple(errors))
