"""Search spaces: a W&B sweep YAML file -> a validated `SearchSpec` -> a Ray Tune parameter space.

The file is the W&B sweep configuration users already write (`method`, `metric`, `parameters`,
`early_terminate`, `run_cap`), so an existing sweep runs unchanged. Our additions live under one
extra top-level key, `tune_inat:`. Every key and value is checked here, before Ray starts; a
problem is one line naming the file, the key and what is allowed.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from tune_inat.cli import read_yaml
from tune_inat.errors import UserError
from tune_inat.packing import GPUS_AUTO
from tune_inat.settings import FIELD_TYPES, TrainConfig, coerce_setting, coerce_settings
from tune_inat.spec import Parameter, SearchOptions, SearchSpec
from tune_inat.strategies import SCHEDULERS, SEARCHERS, expands_grid, scheduler_options, searcher_entry
from tune_inat.vocabulary import Reading, nearest_key, printable, resolve_metric, translate_parameters

SPACES_DIR = Path(__file__).resolve().parent.parent / "search_spaces"
METHODS = {"bayes": "optuna", "random": "random", "grid": "grid"}
GOALS = {"maximize": "max", "minimize": "min", "max": "max", "min": "min"}
DISTRIBUTIONS = (
    "constant",
    "categorical",
    "uniform",
    "int_uniform",
    "q_uniform",
    "log_uniform",
    "log_uniform_values",
    "q_log_uniform_values",
)
# W&B keys we read; the others W&B knows (program, command, ...) are accepted and ignored.
SWEEP_KEYS = {
    "method",
    "metric",
    "parameters",
    "early_terminate",
    "run_cap",
    "name",
    "description",
    "program",
    "command",
    "project",
    "entity",
    "tune_inat",
}
PARAMETER_KEYS = {"value", "values", "distribution", "min", "max", "q", "probabilities"}
OUR_KEYS = {"rename", "ignore"}  # in the tune_inat: block, beside the options: how to read the user's own names


def _fail(source: str, key: str, message: str) -> UserError:
    return UserError(f"{source}: {key}: {message}")


def parse_duration(text: str | float | int, source: str = "time_budget") -> float:
    """'2h', '90m', '1h30m', '45s' or a number of seconds -> seconds."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        match = re.fullmatch(r"\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s?)?\s*", str(text))
        if not match or not any(match.groups()):
            raise UserError(f"{source}: {text!r} is not a duration (examples: 2h, 90m, 1h30m, 3600)")
        hours, minutes, secs = (float(g) if g else 0.0 for g in match.groups())
        seconds = hours * 3600 + minutes * 60 + secs
    if seconds <= 0:
        raise UserError(f"{source}: the duration must be positive, got {text!r}")
    return seconds


