"""What a search gives back in Python: `SearchResult`, read from what the search wrote.

`tune_inat.search(...)`, `tune_inat.final(...)` and `tune_inat.predict(...)` are the commands
`python -m tune_inat.search|final|predict`, their flags as keyword arguments: the names with
underscores (`max_epochs=2` is `--max-epochs 2`, `no_wandb=True` is `--no-wandb`, `reproducible=False`
is `--no-reproducible`, `set={"weights": "none"}` is `--set weights=none`). Each reads its keywords
through the command's own parser (`cli.command_flags`), so the API and the command line take the
same options and say the same one-line `UserError` about a bad one.
"""

from __future__ import annotations

import hashlib
import html
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


def space_file(space: dict[str, Any], results: str | Path) -> Path:
    """A W&B sweep given as a dict, written where the search's results go (a search names its space's file)."""
    text = yaml.safe_dump(space, sort_keys=False)
    path = Path(results) / ".spaces" / f"space-{hashlib.sha256(text.encode()).hexdigest()[:8]}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@dataclass(frozen=True)
class SearchResult:
    """A search's outcome, read from what it wrote: the Parquet tables as DataFrames, the best recipe, figures."""

    name: str
    path: str  # the results folder
    exit_code: int  # as the command's: 0 done, 1 the search failed, 130 interrupted
    message: str = ""  # why exit_code is not 0
    report: str = ""  # the command's summary and next steps

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    @property
    def trials(self) -> Any:
        """trials.parquet (running trials as `unfinished`), one row per trial."""
        from tune_inat.results import read_results

        return read_results(self.path).trials

    @property
    def epochs(self) -> Any:
        """epochs.parquet, one row per trial and epoch."""
        from tune_inat.results import read_results

        return read_results(self.path).epochs

    @property
    def best(self) -> dict[str, Any]:
        """The best trial's recipe (what best_config.yaml holds)."""
        from tune_inat.results import best_trial, read_search_record
        from tune_inat.settings import settings_of_row

        mode = read_search_record(self.path)["mode"]
        return settings_of_row(best_trial(self.trials, mode), "best").to_dict()

    def leaderboard(self, top: int = 10) -> Any:
        from tune_inat.analyze import leaderboard, load_search

        return leaderboard(load_search(self.path), top)

    @property
    def data(self) -> Path:
        """The dataset root the search ran on."""
        from tune_inat.results import read_search_record

        return Path(read_search_record(self.path)["data_root"])

    def plot_curves(self) -> Any:
        """The validation accuracy of every trial per epoch, as a matplotlib figure (analyze's learning_curves.png)."""
        import matplotlib.pyplot as plt

        from tune_inat.analyze import learning_curves_figure, load_search

        figure = learning_curves_figure(load_search(self.path))
        plt.close(figure)  # returned, not also drawn by pyplot: a notebook shows it once, as the cell's value
        return figure

    def final(self, **options: Any) -> Any:
        """`python -m tune_inat.final` on this search (confirm, re-train, test once, export): a `FinalResult`."""
        from tune_inat import final

        return final.run(self.path, **options)

    def _repr_html_(self) -> str:  # a notebook shows the leaderboard (and, if it did not finish, why and what next)
        state = "done" if self.ok else f"exit {self.exit_code}"
        lines = [f"<p>search <b>{html.escape(self.name)}</b> ({state}), {html.escape(self.path)}</p>"]
        if not self.ok:
            lines.append(f"<pre>{html.escape(self.message.strip())}</pre>")
            lines.append(f"<p>continue it with <code>tune_inat.search(..., resume=True, name={self.name!r})</code></p>")
        return "\n".join(lines) + self.leaderboard().to_html()
