"""scripts/gpu_check.sh: the dry run passes on a CPU machine and its numbers hold; CUDA-event timing logic."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fsdeploy.bench import gpu_check

ROOT = Path(__file__).resolve().parents[1]


def test_dry_run_passes_here(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    rows = result["rows"]
    plan = gpu_check.dry_run_plan()
    labels = {f"{m}{' (CaSE)' if a == 'case' else ''}" for m, a in plan.models}
    assert {r["model"] for r in rows} == labels and {r["batch"] for r in rows} == set(plan.batches)
    for r in rows:
        if r["variant"] == "torch fp32":  # the bundle's own module: equal to ORT-CPU to float rounding
            assert r["rel_max_abs"] < 1e-4 and r["centred_cosine_min"] > 0.9999
        elif r["variant"] == "torch bf16 autocast":
            assert 1e-4 < r["rel_max_abs"] < 0.05 and r["centred_cosine_min"] > 0.99
        elif r["variant"] == "ort cuda":
            assert "onnxruntime-gpu" in r["note"]
        assert r["variant"] != "torch tf32"  # a CUDA-only mode
    assert "torch fp32" in proc.stdout and "ccos min" in proc.stdout


def test_without_a_gpu_the_full_run_says_what_to_do(monkeypatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="no CUDA GPU visible.*--dry-run"):
        gpu_check.run_check(gpu_check.Plan(), Path("/nonexistent"))


def test_cuda_timer_reads_cuda_events() -> None:
    """Device time comes from event pairs recorded around each call, after a synchronising warm-up."""
    log: list[str] = []

    class Event:
        n = 0

        def __init__(self, enable_timing: bool) -> None:
            assert enable_timing
            Event.n += 1
            self.t = Event.n

        def record(self) -> None:
            log.append("record")

        def synchronize(self) -> None:
            log.append("sync")

        def elapsed_time(self, end: Event) -> float:
            return 2.0 * (end.t - self.t)

    cuda = type("Cuda", (), {"Event": Event, "synchronize": staticmethod(lambda: log.append("device-sync"))})
    fake = type("T", (), {"cuda": cuda})
    ms = gpu_check._timer(fake, "cuda")(lambda: log.append("call"), 3)
    assert ms == 2.0 and log[:2] == ["call", "device-sync"] and log.count("record") == 6 and log.count("call") == 4


def test_variants_per_device() -> None:
    import torch

    assert set(gpu_check.torch_variants(torch, "cuda")) == {"torch fp32", "torch tf32", "torch fp16 autocast", "torch bf16 autocast"}
    assert set(gpu_check.torch_variants(torch, "cpu")) == {"torch fp32", "torch bf16 autocast"}
    assert sys.executable