def _parse_parameter(source: str, key: str, raw: Any, name: str | None = None) -> Parameter:
    """One parameter's W&B spec (values already in our terms) -> a checked Parameter of setting `name`."""
    where = f"parameters.{printable(key)}"
    name = name or key
    if not isinstance(raw, dict):
        raise _fail(source, where, f"expected a mapping such as {{value: ...}} or {{values: [...]}}, got {raw!r}")
    unknown = sorted(set(raw) - PARAMETER_KEYS)
    if unknown:
        raise _fail(source, where, f"unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(PARAMETER_KEYS))}")
    distribution = raw.get("distribution")
    if distribution is None:
        if "value" in raw:
            distribution = "constant"
        elif "values" in raw:
            distribution = "categorical"
        elif "min" in raw and "max" in raw:
            is_int = all(isinstance(raw[k], int) and not isinstance(raw[k], bool) for k in ("min", "max"))
            distribution = "int_uniform" if is_int else "uniform"
        else:
            raise _fail(source, where, "give value, values, or min and max (with a distribution)")
    if distribution not in DISTRIBUTIONS:
        raise _fail(
            source, where, f"distribution {distribution!r} is not supported; use one of {', '.join(DISTRIBUTIONS)}"
        )

    def coerce(value: Any) -> Any:
        return coerce_setting(name, value, f"{source}: {where}")

    if distribution == "constant":
        if "value" not in raw:
            raise _fail(source, where, "distribution constant needs a value")
        return Parameter(name, "constant", (coerce(raw["value"]),))
    if distribution == "categorical":
        values = raw.get("values")
        if not isinstance(values, list) or not values:
            raise _fail(source, where, f"values must be a non-empty list, got {values!r}")
        return Parameter(
            name, "categorical", tuple(coerce(v) for v in values), probabilities=_probabilities(raw, where, source)
        )
    for bound in ("min", "max"):
        if bound not in raw:
            raise _fail(source, where, f"distribution {distribution} needs min and max")
    kind = FIELD_TYPES.get(name)
    if kind not in (int, float):
        raise _fail(source, where, f"{name} takes no numeric range; use values: [...]")
    if kind is int and distribution in ("uniform", "log_uniform", "log_uniform_values"):
        raise _fail(source, where, f"{name} is a whole number: use int_uniform, a q_ distribution, or values")
    try:
        low, high = float(raw["min"]), float(raw["max"])
        q = float(raw["q"]) if "q" in raw else (1.0 if distribution.startswith("q_") else None)
    except (TypeError, ValueError):
        raise _fail(
            source, where, f"min, max and q must be numbers, got {raw.get('min')!r}, {raw.get('max')!r}"
        ) from None
    if distribution == "log_uniform":  # W&B: min and max are exponents of e
        low, high = math.exp(low), math.exp(high)
        distribution = "log_uniform_values"
    if not low < high:
        raise _fail(source, where, f"min ({raw['min']}) must be smaller than max ({raw['max']})")
    if distribution in ("log_uniform_values", "q_log_uniform_values") and low <= 0:
        raise _fail(source, where, f"a log distribution needs min > 0, got {raw['min']}")
    if q is not None and q <= 0:
        raise _fail(source, where, f"q must be positive, got {q}")
    if distribution == "int_uniform":
        low, high = coerce(low), coerce(high)
    return Parameter(name, distribution, (), low, high, q)


def _probabilities(raw: dict, where: str, source: str) -> tuple:
    """W&B's `probabilities` for `values`: one non-negative number each, adding up to 1."""
    if "probabilities" not in raw:
        return ()
    chances, values = raw["probabilities"], raw["values"]
    if (
        not isinstance(chances, list)
        or len(chances) != len(values)
        or not all(
            isinstance(p, (int, float)) and not isinstance(p, bool) and math.isfinite(p) and p >= 0 for p in chances
        )
    ):
        raise _fail(source, where, f"probabilities must be {len(values)} numbers >= 0, one per value, got {chances!r}")
    if abs(sum(chances) - 1) > 1e-3:
        raise _fail(source, where, f"probabilities must add up to 1, got {sum(chances):g}")
    return tuple(float(p) for p in chances)


