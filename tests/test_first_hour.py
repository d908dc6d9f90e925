"""The user's first hour, rehearsed: the README's quickstart commands as written, in order, at CPU scale.

The iNaturalist zip as it unpacks (`nature_12K/inaturalist_12K/train|val/<the ten classes>`, photo-sized
JPEGs) comes from a local HTTP server; the ImageNet weights of the `quick` space's backbones lie in an
isolated torch cache under the file names torchvision expects (values of the right shapes), so
`models fetch`, `models list`, the search's prefetch and `weights: imagenet` trials run for real. The
only additions to the README's commands are for scale (--url for the local server, one epoch, 32 px).
"""

from __future__ import annotations

import re
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import REPO, run_cli
from http_helpers import RangeServer
from PIL import Image
from torchvision import models as tv_models

from tune_inat.analyze import PLOTS
from tune_inat.space import load_space

INAT_CLASSES = "Amphibia Animalia Arachnida Aves Fungi Insecta Mammalia Mollusca Plantae Reptilia".split()
PHOTO_SIZES = [(800, 600), (600, 800), (500, 375), (1024, 683), (640, 480), (800, 533)]  # as iNat photos come
SCALE = {  # what each quickstart command gets on top of the README's words, for a CPU and a minute or two
    "data": ["--url", "{url}"],
    "search": ["--max-epochs", "1", "--num-samples", "3", "--set", "image_size=32", "--set", "augment=false",
               "--set", "freeze_fraction=0.5"],
    "final": ["--top-k", "1", "--seeds", "1", "--max-epochs", "1"],
}  # fmt: skip


