"""Search strategies: each searcher and each scheduler is one registry entry with its own options.

A space file (or the command line) names a searcher and a scheduler; the entry says what options
it takes (ASHA's grace period and reduction factor belong to ASHA), which partners it needs (a
searcher made for one scheduler names it), and how to build it from a `SearchSpec`. The space
validates against the entries; the search builds from them. Adding a strategy is one entry here
plus its test. Importing this module loads no Ray: the builders import it when they run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tune_inat.errors import UserError

if TYPE_CHECKING:
    from tune_inat.spec import SearchSpec


@dataclass(frozen=True)
class Option:
    """One knob of a strategy: its type, default, lowest value and what it means."""

    kind: type
    default: Any
    low: float
    help: str
    low_open: bool = False  # the lowest value itself is not allowed


@dataclass(frozen=True)
class Scheduler:
    """A Ray Tune trial scheduler: decides which trials continue."""

    name: str
    help: str
    build: Callable[[SearchSpec], Any]
    options: dict[str, Option] = field(default_factory=dict)
    reproducible: bool = True  # its decisions can be made independent of timing (in the reproducible mode)


@dataclass(frozen=True)
class Searcher:
    """A Ray Tune searcher: proposes configurations."""

    name: str
    help: str
    build: Callable[
        ..., Any
    ]  # (spec, Ray Tune space of searched settings, trials at once, study=None: where a searcher may keep its study)
    expands_grid: bool = False  # runs every combination of the listed values once (no num_samples)
    holds_space: bool = False  # built with the searched space itself (else Ray's param_space carries it)
    needs_values: bool = False  # takes only value/values, no distributions
    schedulers: tuple[str, ...] = ()  # the schedulers it works with; empty: any


SCHEDULERS: dict[str, Scheduler] = {}
SEARCHERS: dict[str, Searcher] = {}


def register_scheduler(entry: Scheduler) -> Scheduler:
    SCHEDULERS[entry.name] = entry
    return entry


def register_searcher(entry: Searcher) -> Searcher:
    SEARCHERS[entry.name] = entry
    return entry


def scheduler_entry(name: str, source: str = "tune_inat.scheduler") -> Scheduler:
    if name not in SCHEDULERS:
        raise UserError(f"{source}: {name!r} is not one of {', '.join(SCHEDULERS)}")
    return SCHEDULERS[name]


def searcher_entry(name: str, source: str = "tune_inat.searcher") -> Searcher:
    if name not in SEARCHERS:
        raise UserError(f"{source}: {name!r} is not one of {', '.join(SEARCHERS)}")
    return SEARCHERS[name]


def expands_grid(spec: SearchSpec) -> bool:
    """A grid: every combination of the listed values runs once (num_samples does not apply)."""
    return searcher_entry(spec.searcher).expands_grid


def check_option(owner: str, name: str, option: Option, value: Any, source: str) -> Any:
    """A strategy option's value, type-checked against its entry."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok and option.kind is int:
        ok = float(value).is_integer()
    if not ok or value < option.low or (option.low_open and value == option.low):
        bound = f"> {option.low:g}" if option.low_open else f">= {option.low:g}"
        word = "an integer" if option.kind is int else "a number"
        raise UserError(f"{source}: {owner}'s {name} must be {word} {bound}, got {value!r}")
    return option.kind(value)


def scheduler_options(name: str, given: dict[str, Any], source: str) -> dict[str, Any]:
    """Every option of scheduler `name`: the given ones checked, the others at their defaults."""
    entry = scheduler_entry(name, source)
    unknown = sorted(set(given) - set(entry.options))
    if unknown:
        allowed = ", ".join(entry.options) or "none"
        raise UserError(f"{source}: scheduler {name} takes no option {', '.join(unknown)} (its options: {allowed})")
    return {
        key: check_option(name, key, option, given.get(key, option.default), source)
        for key, option in entry.options.items()
    }


# -- schedulers ---------------------------------------------------------------------------------


def _build_fifo(spec: SearchSpec) -> Any:
    from ray.tune.schedulers import FIFOScheduler

    return FIFOScheduler()


def _build_asha(spec: SearchSpec) -> Any:
    from ray.tune.schedulers import ASHAScheduler

    from tune_inat.schedulers import OrderedASHA

    options = spec.options.scheduler_options
    rungs = dict(
        time_attr="epoch",
        max_t=spec.max_epochs,
        grace_period=min(options["grace_period"], spec.max_epochs),
        reduction_factor=options["reduction_factor"],
    )
    return OrderedASHA(**rungs) if spec.options.reproducible else ASHAScheduler(**rungs)


RUNG_OPTIONS = {
    "grace_period": Option(int, 1, 1, "epochs before a trial can be stopped (the first rung)"),
    "reduction_factor": Option(float, 3.0, 1, "keep 1/this of the trials at each rung", low_open=True),
}


