"""What the GPUs did during a search: the sampler's table (gpus.parquet) and analyze's busy share.

NVML cannot run on a machine without an NVIDIA driver: here its absence is checked for real, and the
sampler is given samples in NVML's shape by a scripted reader (the GPU check runs it on real GPUs).
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from conftest import REPO, run_cli

from tune_inat.analyze import gpu_busy, load_search
from tune_inat.gpu_monitor import GPUS_FILE, GPUS_SCHEMA, GpuSampler, nvml_reader, sampling_gpus
from tune_inat.results import TRIALS_SCHEMA, read_table_folder, resolve_folder, write_part


class ScriptedGpus:
    """Two GPUs in NVML's terms; `utilization` per GPU follows the given function of the time."""

    def __init__(self, busy: dict[str, float]) -> None:
        self.busy = busy
        self.reads = 0

    def __call__(self) -> list[dict]:
        self.reads += 1
        return [
            {
                "timestamp": time.time(),
                "node_host": "here",
                "gpu_index": index,
                "gpu_uuid": uuid,
                "gpu_name": "NVIDIA H200",
                "utilization": share,
                "memory_used_mib": 1000.0 * (index + 1),
                "memory_total_mib": 143771.0,
            }
            for index, (uuid, share) in enumerate(self.busy.items())
        ]


def samples_of(folder: Path) -> pd.DataFrame:
    filesystem, path = resolve_folder(str(folder))
    return read_table_folder(filesystem, f"{path}/{GPUS_FILE}", GPUS_SCHEMA).to_pandas()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without an NVIDIA driver")
def test_without_an_nvidia_driver_there_is_nothing_to_sample_and_no_table(tmp_path: Path) -> None:
    assert nvml_reader() is None  # NVML's own library is not found here
    with sampling_gpus(str(tmp_path)) as sampler:
        assert sampler is None
    assert not (tmp_path / GPUS_FILE).exists()


def test_samples_go_to_gpus_parquet_as_appended_parts(tmp_path: Path) -> None:
    reader = ScriptedGpus({"GPU-a": 0.9, "GPU-b": 0.25})
    sampler = GpuSampler(reader, str(tmp_path), interval_s=0.05, flush_s=0.3)
    sampler.start()
    time.sleep(1.2)
    sampler.stop()
    parts = sorted((tmp_path / GPUS_FILE).glob("part-*.parquet"))
    assert len(parts) >= 2  # flushed while it ran, and at the end
    assert pq.read_schema(parts[0]).remove_metadata().equals(GPUS_SCHEMA)
    samples = samples_of(tmp_path)
    assert len(samples) == 2 * reader.reads == sampler.written  # every sample taken is written, once
    assert samples.groupby("gpu_uuid")["utilization"].mean().to_dict() == {"GPU-a": 0.9, "GPU-b": 0.25}
    assert samples["timestamp"].is_monotonic_increasing
    second = GpuSampler(ScriptedGpus({"GPU-a": 0.5}), str(tmp_path), interval_s=0.05)  # a resumed search appends
    second.start()
    time.sleep(0.3)
    second.stop()
    assert len(samples_of(tmp_path)) == len(samples) + second.written


def test_a_failed_write_is_one_warning_and_the_samples_wait_for_the_next(tmp_path: Path, caplog) -> None:
    blocked = tmp_path / "results"
    blocked.write_text("a file where the results folder should be")  # every write fails, as on a full disk
    sampler = GpuSampler(ScriptedGpus({"GPU-a": 0.75}), str(blocked / "search"), interval_s=0.05, flush_s=0.1)
    with caplog.at_level(logging.WARNING):
        sampler.start()
        time.sleep(0.8)
        sampler._stop.set()
        sampler._thread.join()
    warnings = [r.getMessage() for r in caplog.records if "GPU samples cannot be written" in r.getMessage()]
    assert len(warnings) == 1 and str(blocked / "search") in warnings[0]
    waiting = len(sampler.waiting)
    assert waiting > 2 and sampler.written == 0
    blocked.unlink()
    blocked.mkdir()
    assert sampler.flush()  # the space is back: every sample kept is written
    assert len(samples_of(blocked / "search")) == waiting


def test_the_gpu_busy_share_of_the_search_and_of_each_trial(demo_search, tmp_path: Path) -> None:
    """Two trials on two GPUs at known times: the shares are those GPUs' utilisation while each ran."""
    folder = tmp_path / "search"
    shutil.copytree(demo_search.folder, folder, ignore=shutil.ignore_patterns("trial_*", "*.db"))
    trials = read_table_folder(*resolve_folder(str(folder / "trials.parquet")), TRIALS_SCHEMA).to_pylist()
    first, second = sorted({row["trial_id"] for row in trials})[:2]
    t0 = pd.Timestamp("2026-12-04 10:00:00", tz="UTC")
    windows = {first: ("GPU-a", 0, 60), second: ("GPU-b", 30, 90)}  # seconds after t0
    rows = []
    for row in trials:
        if row["trial_id"] in windows:
            uuid, start, end = windows[row["trial_id"]]
            at = {"started_at": t0 + pd.Timedelta(seconds=start), "ended_at": t0 + pd.Timedelta(seconds=end)}
            rows.append({**row, "gpu_uuid": uuid, **at})
    shutil.rmtree(folder / "trials.parquet")
    filesystem, path = resolve_folder(str(folder))
    write_part(rows, TRIALS_SCHEMA, filesystem, f"{path}/trials.parquet")
    samples = []
    for second_ in range(0, 120, 1):  # GPU-a busy 80% in its trial's minute, GPU-b 40% in its; idle otherwise
        at = t0 + pd.Timedelta(seconds=second_)
        for index, (uuid, start, end, busy) in enumerate((("GPU-a", 0, 60, 0.8), ("GPU-b", 30, 90, 0.4))):
            samples.append(
                {"timestamp": at, "node_host": "here", "gpu_index": index, "gpu_uuid": uuid, "gpu_name": "H200",
                 "utilization": busy if start <= second_ <= end else 0.0, "memory_used_mib": 5000.0 + index,
                 "memory_total_mib": 143771.0}
            )  # fmt: skip
    write_part(samples, GPUS_SCHEMA, filesystem, f"{path}/{GPUS_FILE}")

    overall, per_trial = gpu_busy(load_search(folder))
    by_trial = per_trial.set_index("trial_id")
    assert by_trial.loc[first, "gpu_busy"] == pytest.approx(0.8) and by_trial.loc[second, "gpu_busy"] == pytest.approx(
        0.4
    )
    # while any trial ran (seconds 0..90): GPU-a busy in 0..60, GPU-b in 30..90, each idle in the rest
    running = [(s, u) for s in range(0, 91) for u in ("GPU-a", "GPU-b")]
    expected = sum(0.8 if u == "GPU-a" and s <= 60 else 0.4 if u == "GPU-b" and s >= 30 else 0 for s, u in running)
    assert overall == pytest.approx(expected / len(running))

    analyzed = run_cli("tune_inat.analyze", str(folder), cwd=REPO)
    assert analyzed.returncode == 0, analyzed.stderr
    assert f"GPUs busy {100 * overall:.0f}% of the time trials ran" in analyzed.stdout
    report = (folder / "report.md").read_text()
    assert "## GPU busy share" in report and "![gpu utilization](gpu_utilization.png)" in report
    assert (folder / "gpu_utilization.png").stat().st_size > 10_000


def test_gpus_parquet_is_documented() -> None:
    page = (REPO / "docs" / "results.md").read_text()
    for field in GPUS_SCHEMA:
        assert f"| `{field.name}` | {field.type} |" in page, field.name
