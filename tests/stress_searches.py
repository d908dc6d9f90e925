"""Small searches run one after another in one process and one local Ray, each judged as the command line judges it.

Run by tests/test_exit_status.py in a process of its own, pinned to one core beside a busy process, so
that trials, pauses at a rung and Ray's own bookkeeping interleave differently on every run. For each
search it prints one JSON line: the exit code and message the command line would give, the status
block's last counts, and the trials table's statuses.

    python tests/stress_searches.py DEMO_ROOT RESULTS_DIR RUNS
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import sys
import time
from pathlib import Path

# (name, overrides): reproducible and not, with early stopping and without. The reproducible one runs most:
# a later trial that reaches a rung first waits there, paused, until the earlier ones have reported.
VARIANTS = (
    ("ordered-asha", dict(reproducible=True, scheduler="asha", num_samples=4)),
    ("ordered-asha", dict(reproducible=True, scheduler="asha", num_samples=3)),
    ("asha", dict(reproducible=False, scheduler="asha", num_samples=3)),
    ("ordered-asha", dict(reproducible=True, scheduler="asha", num_samples=4)),
    ("fifo", dict(reproducible=False, scheduler="fifo", num_samples=2)),
)
STATUS_LINE = re.compile(
    r"trials: (?P<running>\d+) running, (?:(?P<waiting>\d+) waiting at a rung, )?(?P<to_start>\d+) to start, "
    r"(?P<completed>\d+) completed, (?P<stopped>\d+) stopped early, (?P<failed>\d+) failed \(of (?P<total>\d+)\)"
)


def last_status(console: str) -> dict[str, int]:
    """The counts of the last status block printed."""
    found = list(STATUS_LINE.finditer(console))
    return {k: int(v or 0) for k, v in found[-1].groupdict().items()} if found else {}


def main() -> None:
    demo_root, results, runs = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    import os

    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"  # our status block, as the command line sets it
    import ray

    from tune_inat.data.dataset import DataConfig
    from tune_inat.faults import FaultInjector, parse_faults
    from tune_inat.job import prepare_data
    from tune_inat.report import exit_status
    from tune_inat.results import read_results
    from tune_inat.space import load_space, with_fixed, with_overrides
    from tune_inat.tuner import run_search

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    base = with_fixed(load_space("demo"), {"image_size": 32, "backbone": "resnet18", "batch_size": 64})
    data_config = DataConfig(demo_root, results / "cache", progress=False)
    data = prepare_data(base, data_config)
    for run in range(runs):
        variant, overrides = VARIANTS[run % len(VARIANTS)]
        spec = with_overrides(base, max_epochs=2, seed=run, **overrides)
        # the first trial waits 3 to 6 s (by run) before its first epoch, so later ones often reach the rung first
        slow_first = FaultInjector(parse_faults(f"1:1:slow:{3 + (run * 0.7) % 3:.1f}"))
        console = io.StringIO()
        started = time.monotonic()
        with contextlib.redirect_stdout(console):
            outcome = run_search(
                spec, data_config, data, str(results), f"stress-{run}", verbose=1, before_epoch=slow_first
            )
        code, message = exit_status(outcome, budget_spent=False, resume_hint="")
        table = read_results(str(results / f"stress-{run}")).trials
        print(
            json.dumps(
                {
                    "run": run,
                    "variant": variant,
                    "exit": code,
                    "message": message,
                    "status": last_status(console.getvalue()),
                    "table": table["status"].value_counts().to_dict(),
                    "trials": spec.options.num_samples,
                    "seconds": round(time.monotonic() - started, 1),
                }
            ),
            flush=True,
        )
    ray.shutdown()


if __name__ == "__main__":
    main()
