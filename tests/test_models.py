"""The backbone factory: every backbone builds, predicts and trains; freeze semantics; weights files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from tune_inat.errors import UserError
from tune_inat.models import (
    BACKBONES,
    build_model,
    load_model_file,
    native_image_size,
    parameter_groups,
    parameterised_modules,
    save_model_file,
)

SMALL_SIZE = {"inception_v3": 80, "vit_b_16": 32}


@pytest.mark.parametrize("name", list(BACKBONES))
def test_every_backbone_predicts_at_native_size_and_trains_a_step(name: str) -> None:
    torch.manual_seed(0)
    native = native_image_size(name)
    model = build_model(name, 10, weights="none", image_size=native, freeze_fraction=0.5)
    model.eval()
    with torch.inference_mode():
        assert model(torch.randn(1, 3, native, native)).shape == (1, 10)

    small = max(SMALL_SIZE.get(name, 32), BACKBONES[name].min_size)
    model = build_model(name, 10, weights="none", image_size=small, freeze_fraction=0.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    head = dict(model.named_parameters())[sorted(model.head_parameter_names())[0]]
    before = head.detach().clone()
    model.train()
    loss, main_loss, logits = model.training_loss(
        torch.randn(2, 3, small, small), torch.tensor([1, 7]), nn.CrossEntropyLoss()
    )
    assert logits.shape == (2, 10) and torch.isfinite(loss)
    loss.backward()
    optimizer.step()
    assert not torch.equal(before, head)


def test_native_sizes_follow_the_weights() -> None:
    assert native_image_size("inception_v3") == 299
    assert native_image_size("resnet50") == 224
    assert native_image_size("vit_b_16") == 224


@pytest.mark.parametrize("name", ["resnet50", "vit_b_16", "efficientnet_v2_s", "googlenet"])
def test_trainable_count_falls_as_freeze_fraction_rises(name: str) -> None:
    counts = [build_model(name, 10, "none", 64, f).num_trainable_parameters() for f in (0.0, 0.3, 0.8, 1.0)]
    assert counts == sorted(counts, reverse=True) and len(set(counts)) == 4
    full = build_model(name, 10, "none", 64, 0.0)
    assert counts[0] == full.num_parameters()


@pytest.mark.parametrize("name", ["resnet18", "vgg16_bn", "convnext_tiny", "mobilenet_v3_small", "inception_v3"])
def test_freeze_all_leaves_only_the_head(name: str) -> None:
    model = build_model(name, 10, "none", 96, freeze_fraction=1.0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == model.head_parameter_names() and trainable
    assert all(n.startswith(f"net.{BACKBONES[name].head}.") for n in trainable)


def test_freeze_is_a_prefix_in_forward_order() -> None:
    model = build_model("resnet50", 10, "none", 64, freeze_fraction=0.5)
    modules = parameterised_modules(model.net, BACKBONES["resnet50"])
    frozen = set(model.frozen_modules)
    assert model.frozen_modules == modules[: len(frozen)]
    assert len(frozen) == len(modules) // 2
    assert "layer1.0.conv1" in frozen and "layer4.2.conv3" not in frozen


def test_frozen_batchnorm_statistics_do_not_move() -> None:
    torch.manual_seed(0)
    model = build_model("resnet18", 10, "none", 32, freeze_fraction=0.5)
    frozen_bn = model.net.get_submodule(next(n for n in model.frozen_modules if "bn" in n))
    live_bn = model.net.layer4[1].bn2
    frozen_before = frozen_bn.running_mean.clone()
    live_before = live_bn.running_mean.clone()
    model.train()
    assert not frozen_bn.training and live_bn.training
    loss, _, _ = model.training_loss(torch.randn(4, 3, 32, 32) * 3 + 1, torch.arange(4), nn.CrossEntropyLoss())
    loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    assert torch.equal(frozen_bn.running_mean, frozen_before)
    assert not torch.equal(live_bn.running_mean, live_before)
    assert frozen_bn.weight.grad is None


def test_frozen_prefix_stores_no_activations_for_backward() -> None:
    def saved_bytes(freeze: float) -> int:
        model = build_model("resnet18", 10, "none", 64, freeze_fraction=freeze)
        model.train()
        total = 0

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            nonlocal total
            total += tensor.numel() * tensor.element_size()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model.training_loss(torch.randn(4, 3, 64, 64), torch.arange(4), nn.CrossEntropyLoss())
        return total

    head_only, full = saved_bytes(1.0), saved_bytes(0.0)
    assert head_only < 100_000  # the head's input features and the logits only
    assert full > 50 * head_only


def test_aux_heads_add_to_the_training_loss_only_when_they_can_help() -> None:
    model = build_model("googlenet", 10, "none", 64, freeze_fraction=0.0)
    model.train()
    loss, main_loss, _ = model.training_loss(torch.randn(2, 3, 64, 64), torch.tensor([0, 1]), nn.CrossEntropyLoss())
    assert loss > main_loss
    assert model.net.aux1.fc2.out_features == 10
    late = build_model("googlenet", 10, "none", 64, freeze_fraction=0.9)  # the blocks aux reads are frozen
    assert late.net.aux1 is None and late.net.aux2 is None
    small_inception = build_model("inception_v3", 10, "none", 128, freeze_fraction=0.0)
    assert small_inception.net.AuxLogits is None  # its aux branch needs >= 299 px


def test_image_size_limits_are_clear() -> None:
    with pytest.raises(UserError, match="inception_v3 needs image_size >= 75"):
        build_model("inception_v3", 10, "none", 64)
    with pytest.raises(UserError, match="divisible by 16"):
        build_model("vit_b_16", 10, "none", 40)
    with pytest.raises(UserError, match="unknown backbone 'resnet51'"):
        build_model("resnet51", 10, "none")
    with pytest.raises(UserError, match="freeze_fraction"):
        build_model("resnet18", 10, "none", 32, freeze_fraction=1.5)


def test_differential_learning_rates_and_no_decay_on_norms() -> None:
    model = build_model("resnet18", 10, "none", 32, freeze_fraction=0.5)
    groups = {g["name"]: g for g in parameter_groups(model, lr=1e-3, backbone_lr_scale=0.1, weight_decay=0.05)}
    assert groups["head"]["lr"] == 1e-3 and groups["backbone"]["lr"] == pytest.approx(1e-4)
    assert groups["backbone_no_decay"]["weight_decay"] == 0.0 and groups["backbone"]["weight_decay"] == 0.05
    assert all(p.ndim == 1 for p in groups["backbone_no_decay"]["params"])
    grouped = sum(p.numel() for g in groups.values() for p in g["params"])
    assert grouped == model.num_trainable_parameters()


def test_weights_from_a_state_dict_file(tmp_path: Path) -> None:
    torch.manual_seed(1)
    source = build_model("resnet18", 1000, "none", 32)
    path = tmp_path / "resnet18.pt"
    torch.save(source.net.state_dict(), path)
    model = build_model("resnet18", 10, weights=str(path), image_size=32)
    assert torch.equal(model.net.conv1.weight, source.net.conv1.weight)
    assert model.net.fc.out_features == 10
    wrong = tmp_path / "vgg.pt"
    torch.save(build_model("mobilenet_v3_small", 10, "none", 32).net.state_dict(), wrong)
    with pytest.raises(UserError, match="does not fit resnet18"):
        build_model("resnet18", 10, weights=str(wrong), image_size=32)
    with pytest.raises(UserError, match="not a file"):
        build_model("resnet18", 10, weights=str(tmp_path / "missing.pt"), image_size=32)


def test_vit_weights_adapt_to_another_resolution(tmp_path: Path) -> None:
    source = build_model("vit_b_16", 1000, "none", 224)
    path = tmp_path / "vit.pt"
    torch.save(source.net.state_dict(), path)
    model = build_model("vit_b_16", 10, weights=str(path), image_size=64)
    assert model.net.encoder.pos_embedding.shape[1] == (64 // 16) ** 2 + 1
    assert torch.equal(model.net.conv_proj.weight, source.net.conv_proj.weight)
    model.eval()
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)


def test_model_file_round_trip(tmp_path: Path) -> None:
    model = build_model("googlenet", 3, "none", 64, freeze_fraction=0.0)
    model.eval()
    path = tmp_path / "model.pt"
    save_model_file(path, model, ["a", "b", "c"], 64, {"lr": 0.1})
    loaded, meta = load_model_file(path)
    assert meta["classes"] == ["a", "b", "c"] and meta["backbone"] == "googlenet" and meta["image_size"] == 64
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        assert torch.allclose(model(x), loaded(x))
    (tmp_path / "other.pt").write_bytes(b"not a model")
    with pytest.raises(UserError, match="not a tune-inat model file"):
        load_model_file(tmp_path / "other.pt")
