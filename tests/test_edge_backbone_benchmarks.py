"""The issue-18 benchmark scripts end to end on a tiny corpus (slow: training, exports and episodes)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fsdeploy.data.glyphs import generate_glyphs

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("glyphs") / "c"
    generate_glyphs(out, size=32, seed=0, min_instances=10, max_instances=12, classes=60)
    return out


def _run(script: str, *args: str) -> dict:
    out = Path(args[args.index("--out") + 1])
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], cwd=ROOT, capture_output=True, check=False,
                          text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_distill_students_benchmark_runs(corpus: Path, tmp_path: Path) -> None:
    report = _run("distill_students.py", "--data", str(corpus), "--epochs", "1", "--batch-size", "16", "--max-steps", "2",
                  "--episodes", "10", "--workdir", str(tmp_path / "w"), "--out", str(tmp_path / "d.json"))
    rows = {r["model"]: r for r in report["rows"]}
    assert len(rows) == 4 and rows["teacher efficientnet_b0"]["macs"] > rows["student, L2T-ww"]["macs"] > 0
    assert all(0 <= r["1-shot"][0] <= 100 for r in rows.values()) and "1-shot vs direct" in rows["student, L2T-ww"]


@pytest.mark.slow
def test_idmm_vit_benchmark_runs(corpus: Path, tmp_path: Path) -> None:
    report = _run("idmm_vit.py", "--data", str(corpus), "--images", "100", "--idmm-epochs", "1", "--max-steps", "2",
                  "--sup-epochs", "1", "--batch-size", "16", "--episodes", "10", "--workdir", str(tmp_path / "w"),
                  "--out", str(tmp_path / "i.json"))
    assert [r["backbone"].split()[0] for r in report["rows"]] == ["random", "IDMM", "supervised"]


def test_idmm_vit_refuses_a_missing_supervised_checkpoint(tmp_path: Path) -> None:
    """Checked before any training starts: one line, exit 2, nothing written."""
    out = tmp_path / "i.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "idmm_vit.py"), "--data", str(tmp_path),
                           "--supervised-checkpoint", str(tmp_path / "missing.safetensors"), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert proc.returncode == 2 and "--supervised-checkpoint" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()