def _check_values(spec: SearchSpec, written_as: dict[str, str] | None = None) -> list[str]:
    """Every value a trial can get must make a valid TrainConfig: the problems now, not in trial 17.

    Each problem names the key as the user wrote it (`written_as`: setting -> their key), and ours beside it."""
    written_as = written_as or {}

    def where(name: str) -> str:
        key = written_as.get(name, name)
        return f"parameters.{printable(key)}" + (f" ({name})" if key != name else "")

    def problem(values: dict[str, Any]) -> str | None:
        try:
            TrainConfig.from_dict({"backbone": spec.values_of("backbone")[0], "image_size": None, **values})
        except UserError as err:
            return str(err)
        return None

    problems = [
        f"{where(name)}: must be a value or a list of values, not a range (a decode cache is made for each size)"
        for name in ("backbone", "image_size")
        if name in spec.parameters and not spec.parameters[name].values
    ]
    if problems:
        return problems
    fixed = {name: p.values[0] for name, p in spec.parameters.items() if p.is_fixed and name != "image_size"}
    base = {}  # the fixed values that hold on their own: a bad one is told once, never blamed on another key
    for name, value in fixed.items():
        if name != "backbone" and (err := problem({name: value})):
            problems.append(f"{where(name)}: {err}")
        else:
            base[name] = value
    if len(base) == len(fixed) and (err := problem(base)):  # each fine alone, not together (grad_accum_steps)
        problems.append(f"parameters: {err}")
        base = {name: value for name, value in base.items() if name == "backbone"}
    for name, parameter in spec.parameters.items():
        if parameter.is_fixed or name in ("backbone", "image_size"):
            continue
        for value in parameter.candidates():
            if err := problem({**base, name: value}):
                problems.append(f"{where(name)}: {err}")
                break
    for backbone, size in itertools.product(spec.values_of("backbone"), spec.values_of("image_size")):
        if err := problem({**base, "backbone": backbone, "image_size": size}):
            problems.append(f"{where('image_size' if 'image_size' in err else 'backbone')}: {err}")
    layers = [f.partition(":")[2] for f in spec.values_of("freeze_form") if f.startswith("from:")]
    if layers:  # a layer to unfreeze from must be one of each backbone's own
        from tune_inat.models import layer_names_of

        for backbone, layer in itertools.product(spec.values_of("backbone"), layers):
            names = layer_names_of(backbone)
            if layer not in names and not any(n.startswith(layer + ".") for n in names):
                top = [n for n in names if "." not in n]
                problems.append(
                    f"{where('freeze_form')}: {backbone} has no layer {layer!r}; its layers: {', '.join(top)}"
                )
    return problems


def _parse_options(source: str, raw: Any, sweep: dict[str, Any]) -> SearchOptions:
    """Our `tune_inat:` block, plus what W&B's own keys say (run_cap, early_terminate, method)."""
    values: dict[str, Any] = {}
    method = sweep.get("method", "bayes")
    if method not in METHODS:
        raise _fail(source, "method", f"{method!r} is not one of {', '.join(METHODS)}")
    values["searcher"] = METHODS[method]
    if "run_cap" in sweep:
        values["num_samples"] = sweep["run_cap"]
    early = sweep.get("early_terminate")
    if early is not None:
        values["scheduler"], values["scheduler_options"] = "hyperband", _hyperband_options(source, early)
    raw = raw or {}
    if not isinstance(raw, dict):
        raise _fail(source, "tune_inat", f"expected a mapping, got {raw!r}")
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        if key in OUR_KEYS:
            continue
        if key in ("resources", "data") and isinstance(value, dict):
            flat.update(value)  # grouped keys are accepted for readability
        elif key == "scheduler" and isinstance(value, dict):  # {type: asha, grace_period: 2, ...}
            flat["scheduler"] = value.get("type", values.get("scheduler", "asha"))
            flat["scheduler_options"] = {k: v for k, v in value.items() if k != "type"}
        else:
            flat[key] = value
    if "time_budget" in flat:
        flat["time_budget_s"] = parse_duration(flat.pop("time_budget"), f"{source}: tune_inat.time_budget")
    known = {f.name for f in fields(SearchOptions)}
    unknown = sorted(set(flat) - known)
    if unknown:
        raise _fail(
            source,
            "tune_inat",
            f"unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(known | {'time_budget'}))}",
        )
    values.update(flat)
    return check_options(SearchOptions(**{k: v for k, v in values.items()}), source)


def _hyperband_options(source: str, early: Any) -> dict[str, Any]:
    """W&B's early_terminate, checked as W&B's schema checks it: {type: hyperband} with min_iter, or max_iter and s."""
    if not isinstance(early, dict) or early.get("type") != "hyperband":
        raise _fail(source, "early_terminate", "only {type: hyperband, ...} is supported (as in W&B)")
    unknown = sorted(set(early) - {"type", "min_iter", "eta", "max_iter", "s", "strict"})
    if unknown:
        raise _fail(
            source,
            "early_terminate",
            f"unknown key(s) {', '.join(unknown)}; W&B's are min_iter, max_iter, s, eta, strict",
        )
    if "max_iter" in early and "s" not in early:
        raise _fail(source, "early_terminate", "max_iter needs s (how many bands below it), as W&B's schema says")
    if "max_iter" not in early and "min_iter" not in early:
        raise _fail(source, "early_terminate", "give min_iter, or max_iter and s")
    strict = early.get("strict", True)
    if not isinstance(strict, bool):
        raise _fail(source, "early_terminate.strict", f"must be true or false, got {strict!r}")
    options = {key: early[key] for key in ("min_iter", "max_iter", "s", "eta") if key in early}
    return {**options, "strict": int(strict)}