def quickstart_commands() -> list[list[str]]:
    """The README's quickstart block, each line as words (comments dropped)."""
    readme = (REPO / "README.md").read_text()
    block = readme.split("## Quickstart", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    return [line.split("#", 1)[0].split() for line in block.strip().splitlines()]


def photo(path: Path, size: tuple[int, int], label: int, seed: int) -> None:
    """A smooth photo-sized JPEG whose colour says its class (JPEG keeps it small; a model can learn it)."""
    rng = np.random.default_rng(seed)
    width, height = size
    y, x = np.mgrid[0:height, 0:width]
    hue = np.array([label * 25, 255 - label * 20, (label * 70) % 256], dtype=float)
    image = hue * (0.6 + 0.4 * np.sin(x / (37 + seed % 11))[..., None]) + rng.normal(0, 6, (1, 1, 3))
    image[..., 0] += 40 * np.cos(y / 53)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(path, quality=85)


def inat_zip(where: Path, train: int, val: int) -> bytes:
    """A zip laid out as nature_12K.zip unpacks."""
    root = where / "nature_12K" / "inaturalist_12K"
    for split, count in (("train", train), ("val", val)):
        for label, name in enumerate(INAT_CLASSES):
            for i in range(count):
                seed = label * 1000 + i + (500 if split == "val" else 0)
                photo(root / split / name / f"{seed:05d}.jpg", PHOTO_SIZES[seed % len(PHOTO_SIZES)], label, seed)
    path = where / "nature_12K.zip"
    with zipfile.ZipFile(path, "w") as archive:
        for file in sorted(where.joinpath("nature_12K").rglob("*")):
            archive.write(file, file.relative_to(where).as_posix())
    return path.read_bytes()


def place_imagenet_weights(torch_home: Path, backbones: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    """A state_dict of the right shapes for each backbone, where torchvision's own download would put it."""
    placed = {}
    checkpoints = torch_home / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    for name in backbones:
        torch.manual_seed(len(placed))
        state = tv_models.get_model(name, weights=None).state_dict()
        url = tv_models.get_model_weights(name).DEFAULT.url
        torch.save(state, checkpoints / Path(url).name)
        placed[name] = state
    return placed


@pytest.fixture()
def first_hour(tmp_path: Path):
    torch_home = tmp_path / "torch"
    yield tmp_path, torch_home
    shutil.rmtree(torch_home, ignore_errors=True)  # a few hundred MB of weights: not left for pytest to keep


def test_the_readme_quickstart_runs_end_to_end_with_imagenet_weights(first_hour) -> None:
    tmp_path, torch_home = first_hour
    commands = quickstart_commands()
    modules = [words[2] for words in commands]
    assert modules == [
        "tune_inat.data",
        "tune_inat.search",
        "tune_inat.search",
        "tune_inat.analyze",
        "tune_inat.final",
        "tune_inat.predict",
    ], commands
    backbones = list(load_space("quick").values_of("backbone"))
    placed = place_imagenet_weights(torch_home, backbones)
    work = tmp_path / "work"
    work.mkdir()
    env = {"TORCH_HOME": str(torch_home), "TUNE_INAT_CACHE": str(tmp_path / "cache")}
    server = RangeServer(inat_zip(tmp_path / "zip", train=12, val=3))

    def run(words: list[str], name: str = "") -> str:
        words = [w.replace("<name>", name) for w in words]
        extra = [a.replace("{url}", server.url) for a in SCALE.get(words[2].split(".")[1], [])]
        result = run_cli(*words[2:], *extra, env=env, cwd=work, timeout=900)
        assert result.returncode == 0, (words, result.stdout[-3000:], result.stderr[-3000:])
        assert "Traceback" not in result.stderr, result.stderr[-3000:]
        return result.stdout

    try:
        fetched = run_cli("tune_inat.models", "fetch", *backbones, env=env, cwd=work)  # cached: nothing to download
        assert fetched.returncode == 0, fetched.stderr
        listed = run_cli("tune_inat.models", "list", env=env, cwd=work).stdout
        for name in backbones:
            assert re.search(rf"^{name} .*ImageNet weights cached", listed, re.M), listed

        download, quick_search, full_search, analyze, final, predict = commands
        run(download)
        assert sorted(p.name for p in (work / "data").rglob("train/*")) == INAT_CLASSES
        run(quick_search)
        plan = run_cli(*full_search[2:], "--plan", env=env, cwd=work)  # the full search: planned, not run here
        assert plan.returncode == 0 and "Search: optuna, 64 trials" in plan.stdout, plan.stderr
        (name,) = [p.name for p in (work / "results").iterdir()]
    finally:
        server.close()
    folder = work / "results" / name
    for promised in ("trials.parquet", "epochs.parquet", "best_config.yaml", "search.json"):
        assert (folder / promised).exists(), promised
    trials = pd.read_parquet(folder / "trials.parquet")
    assert len(trials) == 3 and set(trials["status"]) <= {"completed", "stopped_early"}
    assert set(trials["weights"]) == {"imagenet"} and set(trials["image_size"]) == {32}
    assert list((tmp_path / "cache").glob("features/*")), "the frozen prefixes did not go through the feature cache"

    run(analyze, name)
    for promised in ("report.md", *PLOTS.values()):
        assert (folder / promised).exists(), promised
    run(final, name)
    for promised in ("model.pt", "confirmation.csv", "per_class.csv", "confusion_matrix.png", "summary.md"):
        assert (folder / "final" / promised).exists(), promised

    exported = torch.load(folder / "final" / "model.pt", map_location="cpu", weights_only=True)
    backbone = exported["backbone"]
    weights = exported["state_dict"]
    first_layer = next(k for k in placed[backbone] if k.endswith("weight") and placed[backbone][k].dim() == 4)
    # frozen at 0.5, the first layer is the placed ImageNet file's, untouched by training: it was loaded
    assert torch.equal(weights[f"net.{first_layer}"], placed[backbone][first_layer])

    shutil.copy(next((work / "data").rglob("val/Fungi/*.jpg")), work / "photo.jpg")
    predicted = run(predict, name)
    assert any(cls in predicted for cls in INAT_CLASSES), predicted
