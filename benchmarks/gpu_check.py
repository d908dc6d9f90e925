"""One command that checks every GPU claim of the README in about 9 minutes on one H100/H200.

    python benchmarks/gpu_check.py             # on a GPU machine: runs every step, writes results, prints the table
    python benchmarks/gpu_check.py --dry-run   # anywhere: prints the plan and checks every step's command exists

Steps, each with its own time cap (a step that hits it is stopped and reported as skipped, with a
note, and the next one runs):
1. `pytest -m gpu`: the CUDA batch path, bf16/fp16 training, channels-last, the memory cap, a real
   out-of-memory retry, four trials on one GPU, frozen features in float16, torch.compile.
2. `bench_train.py`: resnet50, efficientnet_v2_s, convnext_tiny, vit_b_16 at 224 px, batch 128,
   freeze 0 and 0.8: our loop against the seeds' fp32 loop.
3. `bench_packing.py`: 1, 2, 4, 8 trials sharing the GPU.
4. `bench_data.py`: our batches with the GPU doing the augmentation, against ImageFolder + PIL.
5. A real search of a generated 10,000-image folder (`--space quick`, random init) with a time budget.

Each benchmark writes `benchmarks/results/<name>_gpu.json` and `.md`; this script writes
`benchmarks/results/gpu_check.json` and `.md`: every GPU target with its measured value, met or not.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
JPEGS_10K = Path(tempfile.gettempdir()) / "tune-inat-bench-jpegs-10000"
JUNIT = Path(tempfile.gettempdir()) / "tune-inat-gpu-check-junit.xml"


@dataclass(frozen=True)
class Step:
    name: str
    command: list[str]
    cap_s: int  # the step is stopped after this long
    checks: str  # a file or module the command needs


def plan(python: str) -> list[Step]:
    search_folder = Path(tempfile.gettempdir()) / "tune-inat-gpu-check-results"
    return [
        Step(
            "pytest -m gpu",
            [
                python,
                "-m",
                "pytest",
                "-m",
                "gpu",
                "-q",
                "-p",
                "no:cacheprovider",
                f"--junitxml={JUNIT}",
                "tests/test_gpu.py",
            ],
            150,
            "tests/test_gpu.py",
        ),
        Step(
            "bench_train",
            [
                python,
                "benchmarks/bench_train.py",
                "--device",
                "cuda",
                "--image-size",
                "224",
                "--batch",
                "128",
                "--steps",
                "30",
                "--freeze",
                "0",
                "0.8",
                "--backbones",
                "resnet50",
                "efficientnet_v2_s",
                "convnext_tiny",
            ],
            125,  # 100 s measured two of four backbones on an H200: three now, so the new steps fit 10 minutes
            "benchmarks/bench_train.py",
        ),
        Step(
            "bench_packing",
            [
                python,
                "benchmarks/bench_packing.py",
                "--device",
                "cuda",
                "--trials",
                "1",
                "2",
                "4",
                "8",
                "--batch",
                "64",
                "--epochs",
                "3",
                "--images",
                "2000",
            ],
            95,
            "benchmarks/bench_packing.py",
        ),
        Step(
            "bench_data",
            [python, "benchmarks/bench_data.py", "--device", "cuda", "--images", "2000", "--epochs", "3"],
            40,
            "benchmarks/bench_data.py",
        ),
        Step(
            "memory probes",
            [
                python,
                "benchmarks/probe_memory.py",
                "--device",
                "cuda",
                "--output",
                str(RESULTS / "gpu_memory_probe_gpu.json"),
            ],
            35,
            "benchmarks/probe_memory.py",
        ),
        Step(
            "search of 10,000 images, 0.25 GPU per trial",
            [python, "benchmarks/gpu_check.py", "--search-10k", str(search_folder), "--gpus", "0.25"],
            70,
            "tune_inat/search.py",
        ),
        Step(
            "search of 10,000 images, --gpus-per-trial auto",
            [python, "benchmarks/gpu_check.py", "--search-10k", str(search_folder), "--gpus", "auto"],
            70,
            "tune_inat/packing.py",
        ),
    ]


def run_step(step: Step, log: Path) -> tuple[str, float]:
    """Run one step under its cap, in its own process group; ("ok" | "failed (code)" | "skipped: ..."), seconds."""
    start = time.monotonic()
    with open(log, "w") as out:
        process = subprocess.Popen(step.command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = process.wait(timeout=step.cap_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # the step's own group: its Ray, its workers
            process.wait()
            return f"skipped: hit its {step.cap_s} s cap (see {log.name})", time.monotonic() - start
    return ("ok" if code == 0 else f"failed ({code}; see {log.name})"), time.monotonic() - start


def search_10k(results: Path, gpus: str) -> None:
    """A search step: generate the folder, then one real search with a time budget; its numbers to a JSON file
    (the GPU busy share from gpus.parquet, the most trials at once, trial start times)."""
    sys.path.insert(0, str(HERE))
    from common import inat_like_folder

    start = time.monotonic()
    data = inat_like_folder(JPEGS_10K, 10_000)
    generated = time.monotonic() - start
    command = [
        sys.executable,
        "-m",
        "tune_inat.search",
        "--data",
        str(data),
        "--space",
        "quick",
        "--set",
        "weights=none",
        "--num-samples",
        "16",
        "--max-epochs",
        "3",
        "--time-budget",
        "45s",
        "--gpus-per-trial",
        gpus,
        "--results",
        str(results),
        "--name",
        f"search-10k-{int(time.time())}",
        "--no-wandb",
        "--quiet",
    ]
    searched = time.monotonic()
    completed = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    wall = time.monotonic() - searched
    folder = results / command[command.index("--name") + 1]
    epochs = trials = at_once = 0
    busy = start_median = None
    if (folder / "epochs.parquet").exists():
        import pandas as pd

        from tune_inat.analyze import gpu_busy, load_search

        epochs = len(pd.read_parquet(folder / "epochs.parquet"))
        search = load_search(folder)
        trials = len(search.trials)
        busy = gpu_busy(search)
        busy = None if busy is None else busy[0]
        ran = search.trials.dropna(subset=["started_at", "ended_at"])
        at_once = max(((ran["started_at"] <= t) & (ran["ended_at"] >= t)).sum() for t in ran["started_at"])
        start_median = float(search.trials["startup_seconds"].median())
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"search_10k_{'auto' if gpus == 'auto' else 'fixed'}_gpu.json").write_text(
        json.dumps(
            {
                "command": " ".join(shlex.quote(c) for c in command),
                "exit_code": completed.returncode,
                "wall_seconds": wall,
                "folder_generation_seconds": generated,
                "trial_epochs": epochs,
                "trials_finished": trials,
                "gpu_busy_share": busy,
                "most_trials_at_once": int(at_once),
                "trial_start_seconds_median": start_median,
            },
            indent=2,
        )
    )
    if completed.returncode != 0:
        print(completed.stderr[-3000:], file=sys.stderr)
        raise SystemExit(completed.returncode)


def test_outcome(name: str) -> str | None:
    """passed / failed / skipped for one test of the pytest step (its JUnit XML), None when it did not run."""
    if not JUNIT.exists():
        return None
    import xml.etree.ElementTree as ET

    for case in ET.parse(JUNIT).iter("testcase"):
        if case.get("name") == name:
            kinds = {child.tag for child in case}
            return "failed" if kinds & {"failure", "error"} else "skipped" if "skipped" in kinds else "passed"
    return None


def _rows(name: str) -> list[dict]:
    path = RESULTS / f"{name}_gpu.json"
    return json.loads(path.read_text())["rows"] if path.exists() else []


def targets() -> list[dict]:
    """Every GPU target of the README with its measured value (None when its step did not measure it)."""
    train = {(r["backbone"], r["freeze"]): r for r in _rows("bench_train")}
    resnet = train.get(("resnet50", 0.0))
    packing = {r["trials_sharing"]: r for r in _rows("bench_packing")}
    data = next((r for r in _rows("bench_data") if str(r.get("pipeline", "")).startswith("ours:")), None)
    searches = {
        kind: json.loads(path.read_text()) if (path := RESULTS / f"search_10k_{kind}_gpu.json").exists() else None
        for kind in ("fixed", "auto")
    }
    search, auto = searches["fixed"], searches["auto"]
    released = test_outcome("test_a_stopped_or_failed_trial_gives_its_gpu_memory_back_within_2_s")
    found = [
        (
            "resnet50 training, 224 px, batch 128, full fine-tuning",
            ">= 2,500 images/s",
            resnet and resnet["ours_img_s"],
            lambda v: v >= 2500,
            "{:,.0f} images/s",
        ),
        (
            "our loop against the seeds' plain fp32 loop (resnet50, f = 0)",
            ">= 2x",
            resnet and resnet["speedup"],
            lambda v: v >= 2.0,
            "{:.2f}x",
        ),
        (
            "4 trials packed on one GPU against one trial alone",
            ">= 1.5x",
            packing.get(4) and packing[4]["vs_one_trial"],
            lambda v: v >= 1.5,
            "{:.2f}x",
        ),
        (
            "batches delivered with GPU augmentation",
            ">= 10x the seeds' loader",
            data and data["speedup"],
            lambda v: v >= 10,
            "{:.1f}x",
        ),
        (
            "search of 10,000 images (quick space, 45 s budget, 16 trials at 0.25 GPU)",
            "measured",
            search and search["wall_seconds"],
            lambda v: search["exit_code"] == 0,
            "{:.0f} s wall" + (f", {search['trial_epochs']} trial-epochs" if search else ""),
        ),
        (
            "--gpus-per-trial auto: GPU busy share of the search's steady state",
            ">= 85%",
            auto and auto["gpu_busy_share"],
            lambda v: v >= 0.85,
            "{:.0%}"
            + (
                f" (0.25 fixed: {search['gpu_busy_share']:.0%}); trials at once {auto['most_trials_at_once']} "
                f"(0.25 fixed: {search['most_trials_at_once']})"
                if auto and search and search.get("gpu_busy_share") is not None
                else ""
            ),
        ),
        (
            "trial start on the GPU (model build, cache open, weights), median",
            "< 5 s",
            search and search["trial_start_seconds_median"],
            lambda v: v < 5,
            "{:.2f} s",
        ),
        (
            "GPU memory back after a trial is stopped or fails (NVML, tests/test_gpu.py)",
            "< 2 s",
            released,
            lambda v: v == "passed",
            "{}",
        ),
    ]
    return [
        {
            "target": what,
            "goal": goal,
            "measured": None if value is None else fmt.format(value),
            "met": None if value is None else bool(test(value)),
        }
        for what, goal, value, test, fmt in found
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dry-run", action="store_true", help="print the plan and check that every step's command exists"
    )
    parser.add_argument("--search-10k", type=Path, default=None, help=argparse.SUPPRESS)  # the search step itself
    parser.add_argument("--gpus", default="0.25", help=argparse.SUPPRESS)  # its --gpus-per-trial
    args = parser.parse_args()
    if args.search_10k:
        search_10k(args.search_10k, args.gpus)
        return
    steps = plan(sys.executable)
    print(f"GPU check: {len(steps)} steps, at most {sum(s.cap_s for s in steps) / 60:.1f} min")
    for index, step in enumerate(steps, 1):
        print(f"{index}. {step.name} (cap {step.cap_s} s): {' '.join(shlex.quote(c) for c in step.command[1:])}")
    if args.dry_run:
        missing = [s.name for s in steps if not (REPO / s.checks).exists()]
        for step in steps[1:5]:  # every benchmark script parses its arguments
            help_run = subprocess.run([*step.command[:2], "--help"], cwd=REPO, capture_output=True, text=True)
            if help_run.returncode != 0:
                missing.append(f"{step.name} --help: {help_run.stderr.strip()[-200:]}")
        if missing:
            raise SystemExit(f"dry run: not ready: {missing}")
        print("dry run: every step's command is there; run without --dry-run on a GPU machine")
        return
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU visible: run this on a GPU machine (or --dry-run to check the plan)")
    RESULTS.mkdir(exist_ok=True)
    logs = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    outcomes = []
    for step in steps:
        status, seconds = run_step(step, logs / f"{re.sub(r'[^a-z0-9]+', '_', step.name)}.log")
        outcomes.append({"step": step.name, "status": status, "seconds": round(seconds, 1)})
        print(f"{step.name}: {status} in {seconds:.0f} s", flush=True)
    table = targets()
    record = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "device": torch.cuda.get_device_name(0),
        "command": "python benchmarks/gpu_check.py",
        "steps": outcomes,
        "targets": table,
        "logs": str(logs),
    }
    (RESULTS / "gpu_check.json").write_text(json.dumps(record, indent=2))
    lines = [
        f"# GPU check on {record['device']}, {record['date']}",
        "",
        "`python benchmarks/gpu_check.py`",
        "",
        "| target | goal | measured | met |",
        "|---|---|---|---|",
    ]
    for row in table:
        met = "-" if row["met"] is None else ("yes" if row["met"] else "no")
        lines.append(f"| {row['target']} | {row['goal']} | {row['measured'] or 'not measured'} | {met} |")
    lines += ["", "| step | status | seconds |", "|---|---|---|"]
    lines += [f"| {o['step']} | {o['status']} | {o['seconds']} |" for o in outcomes]
    (RESULTS / "gpu_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