def check_options(options: SearchOptions, source: str) -> SearchOptions:
    """Type and range checks of the options (after the file and after command-line overrides)."""

    def number(key: str, value: Any, kind: type, low: float, low_open: bool = False) -> Any:
        if value is None:
            return None
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok and kind is int:
            ok = float(value).is_integer()
        if not ok or value < low or (low_open and value == low):
            bound = f"> {low}" if low_open else f">= {low}"
            raise _fail(
                source,
                f"tune_inat.{key}",
                f"must be {'an integer' if kind is int else 'a number'} {bound}, got {value!r}",
            )
        return kind(value)

    checked = {
        "num_samples": number("num_samples", options.num_samples, int, 1),
        "max_epochs": number("max_epochs", options.max_epochs, int, 1),
        "gpus_per_trial": options.gpus_per_trial
        if options.gpus_per_trial == GPUS_AUTO
        else number("gpus_per_trial", options.gpus_per_trial, float, 0),
        "cpus_per_trial": number("cpus_per_trial", options.cpus_per_trial, float, 0, low_open=True),
        "max_concurrent_trials": number("max_concurrent_trials", options.max_concurrent_trials, int, 1),
        "time_budget_s": number("time_budget_s", options.time_budget_s, float, 0, low_open=True),
        "seed": number("seed", options.seed, int, 0),
        "max_failures": number("max_failures", options.max_failures, int, 0),
        "split_seed": number("split_seed", options.split_seed, int, 0),
    }
    if options.scheduler not in SCHEDULERS:
        raise _fail(source, "tune_inat.scheduler", f"{options.scheduler!r} is not one of {', '.join(SCHEDULERS)}")
    if options.searcher is not None and options.searcher not in SEARCHERS:
        raise _fail(source, "tune_inat.searcher", f"{options.searcher!r} is not one of {', '.join(SEARCHERS)}")
    if not isinstance(options.scheduler_options, dict):
        raise _fail(source, "tune_inat.scheduler", f"options must be a mapping, got {options.scheduler_options!r}")
    checked["scheduler_options"] = scheduler_options(
        options.scheduler, options.scheduler_options, f"{source}: tune_inat.scheduler"
    )
    checked["start_with"] = _recipes(options.start_with, source)
    if options.warm_start is not None and not isinstance(options.warm_start, str):
        raise _fail(source, "tune_inat.warm_start", f"must be a results folder, got {options.warm_start!r}")
    if not isinstance(options.reproducible, bool):
        raise _fail(source, "tune_inat.reproducible", f"must be true or false, got {options.reproducible!r}")
    if options.reproducible and not SCHEDULERS[options.scheduler].reproducible:
        raise _fail(
            source,
            "tune_inat.reproducible",
            f"scheduler {options.scheduler} cannot decide in trial order; "
            f"use {', '.join(n for n, e in SCHEDULERS.items() if e.reproducible)}, or turn the reproducible mode off "
            f"(--no-reproducible on the command line, reproducible: false in the file)",
        )
    if not isinstance(options.val_fraction, (int, float)) or not 0 < options.val_fraction < 1:
        raise _fail(source, "tune_inat.val_fraction", f"must be between 0 and 1, got {options.val_fraction!r}")
    bands = checked["scheduler_options"]
    if options.scheduler == "hyperband" and not (
        bands["min_iter"] >= 1 or (bands["max_iter"] >= 1 and bands["s"] >= 1)
    ):
        raise _fail(
            source, "tune_inat.scheduler", "hyperband needs min_iter >= 1, or max_iter and s (as W&B's schema says)"
        )
    gpus = checked["gpus_per_trial"]
    if isinstance(gpus, float) and gpus > 1 and not gpus.is_integer():
        raise _fail(source, "tune_inat.gpus_per_trial", f"a share above 1 must be a whole number of GPUs, got {gpus}")
    return replace(options, **checked)


