"""Every kind of bad input through the search command: exit code 2, one clear line, no traceback."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest
from conftest import make_folder, write_image

from tune_inat.search import main as search_main


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dataset(kind: str, root: Path) -> Path:
    if kind == "missing":
        return root / "nope"
    if kind == "file":
        root.mkdir(parents=True)
        (root / "data.zip").write_bytes(b"PK")
        return root / "data.zip"
    if kind == "empty":
        root.mkdir(parents=True)
        return root
    if kind == "flat":
        write_image(root / "a.jpg")
        write_image(root / "b.jpg")
        return root
    if kind == "mismatch":
        make_folder(root, {"a": 2, "b": 2}, "train")
        make_folder(root, {"a": 1, "c": 1}, "val")
        return root
    if kind == "unreadable":
        make_folder(root, {"a": 3}, "train")
        (root / "train" / "b").mkdir()
        (root / "train" / "b" / "x.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 50)
        make_folder(root, {"a": 1, "b": 1}, "val")
        return root
    raise ValueError(kind)


SPACE_ERRORS = {
    "yaml-syntax": ("parameters:\n  lr: [1, 2\n", r"YAML syntax error at line \d+"),
    "unknown-key": ("parameters:\n  lr: {value: 0.1}\nearly_terminat: {}\n", "unknown top-level key"),
    "impossible-value": ("parameters:\n  freeze: {value: 2}\n", r"freeze_fraction must be a number in \[0, 1\]"),
}


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("data:missing", "does not exist"),
        ("data:file", "is a file, not a folder"),
        ("data:empty", "is empty"),
        ("data:flat", "no class folders"),
        ("data:mismatch", "train and test classes differ"),
        ("data:unreadable", "class 'b' .* has no readable images"),
        ("space:yaml-syntax", SPACE_ERRORS["yaml-syntax"][1]),
        ("space:unknown-key", SPACE_ERRORS["unknown-key"][1]),
        ("space:impossible-value", SPACE_ERRORS["impossible-value"][1]),
        ("resources:cpus", "cpus_per_trial 512 is more than any node has"),
        ("address:unreachable", "cannot reach a Ray cluster at 127.0.0.1:"),
        ("address:dashboard-url", "not the dashboard URL"),
        ("results:unwritable", "results folder .* is not writable"),
        ("storage:unknown-scheme", "cannot use foo://bucket/x: Unrecognized filesystem"),
        ("storage:not-installed", "cannot use hdfs://127.0.0.1:1/x: .*(libjvm|libhdfs)"),
        ("weights:offline", "cannot download the ImageNet weights of resnet50"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    case: str, message: str, tmp_path: Path, demo_root: Path, capsys, monkeypatch
) -> None:
    kind, detail = case.split(":")
    args = ["--results", str(tmp_path / "results"), "--cache-dir", str(tmp_path / "cache"), "--no-wandb", "--quiet"]
    data = ["--data", str(demo_root)]
    space = ["--space", "demo"]
    if kind == "data":
        data = ["--data", str(_dataset(detail, tmp_path / "dataset"))]
    elif kind == "space":
        (tmp_path / "space.yaml").write_text(SPACE_ERRORS[detail][0])
        space = ["--space", str(tmp_path / "space.yaml")]
    elif kind == "resources":
        args += ["--cpus-per-trial", "512"]
    elif kind == "address":
        args += ["--address", f"127.0.0.1:{_closed_port()}" if detail == "unreachable" else "http://127.0.0.1:8265"]
    elif kind == "results":
        (tmp_path / "taken").write_text("a file where the results folder should go")
        args[1] = str(tmp_path / "taken" / "results")
    elif kind == "storage":
        args += ["--storage-path", "foo://bucket/x" if detail == "unknown-scheme" else "hdfs://127.0.0.1:1/x"]
    elif kind == "weights":
        monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
        space = ["--space", "seed_sweep"]  # resnet50 with ImageNet weights, as the seeds ran it
    code = search_main([*data, *space, *args])
    err = capsys.readouterr().err.strip()
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2, err
    assert len(errors) == 1 and "Traceback" not in err, err
    assert re.search(message, errors[0]), errors[0]
    assert not list((tmp_path / "results").glob("*/trial_*")) if (tmp_path / "results").exists() else True


def test_debug_shows_the_traceback(tmp_path: Path, capsys) -> None:
    code = search_main(["--data", str(tmp_path / "nope"), "--space", "demo", "--debug", "--no-wandb"])
    assert code == 2 and "Traceback" in capsys.readouterr().err


def test_results_already_written_survive_a_bad_resume(demo_search, capsys) -> None:
    before = {p: p.stat().st_mtime_ns for p in demo_search.folder.glob("*.parquet")}
    code = search_main(
        [
            "--data",
            "/nonexistent",
            "--space",
            "demo",
            "--results",
            str(demo_search.folder.parent),
            "--name",
            demo_search.folder.name,
            "--resume",
            "--no-wandb",
        ]
    )
    assert code == 2 and f"--resume continues search {demo_search.folder.name} on" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in demo_search.folder.glob("*.parquet")} == before
