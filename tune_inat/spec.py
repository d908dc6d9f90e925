"""What a search is, as data: its parameters (in W&B terms), its options and the `SearchSpec` holding both.

Reading a space file (`space.py`) ends in a `SearchSpec`; the search, the searchers and the warm start
take one. This module only holds the shapes and reads them back from `search.json`, so every layer
can use them without importing how a file is read.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from tune_inat.backbones import get_backbone
from tune_inat.errors import UserError
from tune_inat.settings import TrainConfig


@dataclass(frozen=True)
class Parameter:
    """One searched or fixed setting, in W&B terms."""

    name: str  # canonical TrainConfig field name
    distribution: str  # one of DISTRIBUTIONS
    values: tuple = ()  # constant: one value; categorical: the choices
    low: float | None = None
    high: float | None = None
    q: float | None = None
    probabilities: tuple = ()  # categorical: the chance of each value in random search (W&B's probabilities)

    @property
    def is_fixed(self) -> bool:
        return self.distribution == "constant"

    def candidates(self) -> tuple:
        """Every value worth checking: the choices, or the range's ends."""
        return self.values if self.values else (self.low, self.high)


@dataclass(frozen=True)
class SearchOptions:
    """Our additions (the `tune_inat:` key), every one overridable from the command line."""

    num_samples: int = 8
    max_epochs: int | None = None  # cap on every trial's epochs; ASHA's max_t. None: the space's largest
    scheduler: str = "asha"
    scheduler_options: dict[str, Any] = field(default_factory=dict)  # the scheduler's own knobs (strategies.py)
    searcher: str | None = None  # None: from `method`
    gpus_per_trial: float | str | None = None  # None: 0.25 where there are GPUs, else 0; "auto": by memory
    cpus_per_trial: float | None = None  # None: 2 with GPUs, 1 without
    max_concurrent_trials: int | None = None  # None: as many as the resources fit
    time_budget_s: float | None = None
    seed: int = 0
    max_failures: int = 1
    val_fraction: float = 0.2
    split_seed: int = 0
    reproducible: bool = False  # decisions in trial order: the same seed gives the same trials and winner
    start_with: tuple = ()  # recipes (settings -> value) the searcher tries first (Ray's points_to_evaluate)
    warm_start: str | None = None  # an earlier search's results folder whose finished trials the searcher learns from


@dataclass(frozen=True)
class SearchSpec:
    source: str
    metric: str
    mode: str
    parameters: dict[str, Parameter]
    options: SearchOptions = field(default_factory=SearchOptions)

    @property
    def searcher(self) -> str:
        return self.options.searcher or "optuna"

    def searched(self) -> list[str]:
        """The settings that vary between trials."""
        return [name for name, p in self.parameters.items() if not p.is_fixed]

    def fixed(self) -> dict[str, Any]:
        """The settings every trial shares."""
        return {name: p.values[0] for name, p in self.parameters.items() if p.is_fixed}

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form, written into search.json; `spec_from_dict` reads it back."""
        return {
            "source": self.source,
            "metric": self.metric,
            "mode": self.mode,
            "parameters": {
                name: {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(p).items()}
                for name, p in self.parameters.items()
            },
            "options": asdict(self.options),
        }

    def values_of(self, name: str) -> tuple:
        """All values a discrete setting can take (the TrainConfig default if not in the space)."""
        parameter = self.parameters.get(name)
        if parameter is None:
            return (getattr(TrainConfig(), name),)
        if parameter.values:
            return parameter.values
        raise UserError(f"{self.source}: parameters.{name} must be a value or a list of values, not a range")

    def largest_epochs(self) -> int:
        parameter = self.parameters.get("epochs")
        if parameter is None:
            return TrainConfig().epochs
        return int(max(parameter.candidates()))

    @property
    def max_epochs(self) -> int:
        return self.options.max_epochs or self.largest_epochs()

    def backbone_sizes(self) -> set[tuple[str, int]]:
        """Every (backbone, input resolution) a trial can be: what `--gpus-per-trial auto` measures."""
        return {
            (backbone, size or get_backbone(backbone).native_size)
            for backbone, size in itertools.product(self.values_of("backbone"), self.values_of("image_size"))
        }

    def image_sizes(self) -> set[int]:
        """Every input resolution a trial can use: the decode cache is built once for each."""
        sizes = set()
        for backbone, size in itertools.product(self.values_of("backbone"), self.values_of("image_size")):
            sizes.add(size or get_backbone(backbone).native_size)
        return sizes


def spec_from_dict(raw: Any, source: str) -> SearchSpec:
    """A SearchSpec from `SearchSpec.to_dict()` output (search.json); damage is one UserError naming `source`."""
    try:
        parameters = {
            name: Parameter(**{**p, "values": tuple(p["values"]), "probabilities": tuple(p.get("probabilities", ()))})
            for name, p in raw["parameters"].items()
        }
        options = SearchOptions(**{**raw["options"], "start_with": tuple(raw["options"].get("start_with", ()))})
        return SearchSpec(raw["source"], raw["metric"], raw["mode"], parameters, options)
    except (KeyError, TypeError, AttributeError) as err:
        raise UserError(f"{source}: the saved search space is damaged ({type(err).__name__}: {err})") from None


def _describe(parameter: Parameter | None) -> str:
    if parameter is None:
        return "default"
    if parameter.is_fixed:
        return repr(parameter.values[0])
    span = f" {list(parameter.values)}" if parameter.values else f" [{parameter.low:g}, {parameter.high:g}]"
    return parameter.distribution + span


def differences(saved: SearchSpec, given: SearchSpec) -> list[str]:
    """What `given` changes against `saved`, one phrase each ("metric val_acc -> val_loss"); [] when the same search."""
    changes = []
    for key in ("metric", "mode"):
        if getattr(saved, key) != getattr(given, key):
            changes.append(f"{key} {getattr(saved, key)} -> {getattr(given, key)}")
    for name in sorted(set(saved.parameters) | set(given.parameters)):
        a, b = saved.parameters.get(name), given.parameters.get(name)
        if a != b:
            changes.append(f"parameters.{name} {_describe(a)} -> {_describe(b)}")
    for option in fields(SearchOptions):
        a, b = getattr(saved.options, option.name), getattr(given.options, option.name)
        if a != b:
            changes.append(f"{option.name} {a!r} -> {b!r}")
    return changes
