"""Shared fixtures: the generated demo folder, small hand-made folders, a private cache dir."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tune_inat.data.demo import make_demo

REPO = Path(__file__).resolve().parents[1]

# Everything the run writes to the system's temp folder goes to one folder of its own, removed at the end:
# pytest's own folders, Ray's sessions (Ray reads TMPDIR on Linux), wandb's, torch's and the trials' temp
# files, including those of processes the tests kill. Short, for Ray's socket paths (at most 107 bytes).
SESSION_TMP = Path(tempfile.mkdtemp(prefix="tit-"))
os.environ["TMPDIR"] = tempfile.tempdir = str(SESSION_TMP)


def pytest_unconfigure(config: pytest.Config) -> None:
    if not os.environ.get("TUNE_INAT_KEEP_TMP"):  # set it to look at a failed run's folders afterwards
        shutil.rmtree(SESSION_TMP, ignore_errors=True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The multi-node tests last: they start and end whole Ray clusters beside the session's own Ray."""
    items.sort(key=lambda item: item.get_closest_marker("cluster") is not None)  # stable: the rest keep their order


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The standard demo folder (10 classes, 40 train + 10 test images each), made once per session."""
    return make_demo(tmp_path_factory.mktemp("demo") / "demo")


@pytest.fixture()
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def write_image(
    path: Path,
    size: tuple[int, int] = (40, 30),
    mode: str = "RGB",
    fmt: str | None = None,
    seed: int = 0,
    **save_kwargs,
) -> Path:
    """A small random image in any Pillow mode and format."""
    rng = np.random.default_rng(seed)
    width, height = size
    rgb = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")
    image = rgb.convert(mode) if mode != "RGB" else rgb
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format=fmt, **save_kwargs)
    return path


def make_folder(root: Path, classes: dict[str, int], split: str | None = None, seed: int = 0) -> Path:
    """`root/[split/]<class>/<i>.jpg` with the given number of images per class."""
    base = root / split if split else root
    for c, (name, count) in enumerate(classes.items()):
        (base / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            write_image(base / name / f"{i:03d}.jpg", seed=seed * 1000 + c * 100 + i)
    return root


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 300, cwd: Path = REPO
) -> subprocess.CompletedProcess:
    """Run `python -m ...` as a user would, capturing output."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", *args], capture_output=True, text=True, env=full_env, timeout=timeout, cwd=cwd
    )


@pytest.fixture(scope="session")
def ray_cluster():
    """One real local Ray for the whole session: 2 CPUs and one declared (not real) GPU.

    The declared GPU lets tests check fractional GPU reservations on a machine without one; the
    trials see no CUDA device and train on the CPU.
    """
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    os.environ["TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S"] = "0"
    os.environ["WANDB_MODE"] = "offline"  # real wandb, offline runs in the trial folders
    os.environ["WANDB_SILENT"] = "true"
    import ray

    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def demo_search(ray_cluster, demo_root: Path, tmp_path_factory: pytest.TempPathFactory):
    """The demo search (demo.yaml: 8 trials, ASHA, Optuna, wandb offline), run once for every test that reads it."""
    from tune_inat.data.dataset import DataConfig
    from tune_inat.job import prepare_data
    from tune_inat.space import load_space
    from tune_inat.tuner import run_search

    spec = load_space("demo")
    data_config = DataConfig(demo_root, tmp_path_factory.mktemp("cache"), progress=False)
    results = tmp_path_factory.mktemp("results")
    outcome = run_search(
        spec,
        data_config,
        prepare_data(spec, data_config),
        str(results),
        "demo-test",
        verbose=0,
        wandb_project="tune-inat-tests",
    )
    caches_after_search = {path.name for path in Path(data_config.cache_dir).iterdir()}  # before any test adds one
    return SimpleNamespace(
        spec=spec,
        grid=outcome.grid,
        outcome=outcome,
        folder=results / "demo-test",
        data_config=data_config,
        caches_after_search=caches_after_search,
    )


def trials_by_number(folder: Path) -> pd.DataFrame:
    """A search's trials in the order they were created, with the columns that say what each did."""
    trials = pd.read_parquet(folder / "trials.parquet")
    numbers = {p.name.split("_")[2]: int(p.name.split("_")[1]) for p in folder.glob("trial_*_*")}
    trials["number"] = trials["trial_id"].map(numbers)
    columns = [
        "number",
        "backbone",
        "freeze_fraction",
        "lr",
        "batch_size",
        "status",
        "epochs_run",
        "best_val_acc",
        "best_epoch",
    ]
    return trials[columns].sort_values("number").reset_index(drop=True)


@pytest.fixture(scope="session")
def loss_search(tmp_path_factory: pytest.TempPathFactory):
    """A small search that minimises val_loss, run from the command line, then analyze and final on it (test_structure:
    one ranking everywhere; test_api: the same search from Python)."""
    root = tmp_path_factory.mktemp("loss")
    space = root / "loss.yaml"
    text = (REPO / "search_spaces" / "demo.yaml").read_text()
    space.write_text(text.replace("name: val_acc\n  goal: maximize", "name: val_loss\n  goal: minimize"))
    env = {"TUNE_INAT_CACHE": str(root / "cache")}
    search = run_cli(
        "tune_inat.search",
        "--demo",
        "--space",
        str(space),
        "--num-samples",
        "4",
        "--max-epochs",
        "2",
        "--scheduler",
        "fifo",
        "--gpus-per-trial",
        "0",
        "--cpus-per-trial",
        "1",
        "--set",
        "image_size=32",
        "--no-wandb",
        "--quiet",
        "--results",
        str(root / "results"),
        "--name",
        "loss",
        env=env,
        timeout=600,
        cwd=root,
    )
    assert search.returncode == 0, search.stderr[-3000:]
    folder = root / "results" / "loss"
    analyze = run_cli("tune_inat.analyze", str(folder), "--quiet", env=env, cwd=root)
    assert analyze.returncode == 0, analyze.stderr[-3000:]
    final = run_cli(
        "tune_inat.final",
        str(folder),
        "--top-k",
        "1",
        "--seeds",
        "1",
        "--max-epochs",
        "1",
        "--device",
        "cpu",
        "--quiet",
        env=env,
        timeout=600,
        cwd=root,
    )
    assert final.returncode == 0, final.stderr[-3000:]
    return folder, search.stdout, analyze.stdout
