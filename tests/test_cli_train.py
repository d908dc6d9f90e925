"""The commands as a user runs them: `tune_inat.train`, `tune_inat.data`, `tune_inat.models`."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from conftest import make_folder, run_cli, write_image

from tune_inat.models import load_model_file


def test_train_demo_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "run" / "model.pt"
    result = run_cli(
        "tune_inat.train",
        "--demo",
        "--epochs",
        "2",
        "--output",
        str(out),
        env={"TUNE_INAT_CACHE": str(tmp_path / "cache")},
    )
    assert result.returncode == 0, result.stderr
    epoch_lines = [line for line in result.stdout.splitlines() if line.startswith("epoch")]
    assert len(epoch_lines) == 2 and "val_acc" in epoch_lines[0]
    model, meta = load_model_file(out)
    assert meta["backbone"] == "resnet18" and len(meta["classes"]) == 10
    assert (out.parent / "epochs.csv").read_text().count("\n") == 3
    config = yaml.safe_load((out.parent / "config.yaml").read_text())
    assert config["epochs"] == 2 and config["image_size"] == 48


def test_train_reruns_a_config_file_with_flag_overrides(tmp_path: Path, demo_root: Path) -> None:
    config = tmp_path / "best.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "backbone": "resnet18",
                "weights": "none",
                "image_size": 32,
                "learning_rate": 0.002,
                "freeze": 0.5,
                "epochs": 3,
            }
        )
    )
    out = tmp_path / "m.pt"
    result = run_cli(
        "tune_inat.train",
        "--data",
        str(demo_root),
        "--config",
        str(config),
        "--epochs",
        "1",
        "--output",
        str(out),
        "--cache-dir",
        str(tmp_path / "cache"),
    )
    assert result.returncode == 0, result.stderr
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["lr"] == 0.002 and saved["freeze_fraction"] == 0.5 and saved["epochs"] == 1


def _layout(kind: str, root: Path) -> Path:
    if kind == "missing":
        return root / "nope"
    if kind == "file":
        root.mkdir(parents=True)
        (root / "f.txt").write_text("x")
        return root / "f.txt"
    if kind == "empty":
        root.mkdir(parents=True)
        return root
    if kind == "flat-images":
        write_image(root / "a.jpg")
        return root
    if kind == "class-mismatch":
        make_folder(root, {"a": 2, "b": 2}, "train")
        make_folder(root, {"a": 1, "c": 1}, "val")
        return root
    if kind == "unreadable-class":
        make_folder(root, {"a": 2}, "train")
        (root / "train" / "b").mkdir()
        (root / "train" / "b" / "x.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
        make_folder(root, {"a": 1, "b": 1}, "val")
        return root
    raise ValueError(kind)


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("missing", "does not exist"),
        ("file", "is a file"),
        ("empty", "is empty"),
        ("flat-images", "no class folders"),
        ("class-mismatch", "classes differ"),
        ("unreadable-class", "class 'b' .* no readable images"),
    ],
)
def test_bad_dataset_gives_exit_2_and_one_line(tmp_path: Path, kind: str, message: str) -> None:
    path = _layout(kind, tmp_path / "data")
    result = run_cli(
        "tune_inat.train",
        "--data",
        str(path),
        "--weights",
        "none",
        "--backbone",
        "resnet18",
        "--image-size",
        "32",
        "--cache-dir",
        str(tmp_path / "cache"),
    )
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr
    assert re.search(message, errors[0]), errors[0]


def test_bad_setting_exit_2(tmp_path: Path, demo_root: Path) -> None:
    result = run_cli("tune_inat.train", "--data", str(demo_root), "--freeze-fraction", "2", "--weights", "none")
    assert result.returncode == 2 and "freeze_fraction must be a number in [0, 1]" in result.stderr
    debug = run_cli(
        "tune_inat.train", "--data", str(demo_root), "--freeze-fraction", "2", "--weights", "none", "--debug"
    )
    assert debug.returncode == 2 and "Traceback" in debug.stderr


def test_offline_imagenet_weights_fail_fast(tmp_path: Path, demo_root: Path) -> None:
    result = run_cli(
        "tune_inat.train",
        "--data",
        str(demo_root),
        "--backbone",
        "resnet18",
        "--cache-dir",
        str(tmp_path / "cache"),
        env={"TORCH_HOME": str(tmp_path / "torch")},
    )
    assert result.returncode == 2
    assert "cannot download the ImageNet weights of resnet18" in result.stderr
    assert "python -m tune_inat.models fetch resnet18" in result.stderr
    assert not (tmp_path / "cache").exists()  # failed before decoding anything


def test_make_demo_and_check(tmp_path: Path) -> None:
    result = run_cli(
        "tune_inat.data", "make-demo", str(tmp_path / "demo"), "--train-per-class", "3", "--test-per-class", "1"
    )
    assert result.returncode == 0, result.stderr
    assert len(list((tmp_path / "demo" / "train").rglob("*.*"))) == 30
    formats = {p.suffix for p in (tmp_path / "demo").rglob("*.*")}
    assert formats == {".jpg", ".png"}
    check = run_cli(
        "tune_inat.data", "check", str(tmp_path / "demo"), "--image-size", "32", "--cache-dir", str(tmp_path / "c")
    )
    assert check.returncode == 0 and "10 classes" in check.stdout


def test_models_list() -> None:
    result = run_cli("tune_inat.models", "list")
    assert result.returncode == 0
    assert "inception_v3" in result.stdout and "native 299 px" in result.stdout