def _recipes(raw: Any, source: str) -> tuple:
    """`start_with` as a tuple of {setting: value} with canonical names and typed values."""
    if raw in (None, (), []):
        return ()
    if not isinstance(raw, (list, tuple)) or not all(isinstance(entry, dict) for entry in raw):
        raise _fail(source, "tune_inat.start_with", "must be a list of recipes, each a mapping of settings to values")
    return tuple(coerce_settings(entry, f"{source}: tune_inat.start_with") for entry in raw)


def check_start_with(spec: SearchSpec) -> None:
    """Each recipe to try first lies in the space: its fixed settings as fixed, its searched ones within range."""
    for index, recipe in enumerate(spec.options.start_with):
        where = f"tune_inat.start_with[{index}]"
        for name, value in recipe.items():
            parameter = spec.parameters.get(name)
            if parameter is None:
                raise _fail(spec.source, where, f"{name} is not a setting of this space; give only its parameters")
            if parameter.values and value not in parameter.values:
                allowed = "fixed at " if parameter.is_fixed else "one of "
                raise _fail(
                    spec.source, where, f"{name} {value!r} is not in the space ({allowed}{list(parameter.values)})"
                )
            if not parameter.values and not parameter.low <= value <= parameter.high:
                raise _fail(spec.source, where, f"{name} {value!r} is outside [{parameter.low:g}, {parameter.high:g}]")


@dataclass(frozen=True)
class SpaceReading:
    """A space file read: the spec, and how each of the user's keys was read (for --plan)."""

    spec: SearchSpec
    readings: tuple[Reading, ...] = ()


def one_error(source: str, problems: list[str]) -> UserError:
    """Every problem of a file in one message, on one line: the count, then each problem after a ' | '."""
    unique = list(dict.fromkeys(p.removeprefix(f"{source}: ") for p in problems))
    if len(unique) == 1:
        return UserError(f"{source}: {unique[0]}")
    return UserError(f"{source}: {len(unique)} problems: " + " | ".join(unique))


def _attempt(problems: list[str], function: Any, *args: Any) -> Any:
    """Call `function`; a UserError becomes one more problem (and None)."""
    try:
        return function(*args)
    except UserError as err:
        problems.append(str(err))
        return None


def read_space(raw: Any, source: str) -> SpaceReading:
    """A W&B sweep mapping, in stages: the YAML as written -> the user's vocabulary translated -> every value
    checked -> the SearchSpec. Every problem of every stage is told at once."""
    if not isinstance(raw, dict):
        raise UserError(
            f"{source}: expected a W&B sweep mapping (method, metric, parameters), got {type(raw).__name__}"
        )
    problems: list[str] = []
    unknown = sorted(set(map(str, raw)) - SWEEP_KEYS)
    for key in unknown:
        problems.append(
            f"{printable(key)}: unknown top-level key{nearest_key(key, sorted(SWEEP_KEYS))}; "
            f"W&B's and ours: {', '.join(sorted(SWEEP_KEYS))}"
        )
    ours = raw.get("tune_inat") if isinstance(raw.get("tune_inat"), dict) else {}
    rename, ignore = ours.get("rename") or {}, ours.get("ignore") or []
    if not isinstance(rename, dict) or not all(isinstance(v, str) for v in rename.values()):
        problems.append(f"tune_inat.rename: expected a mapping of your keys to settings, got {rename!r}")
        rename = {}
    if not isinstance(ignore, list):
        problems.append(f"tune_inat.ignore: expected a list of keys, got {ignore!r}")
        ignore = []
    metric, mode = _attempt(problems, _parse_metric, source, raw.get("metric")) or ("val_acc", "max")
    parameters_raw = raw.get("parameters")
    parameters: dict[str, Parameter] = {}
    readings: list[Reading] = []
    written_as: dict[str, str] = {}
    if not isinstance(parameters_raw, dict) or not parameters_raw:
        problems.append("parameters: a mapping of settings is required")
    else:
        translated, readings, translate_problems = translate_parameters(
            parameters_raw, set(FIELD_TYPES), {str(k): v for k, v in rename.items()}, set(map(str, ignore))
        )
        problems += translate_problems
        written_as = {item.setting: item.key for item in translated}
        for item in translated:
            parameter = _attempt(problems, _parse_parameter, source, item.key, item.spec, item.setting)
            if parameter is not None:
                parameters[parameter.name] = parameter
    options = _attempt(problems, _parse_options, source, raw.get("tune_inat"), raw)
    if problems or options is None:
        if options is not None and parameters:  # the values that did translate are checked too, in the same message
            spec = SearchSpec(source, metric, mode, parameters, options)
            problems += _attempt(problems, _check_values, spec, written_as) or []
        raise one_error(source, problems)
    spec = SearchSpec(source, metric, mode, parameters, options)
    for check in (check_searcher_fits, check_start_with):
        _attempt(problems, check, spec)
    problems += _check_values(spec, written_as)
    if problems:
        raise one_error(source, [str(p) for p in problems])
    return SpaceReading(spec, tuple(readings))