def _build_pasha(spec: SearchSpec) -> Any:
    from tune_inat.schedulers import PASHA

    options = spec.options.scheduler_options
    return PASHA(
        time_attr="epoch",
        max_t=spec.max_epochs,
        grace_period=min(options["grace_period"], spec.max_epochs),
        reduction_factor=options["reduction_factor"],
        epsilon=options["epsilon"],
    )


def _build_hyperband(spec: SearchSpec) -> Any:
    from ray.tune.schedulers import ASHAScheduler

    from tune_inat.schedulers import OrderedASHA, use_bands

    options = spec.options.scheduler_options
    bands = [band for band in hyperband_bands(options) if band < spec.max_epochs]
    if not bands:  # no band before the last epoch: nothing is ever stopped
        return _build_fifo(spec)
    asha = OrderedASHA if spec.options.reproducible else ASHAScheduler
    scheduler = asha(time_attr="epoch", max_t=spec.max_epochs, grace_period=bands[0], reduction_factor=options["eta"])
    return use_bands(scheduler, bands, options["eta"], bool(options["strict"]))


def hyperband_bands(options: dict[str, Any]) -> list[int]:
    """W&B's band epochs for the `hyperband` scheduler's options (no Ray needed: `--plan` shows them)."""
    return wandb_bands(options["min_iter"], options["max_iter"], options["s"], options["eta"])


def wandb_bands(min_iter: int, max_iter: int, s: int, eta: float) -> list[int]:
    """The epochs W&B's hyperband stops at (its `sweeps` engine, hyperband_stopping.py), in order.

    With max_iter (and s): max_iter / eta, / eta^2, ... s of them, each rounded down, none below 1;
    max_iter itself is no band and caps nothing. With min_iter: min_iter * eta^k, rounded down.
    """
    bands: list[int] = []
    if max_iter:
        band = float(max_iter)
        for _ in range(int(s)):
            band /= eta
            if band < 1:
                break
            bands.append(int(band))
    else:
        band = float(min_iter)
        for _ in range(100):
            bands.append(int(band))
            band *= eta
    return sorted(set(bands))


register_scheduler(Scheduler("fifo", "every trial runs all its epochs", _build_fifo))
register_scheduler(
    Scheduler(
        "asha",
        "asynchronous successive halving: a trial continues at a rung if it is in the top 1/reduction_factor "
        "of the trials that reached it so far",
        _build_asha,
        dict(RUNG_OPTIONS),
    )
)
register_scheduler(
    Scheduler(
        "pasha",
        "ASHA whose maximum budget grows one rung at a time, only while the top two rungs rank trials "
        "differently (Bohdal et al. 2023)",
        _build_pasha,
        {**RUNG_OPTIONS, "epsilon": Option(float, 0.01, 0, "score differences below this are ties (noise)")},
        reproducible=False,
    )
)


register_scheduler(
    Scheduler(
        "hyperband",
        "W&B's hyperband early_terminate, as its sweeps engine computes it: bands at max_iter/eta^k (s of them) or "
        "min_iter*eta^k; at a band a trial below the int(n/eta)-th best of the n that reached it stops",
        _build_hyperband,
        {
            "min_iter": Option(int, 0, 0, "the first band (with eta: min_iter * eta^k); 0: use max_iter and s"),
            "max_iter": Option(int, 0, 0, "bands at max_iter / eta^k, k = 1..s (it caps no trial)"),
            "s": Option(int, 0, 0, "how many bands below max_iter"),
            "eta": Option(float, 3.0, 1, "keep about 1/eta at each band", low_open=True),
            "strict": Option(int, 1, 0, "1: judge the value at the band (W&B's default); 0: the best so far"),
        },
    )
)


# -- searchers ----------------------------------------------------------------------------------


def _build_optuna(spec: SearchSpec, space: dict[str, Any], max_concurrent: int, study: Any = None) -> Any:
    from tune_inat.searchers import optuna_searcher

    return optuna_searcher(spec, space, max_concurrent, study)


def _build_variants(spec: SearchSpec, space: dict[str, Any], max_concurrent: int, study: Any = None) -> Any:
    from ray.tune.search import BasicVariantGenerator

    from tune_inat.searchers import first_recipes

    first, _ = first_recipes(spec)  # random search learns nothing, but runs the known good recipes first
    return BasicVariantGenerator(random_state=spec.options.seed, points_to_evaluate=first or None)


register_searcher(
    Searcher(
        "optuna",
        "Optuna TPE (multivariate, seeded); early-stopped trials told as pruned",
        _build_optuna,
        holds_space=True,
    )
)
register_searcher(Searcher("random", "random sampling (seeded), as W&B's method: random", _build_variants))
register_searcher(
    Searcher(
        "grid", "every combination of the listed values, once", _build_variants, expands_grid=True, needs_values=True
    )
)
