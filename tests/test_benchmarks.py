"""The benchmarks stay runnable: the GPU check's plan, checked on a machine without a GPU (CI runs it)."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO


def test_the_gpu_check_dry_run_finds_every_step() -> None:
    dry = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--dry-run"], capture_output=True, text=True, cwd=REPO, timeout=300
    )
    assert dry.returncode == 0, dry.stdout[-2000:] + dry.stderr[-2000:]
    assert "at most 8.0 min" in dry.stdout
    for step in ("pytest -m gpu", "bench_train", "bench_packing", "bench_data", "search of 10,000 images"):
        assert step in dry.stdout
    assert "every step's command is there" in dry.stdout
