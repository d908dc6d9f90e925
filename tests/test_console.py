"""What a person sees: a seeded search that repeats, a short console without Ray's internals, help on every flag."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pandas as pd
import pytest
from conftest import run_cli, trials_by_number

CONSOLE_LINE_BUDGET = 45  # the demo's whole console (README, "The demo's console"): status blocks, leaderboard, paths
RAY_INTERNALS = [
    r"WARNING",
    r"core_worker",
    r"Result logdir",
    r"Tuner\.restore",
    r"Could not fetch metrics",
    r"== Status ==",
    r"[Aa]uthentication",
    r"A new study created",
    r"operation took",
    r"Traceback",
    r"\.py:\d+ --",
    r"logging\.cc",
]


@pytest.mark.slow
def test_the_demo_repeats_exactly_and_its_console_is_short(demo_search, tmp_path: Path) -> None:
    """The demo again, from the command line, with trial 1 held back 4 s so trials report in another order."""
    result = run_cli(
        "tune_inat.search",
        "--demo",
        "--name",
        "again",
        "--results",
        str(tmp_path / "results"),
        env={"TUNE_INAT_CACHE": str(tmp_path / "cache"), "TUNE_INAT_FAULTS": "1:1:slow:4", "WANDB_MODE": "offline"},
        timeout=900,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    first, second = trials_by_number(demo_search.folder), trials_by_number(tmp_path / "results" / "again")
    pd.testing.assert_frame_equal(first, second)  # the same trials, the same stops, the same scores
    from tune_inat.results import rank_trials
    from tune_inat.settings import read_settings_text, settings_of_row

    best = rank_trials(pd.read_parquet(demo_search.folder / "trials.parquet"), "max").iloc[0]
    written = (tmp_path / "results" / "again" / "best_config.yaml").read_text()
    assert read_settings_text(written, "best_config.yaml") == settings_of_row(best, "best").to_dict()  # same winner

    console = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    console = [line for line in console if not line.startswith("decoding ")]  # the one-time cache build's bar
    print("\n".join(console))
    # a status block comes every 30 s, so a slow host prints more of them: the rest of the console is fixed
    block = re.compile(r"\[\d+:\d\d(:\d\d)?\] trials: |  best \w+ .*: trial |  \d+ trial-epochs at most still to run")
    rest = [line for line in console if not block.match(line)]
    assert len(rest) <= CONSOLE_LINE_BUDGET - 3 * 5, len(rest)  # the README's demo console: 5 blocks of 3 lines
    for pattern in RAY_INTERNALS:
        assert not any(re.search(pattern, line) for line in console), pattern
    assert any(line.startswith("[") and "trials:" in line for line in console)  # the status block
    assert any("python -m tune_inat.analyze" in line for line in console)  # the next steps
    assert any("python -m tune_inat.final" in line for line in console)


def _parsers() -> dict[str, argparse.ArgumentParser]:
    from tune_inat.analyze import analyze_parser
    from tune_inat.clean import clean_parser
    from tune_inat.data.__main__ import data_parser
    from tune_inat.final import final_parser
    from tune_inat.models import models_parser
    from tune_inat.predict import predict_parser
    from tune_inat.search import search_parser
    from tune_inat.train import train_parser

    found = {}
    for name, parser in {
        "search": search_parser(),
        "train": train_parser(),
        "analyze": analyze_parser(),
        "final": final_parser(),
        "predict": predict_parser(),
        "clean": clean_parser(),
        "data": data_parser(),
        "models": models_parser(),
    }.items():
        found[name] = parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                found.update({f"{name} {sub}": subparser for sub, subparser in action.choices.items()})
    return found


def test_every_flag_and_argument_of_every_command_has_help() -> None:
    missing = []
    for command, parser in _parsers().items():
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            if not (action.help or "").strip() or action.help == argparse.SUPPRESS:
                missing.append(f"{command}: {'/'.join(action.option_strings) or action.dest}")
    assert not missing, missing


def test_every_command_shares_the_common_flags() -> None:
    for command, parser in _parsers().items():
        if " " in command:
            continue  # sub-commands inherit them from their command
        flags = {flag for action in parser._actions for flag in action.option_strings}
        assert {"--debug", "--quiet", "--verbose"} <= flags, command


def test_help_shows_defaults_and_choices() -> None:
    from tune_inat.strategies import SCHEDULERS, SEARCHERS

    search = " ".join(_parsers()["search"].format_help().split())
    for registry in (SCHEDULERS, SEARCHERS):
        assert "{" + ",".join(registry) + "}" in search
    for name in SCHEDULERS:
        assert f"{name}:" in search  # each scheduler explained in --help
    train = _parsers()["train"].format_help()
    assert "(default resnet50)" in train and "(default imagenet)" in train
    assert "{auto,cpu,cuda}" in train


def test_missing_weights_name_every_backbone_and_the_flag(tmp_path: Path) -> None:
    result = run_cli(
        "tune_inat.search",
        "--data",
        str(tmp_path),
        "--space",
        "quick",
        "--no-wandb",
        env={"TORCH_HOME": str(tmp_path / "empty-torch-home")},
    )
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1
    for backbone in ("resnet50", "efficientnet_v2_s", "convnext_tiny"):
        assert backbone in errors[0]
    assert "python -m tune_inat.models fetch resnet50 efficientnet_v2_s convnext_tiny" in errors[0]
    assert "--set weights=none" in errors[0]


def test_make_demo_says_where_it_wrote_and_check_counts_the_test_set(tmp_path: Path) -> None:
    made = run_cli(
        "tune_inat.data", "make-demo", str(tmp_path / "demo"), "--train-per-class", "4", "--test-per-class", "2"
    )
    assert made.returncode == 0 and str(tmp_path / "demo") in made.stdout
    checked = run_cli(
        "tune_inat.data", "check", str(tmp_path / "demo"), "--image-size", "32", "--cache-dir", str(tmp_path / "cache")
    )
    assert checked.returncode == 0, checked.stderr[-2000:]
    assert "30 train + 10 validation + 20 test images" in checked.stdout


def test_analyze_skips_folders_that_hold_no_search(demo_search, tmp_path: Path, capsys) -> None:
    import shutil

    from tune_inat.analyze import main as analyze_main

    search = tmp_path / "demo"
    shutil.copytree(demo_search.folder, search, ignore=shutil.ignore_patterns("trial_*"))
    (tmp_path / "train-resnet18-1").mkdir()
    (tmp_path / "comparison").mkdir()
    code = analyze_main([str(search), str(tmp_path / "train-resnet18-1"), str(tmp_path / "comparison"), "--quiet"])
    out = capsys.readouterr().out
    assert code == 0
    assert f"skipped {tmp_path / 'train-resnet18-1'}" in out and f"skipped {tmp_path / 'comparison'}" in out
    assert "=== demo" in out
