"""What a person watching a search reads: one short status block at a steady interval, and one line per event.

`StatusReporter` is a Ray Tune progress reporter (Ray's own mechanism for the console) that prints
a three-line block every `interval` seconds: how many trials run, wait, ended and how; the best
so far with its settings; the time spent and an estimate of what is left. Ray's own tables, paths
and warnings stay out of the console (`--verbose` shows them). In a Jupyter kernel (a notebook,
Colab) the block is one output area updated in place (IPython's display with a display id).
"""

from __future__ import annotations

import html
import math
import sys
import time
from typing import Any, TextIO

from ray.tune import ProgressReporter

from tune_inat.results import percent

STATUS_INTERVAL_S = 30.0


def clock(seconds: float) -> str:
    """12:34 or 1:02:03."""
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


ENDED = ("TERMINATED", "ERROR")  # Ray's statuses of a trial that will not run again in this search


def unfinished_trials(trials: list) -> list:
    """The trials not ended (running, waiting at a rung, to start): one definition for status block and exit code."""
    return [t for t in trials if t.status not in ENDED]


def trial_label(trial: Any) -> str:
    """ "8 (aca041df)": the number of its folder, and the id the tables use."""
    number = trial.experiment_tag.split("_", 1)[0]
    return f"{number} ({trial.trial_id})" if number.isdigit() else trial.trial_id


class StatusReporter(ProgressReporter):
    """A compact status block every `interval` seconds, and a last one at the end."""

    def __init__(
        self,
        metric: str,
        mode: str,
        searched: list[str],
        max_epochs: int,
        num_samples: int,
        concurrent: int,
        interval: float = STATUS_INTERVAL_S,
        out: TextIO | None = None,
    ) -> None:
        self.metric, self.mode, self.searched = metric, mode, searched
        self.max_epochs, self.num_samples, self.concurrent = max_epochs, num_samples, concurrent
        self.interval = interval
        self.out = out
        self._start = time.monotonic()
        self._last = self._start
        self._cell: Any = None  # the notebook output area the block lives in, made at the first report

    def __getstate__(self) -> dict[str, Any]:  # Ray saves the run config (and this reporter) in tuner.pkl
        return {**self.__dict__, "_cell": None}

    def setup(self, start_time: float | None = None, total_samples: int | None = None, **kwargs: Any) -> None:
        self._start = self._last = time.monotonic()

    def should_report(self, trials: list, done: bool = False) -> bool:
        now = time.monotonic()
        if done or now - self._last >= self.interval:
            self._last = now
            return True
        return False

    def report(self, trials: list, done: bool, *sys_info: str) -> None:
        text = "\n".join(self.block(trials, done))
        if self.out is None and in_notebook():
            self.show_in_cell(text)
        else:
            print(text, file=self.out or sys.stdout, flush=True)

    def show_in_cell(self, text: str) -> None:
        """The block in one output area of the running cell, replaced at each report."""
        from IPython.display import display

        content = {"text/plain": text, "text/html": f"<pre>{html.escape(text)}</pre>"}
        if self._cell is None:
            self._cell = display(content, raw=True, display_id=True)
        else:
            self._cell.update(content, raw=True)

    def block(self, trials: list, done: bool = False) -> list[str]:
        """The lines of one status block."""
        elapsed = time.monotonic() - self._start
        left = unfinished_trials(trials)
        counts = {status: sum(t.status == status for t in left) for status in ("RUNNING", "PAUSED", "PENDING")}
        ended = [t for t in trials if t.status in ENDED]
        failed = sum(t.status == "ERROR" for t in ended)
        stopped = sum(
            t.status == "TERMINATED" and (t.last_result or {}).get("epoch", 0) < self.max_epochs for t in ended
        )
        total = max(self.num_samples, len(trials))
        state = [f"{counts['RUNNING']} running"]
        if counts["PAUSED"]:
            state.append(f"{counts['PAUSED']} waiting at a rung")
        state += [
            f"{counts['PENDING'] + total - len(trials)} to start",
            f"{len(ended) - stopped - failed} completed",
            f"{stopped} stopped early",
            f"{failed} failed",
        ]
        lines = [f"[{clock(elapsed)}] trials: {', '.join(state)} (of {total})"]
        best = self.best(trials)
        if best is not None:
            best, score = best
            shown = percent(score) if self.metric.endswith("_acc") else f"{score:.4g}"
            settings = ", ".join(f"{name} {_short(best.config.get(name))}" for name in self.searched)
            lines.append(f"  best {self.metric} {shown}: trial {trial_label(best)} ({settings})")
        left = self.epochs_left(trials)
        if not done and left:
            pace = self.seconds_per_epoch(trials)
            estimate = f", about {clock(left * pace / max(1, self.concurrent))} left" if pace else ""
            lines.append(f"  {left} trial-epochs at most still to run{estimate}")
        return lines

    def best(self, trials: list) -> tuple[Any, float] | None:
        """(trial, value) of the best value of the metric any trial reported so far."""
        scored = [(t, v) for t in trials if (v := _best_value(t, self.metric, self.mode)) is not None]
        pick = max if self.mode == "max" else min
        return pick(scored, key=lambda pair: pair[1]) if scored else None

    def epochs_left(self, trials: list) -> int:
        started = sum(t.status not in ("PENDING",) for t in trials)
        running = sum(
            self.max_epochs - (t.last_result or {}).get("epoch", 0) for t in trials if t.status in ("RUNNING", "PAUSED")
        )
        waiting = self.max_epochs * (max(self.num_samples, len(trials)) - started)
        return max(0, running) + max(0, waiting)

    @staticmethod
    def seconds_per_epoch(trials: list) -> float:
        times = [(t.last_result or {}).get("epoch_seconds") for t in trials]
        times = [x for x in times if isinstance(x, (int, float)) and math.isfinite(x)]
        return sum(times) / len(times) if times else 0.0


def in_notebook() -> bool:
    """Whether this process is a Jupyter kernel (a notebook, JupyterLab, Colab), where output areas can update."""
    shell = sys.modules["IPython"].get_ipython() if "IPython" in sys.modules else None
    return shell is not None and getattr(shell, "kernel", None) is not None


def _best_value(trial: Any, metric: str, mode: str) -> float | None:
    """The best value of `metric` the trial reported (Ray keeps per-metric max/min in its metric analysis)."""
    analysis = getattr(trial, "metric_analysis", {}).get(metric, {})
    value = analysis.get(mode) if analysis else (trial.last_result or {}).get(metric)
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