def _parse_metric(source: str, raw: Any) -> tuple[str, str]:
    """W&B's metric block -> (our metric, max|min); the user's names for it are understood (valid_acc, ...)."""
    metric_raw = raw or {"name": "val_acc", "goal": "maximize"}
    if not isinstance(metric_raw, dict) or set(metric_raw) - {"name", "goal", "target"}:
        raise _fail(source, "metric", "expected {name: val_acc, goal: maximize}")
    metric, why = resolve_metric(metric_raw.get("name", "val_acc"))
    if metric is None:
        raise _fail(source, "metric.name", why)
    goal = metric_raw.get("goal", "minimize" if metric.endswith("loss") else "maximize")
    if goal not in GOALS:
        raise _fail(source, "metric.goal", f"{goal!r} is not maximize or minimize")
    return metric, GOALS[goal]


def parse_space(raw: Any, source: str) -> SearchSpec:
    """A W&B sweep mapping -> a validated SearchSpec."""
    return read_space(raw, source).spec


def check_searcher_fits(spec: SearchSpec) -> None:
    """The searcher takes these parameters and works with this scheduler."""
    entry = searcher_entry(spec.searcher)
    if entry.needs_values:
        ranged = [name for name, p in spec.parameters.items() if not p.values]
        if ranged:
            raise _fail(
                spec.source,
                f"parameters.{ranged[0]}",
                f"{spec.searcher} search needs value or values, not a distribution",
            )
    if entry.expands_grid and any(p.probabilities for p in spec.parameters.values()):
        name = next(n for n, p in spec.parameters.items() if p.probabilities)
        raise _fail(
            spec.source,
            f"parameters.{name}",
            "grid search runs every value once: probabilities do not apply (W&B refuses them too)",
        )
    if entry.expands_grid and not any(p.distribution == "categorical" for p in spec.parameters.values()):
        raise _fail(spec.source, "parameters", f"{spec.searcher} search needs at least one parameter with values")
    if entry.schedulers and spec.options.scheduler not in entry.schedulers:
        raise _fail(
            spec.source,
            "tune_inat.scheduler",
            f"searcher {spec.searcher} works only with scheduler "
            f"{' or '.join(entry.schedulers)}, not {spec.options.scheduler}",
        )


def resolve_space_path(name_or_path: str | Path) -> Path:
    """A path, or the name of a shipped space ('default', 'quick', 'demo', 'seed_sweep')."""
    path = Path(name_or_path)
    if path.exists() or path.suffix in (".yaml", ".yml") or "/" in str(name_or_path):
        return path
    return SPACES_DIR / f"{name_or_path}.yaml"


def load_space(path: str | Path) -> SearchSpec:
    return read_space_file(path).spec


def read_space_file(path: str | Path) -> SpaceReading:
    path = resolve_space_path(path)
    return read_space(read_yaml(path, "search space file"), str(path))


