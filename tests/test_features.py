"""The frozen-prefix feature cache: stage lists are exact, cached logits match, trials share the cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torchvision import models as tv_models

from tune_inat.data.dataset import DataConfig, prepare_train_val
from tune_inat.engine import FineTuning, TrainConfig
from tune_inat.features import feature_key
from tune_inat.models import BACKBONES, build_model

SMALL = {"inception_v3": 80, "vit_b_16": 32}
CPU = torch.device("cpu")


@pytest.mark.parametrize("name", list(BACKBONES))
def test_stages_compose_to_the_forward_pass(name: str) -> None:
    torch.manual_seed(0)
    size = max(SMALL.get(name, 32), BACKBONES[name].min_size)
    model = build_model(name, 10, "none", size, freeze_fraction=0.5).eval()
    x = torch.randn(2, 3, size, size)
    with torch.inference_mode():
        expected = model(x)
        for stage in model.stages:
            x = stage(x)
    assert torch.equal(x, expected)
    assert 0 < model.prefix_length < len(model.stages)


@pytest.mark.parametrize("name", ["googlenet", "inception_v3"])
def test_stages_include_the_imagenet_input_transform(name: str) -> None:
    net = tv_models.get_model(name, weights=None, aux_logits=False, init_weights=False, transform_input=True).eval()
    size = 80 if name == "inception_v3" else 32
    x = torch.randn(2, 3, size, size)
    with torch.inference_mode():
        expected = net(x)
        for stage in BACKBONES[name].stages(net):
            x = stage(x)
    assert torch.equal(x, expected)


@pytest.fixture(scope="module")
def demo_32(demo_root: Path, tmp_path_factory: pytest.TempPathFactory):
    return prepare_train_val(DataConfig(demo_root, tmp_path_factory.mktemp("cache"), progress=False), 32)


def _settings(**overrides) -> TrainConfig:
    base = dict(
        backbone="resnet18",
        weights="none",
        image_size=32,
        freeze_fraction=0.6,
        augment=False,
        epochs=2,
        batch_size=32,
        lr=3e-3,
    )
    return TrainConfig(**{**base, **overrides})


def test_cached_prefix_gives_the_same_logits(demo_32) -> None:
    cached = FineTuning(_settings(), demo_32, CPU)
    assert cached.uses_cached_features
    prefix, suffix = cached.model.split_frozen_prefix()
    cached.model.eval()
    images, labels = next(iter(FineTuning(_settings(frozen_features=False), demo_32, CPU).val_batches.epoch(0)))
    features, feature_labels = next(iter(cached.val_batches.epoch(0)))
    assert torch.equal(labels, feature_labels)
    with torch.inference_mode():
        direct = cached.model(images)
        through_cache = suffix(features)
    assert torch.allclose(direct, through_cache, atol=1e-4, rtol=1e-4)


def test_head_only_training_matches_the_uncached_run(demo_32) -> None:
    runs = [FineTuning(_settings(freeze_fraction=1.0, frozen_features=flag), demo_32, CPU) for flag in (False, True)]
    assert [r.uses_cached_features for r in runs] == [False, True]
    for _ in range(2):
        plain, cached = (run.run_epoch() for run in runs)
        for key in ("train_loss", "train_acc", "val_loss", "val_acc"):
            assert cached[key] == pytest.approx(plain[key], rel=1e-4, abs=1e-5)


def test_trials_with_the_same_prefix_share_one_cache(demo_32) -> None:
    folder = demo_32.cache.directory.parent / "features"
    FineTuning(_settings(freeze_fraction=0.8), demo_32, CPU)
    files = {p: p.stat().st_mtime_ns for p in folder.glob("*.npy")}
    FineTuning(_settings(freeze_fraction=0.8, lr=1e-4, batch_size=16), demo_32, CPU)  # same prefix, other settings
    assert {p: p.stat().st_mtime_ns for p in folder.glob("*.npy")} == files
    FineTuning(_settings(freeze_fraction=0.8, seed=1), demo_32, CPU)  # random init depends on the seed: its own cache
    assert len(list(folder.glob("*.npy"))) == len(files) + 1


def test_cache_key_changes_with_everything_the_features_depend_on(demo_32, tmp_path: Path) -> None:
    weights_file = tmp_path / "weights.pt"
    weights_file.write_bytes(b"a state_dict")
    base = dict(backbone="resnet18", weights="none", prefix_length=5, image_size=32, seed=0, dtype="float32")

    def key(**overrides) -> str:
        return feature_key(demo_32, **{**base, **overrides})

    variants = [
        key(),
        key(backbone="resnet34"),
        key(weights="imagenet"),
        key(weights=str(weights_file)),
        key(prefix_length=6),
        key(image_size=48),
        key(seed=1),
        key(dtype="float16"),
    ]
    assert len(set(variants)) == len(variants)
    assert key(weights="imagenet", seed=1) == key(weights="imagenet")  # pretrained prefixes do not depend on the seed
    before = key(weights=str(weights_file))
    weights_file.write_bytes(b"another state_dict")
    os.utime(weights_file, ns=(0, 10**18))
    assert key(weights=str(weights_file)) != before  # a changed weights file is a new prefix


@pytest.mark.parametrize(
    "overrides",
    [
        {"augment": True},
        {"freeze_fraction": 0.0},
        {"frozen_features": False},
        {"backbone": "googlenet", "freeze_fraction": 0.2},
    ],
    ids=["augmentation", "nothing-frozen", "switched-off", "aux-heads"],
)
def test_cache_is_not_used_where_it_would_be_wrong(demo_32, overrides: dict) -> None:
    assert not FineTuning(_settings(**overrides), demo_32, CPU).uses_cached_features


def test_frozen_prefix_runs_in_eval_mode_while_training() -> None:
    model = build_model("vit_b_16", 10, "none", 32, freeze_fraction=0.5)
    model.train()
    assert all(not stage.training for stage in model.stages[: model.prefix_length])
    assert model.stages[model.prefix_length].training
