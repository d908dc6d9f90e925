"""The Python API: the same search, final and predict as the command line, from Python, with the same results."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import run_cli, trials_by_number

import tune_inat
from tune_inat.api import SearchResult


def test_the_api_runs_the_command_lines_search_final_and_predict_with_the_same_results(
    loss_search, tmp_path: Path
) -> None:
    """loss_search ran `python -m tune_inat.search ...`, analyze and final; here the same from Python."""
    cli_folder = loss_search[0]
    root = cli_folder.parent.parent
    result = tune_inat.search(
        demo=True,
        space=root / "loss.yaml",
        num_samples=4,
        max_epochs=2,
        scheduler="fifo",
        gpus_per_trial=0,
        cpus_per_trial=1,
        set={"image_size": 32},
        no_wandb=True,
        quiet=True,
        results=tmp_path / "results",
        name="loss",
        cache_dir=root / "cache",
    )
    assert isinstance(result, SearchResult) and result.ok, result.message
    api_folder = Path(result.path)
    pd.testing.assert_frame_equal(trials_by_number(cli_folder), trials_by_number(api_folder))  # same seed, same
    assert len(result.trials) == 4 and len(result.epochs) == result.trials["epochs_run"].sum()
    assert result.best == yaml.safe_load((cli_folder / "best_config.yaml").read_text())
    board = result.leaderboard()
    assert list(board["trial_id"])[0] == result.trials.sort_values("best_score")["trial_id"].iloc[0]  # lowest loss
    figure = result.plot_curves()
    assert len(figure.axes[0].lines) >= len(result.trials)  # one curve per trial (and the legend's samples)
    assert "<table" in result._repr_html_()

    final = result.final(top_k=1, seeds=1, max_epochs=1, device="cpu", quiet=True)
    cli_summary = json.loads((cli_folder / "final" / "summary.json").read_text())
    assert final.summary["settings"] == cli_summary["settings"] and final.model.exists()
    assert final.test_accuracy == cli_summary["test_accuracy"]  # the same re-training, tested once, the same

    photo = next((root / "cache").rglob("*.jpg"), None) or next((root / "cache").rglob("*.png"))
    predicted = tune_inat.predict(final.model, [photo], top_k=2, device="cpu")
    command = run_cli("tune_inat.predict", str(final.model), str(photo), "--top-k", "2", "--device", "cpu", "--json")
    assert command.returncode == 0, command.stderr
    assert predicted == json.loads(command.stdout)

    # the best recipe re-run by train: from Python with the recipe as a dict, and by the command with its file
    trained = tune_inat.train(
        demo=True, config=result.best, epochs=1, device="cpu", cache_dir=root / "cache", output=tmp_path / "t/model.pt"
    )
    command = run_cli(
        "tune_inat.train", "--demo", "--config", str(cli_folder / "best_config.yaml"), "--epochs", "1",
        "--device", "cpu", "--cache-dir", str(root / "cache"), "--output", str(tmp_path / "c/model.pt"),
    )  # fmt: skip
    assert command.returncode == 0, command.stderr
    assert trained.model.exists() and len(trained.epochs) == 1 and trained.config["epochs"] == 1
    from_command = pd.read_csv(tmp_path / "c/epochs.csv")
    pd.testing.assert_frame_equal(
        trained.epochs[["train_loss", "val_loss", "val_acc"]], from_command[["train_loss", "val_loss", "val_acc"]]
    )
    assert trained.val_acc == from_command["val_acc"].iloc[-1]


def test_keywords_are_the_commands_flags() -> None:
    from tune_inat.cli import command_flags
    from tune_inat.search import search_parser
    from tune_inat.train import train_parser

    parser = search_parser()
    assert command_flags(parser, {"reproducible": True}) == ["--reproducible"]
    assert command_flags(parser, {"reproducible": False}) == ["--no-reproducible"]
    assert command_flags(parser, {"max_epochs": 2, "no_wandb": True, "quiet": False}) == [
        "--max-epochs",
        "2",
        "--no-wandb",
    ]
    assert command_flags(parser, {"set": {"weights": "none", "lr": 0.1}}) == [
        "--set",
        "weights=none",
        "--set",
        "lr=0.1",
    ]
    assert parser.parse_args(command_flags(parser, {"reproducible": False})).reproducible is False
    assert command_flags(train_parser(), {"compile": False, "augment": True}) == ["--no-compile", "--augment"]


def test_api_problems_are_the_commands_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(tune_inat.UserError, match=r"^unknown option 'max_epoch'; the options: .*max_epochs"):
        tune_inat.search(demo=True, max_epoch=2)
    with pytest.raises(tune_inat.UserError, match="argument --scheduler: invalid choice: 'nope'"):
        tune_inat.search(demo=True, scheduler="nope")
    with pytest.raises(tune_inat.UserError, match="one of --data DIR or --demo is required"):
        tune_inat.search(results=tmp_path)
    with pytest.raises(tune_inat.UserError, match=r"parameters.learning_rate \(lr\): lr must be a positive number"):
        tune_inat.search(demo=True, space={"parameters": {"learning_rate": {"value": -1}}}, results=tmp_path)
    with pytest.raises(tune_inat.UserError, match="results folder .* does not exist"):
        tune_inat.final(tmp_path / "nothing")
    with pytest.raises(tune_inat.UserError, match=r"^unknown settings learning_rate; the settings: .*\blr\b"):
        tune_inat.train(demo=True, config={"learning_rate": 0.1})