def with_overrides(spec: SearchSpec, scheduler_options: dict[str, Any] | None = None, **overrides: Any) -> SearchSpec:
    """Command-line values (None = not given) override the file's options; checked again.

    `scheduler_options` (such as grace_period) are merged into the file's when the scheduler stays
    the same, and replace them when the command line names another scheduler.
    """
    given = {k: v for k, v in overrides.items() if v is not None}
    same_scheduler = given.get("scheduler", spec.options.scheduler) == spec.options.scheduler
    given["scheduler_options"] = {
        **(spec.options.scheduler_options if same_scheduler else {}),
        **(scheduler_options or {}),
    }
    options = check_options(replace(spec.options, **given), "command line")
    spec = replace(spec, options=options)
    check_searcher_fits(spec)
    check_start_with(spec)
    return spec


def with_fixed(spec: SearchSpec, settings: dict[str, Any]) -> SearchSpec:
    """Fix settings for every trial (e.g. `--set weights=none`), replacing the space's entries; checked again."""
    if not settings:
        return spec
    parameters = dict(spec.parameters)
    translated, _, problems = translate_parameters(
        {key: {"value": value} for key, value in settings.items()}, set(FIELD_TYPES), {}, set()
    )
    for item in translated:
        parameter = _attempt(problems, _parse_parameter, "--set", item.key, item.spec, item.setting)
        if parameter is not None:
            if parameter.name == "freeze_form" and parameter.values[0]:  # a freeze form replaces the fraction
                parameters.pop("freeze_fraction", None)
            if parameter.name == "freeze_fraction":
                parameters.pop("freeze_form", None)
            parameters[parameter.name] = parameter
    if problems:
        raise one_error("--set", [p.replace("parameters.", "", 1) for p in problems])
    # the fixed value wins over a recipe's: drop the settings --set fixes from the recipes to try first
    recipes = tuple(
        {k: v for k, v in r.items() if k not in parameters or not parameters[k].is_fixed}
        for r in spec.options.start_with
    )
    spec = replace(spec, parameters=parameters, options=replace(spec.options, start_with=recipes))
    check_searcher_fits(spec)
    problems = _check_values(spec, {item.setting: item.key for item in translated})
    if problems:
        raise one_error("--set", [p.replace("parameters.", "", 1) for p in problems])
    check_start_with(spec)
    return spec


def to_tune_space(spec: SearchSpec) -> dict[str, Any]:
    """The Ray Tune `param_space`: fixed values as they are, searched ones as Tune domains."""
    return {**spec.fixed(), **searched_tune_space(spec)}


def searched_tune_space(spec: SearchSpec) -> dict[str, Any]:
    """The searched settings as Ray Tune domains (grid_search lists for a grid searcher)."""
    from ray import tune  # Ray stays out of the validation path above

    space: dict[str, Any] = {}
    for name, p in spec.parameters.items():
        if p.is_fixed:
            continue
        if p.distribution == "categorical" and p.probabilities and spec.searcher == "random":
            space[name] = tune.choice(weighted_choices(p.values, p.probabilities))
        elif p.distribution == "categorical":
            space[name] = tune.grid_search(list(p.values)) if expands_grid(spec) else tune.choice(list(p.values))
        elif p.distribution == "uniform":
            space[name] = tune.uniform(p.low, p.high)
        elif p.distribution == "int_uniform":
            space[name] = tune.randint(int(p.low), int(p.high) + 1)  # W&B's max is inclusive
        elif p.distribution == "q_uniform":
            space[name] = tune.quniform(p.low, p.high, p.q)
        elif p.distribution == "log_uniform_values":
            space[name] = tune.loguniform(p.low, p.high)
        else:  # q_log_uniform_values
            space[name] = tune.qloguniform(p.low, p.high, p.q)
    return space


def weighted_choices(values: tuple, probabilities: tuple, resolution: int = 1000) -> list:
    """`values` repeated in proportion to `probabilities` (to 1/resolution), so a uniform choice among them draws
    each value with its W&B probability (Ray's tune.choice has no weights)."""
    counts = [round(p * resolution) for p in probabilities]
    return [value for value, count in zip(values, counts) for _ in range(count)]
