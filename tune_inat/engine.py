"""The fine-tuning loop in plain PyTorch: one run, advanced one epoch at a time. Knows nothing of Ray.

`FineTuning(config, data, device)` builds the model, optimiser, warmup+cosine schedule and the
device batches; `run_epoch()` trains and evaluates once and returns that epoch's metrics;
`state_dict()` / `load_state_dict()` checkpoint and restore it (only the unfrozen part of the
model is saved: the frozen part is rebuilt from the same weights and seed).

On CUDA: bf16 autocast (fp16 with a grad scaler where bf16 is missing), channels_last for
convolutional nets, cuDNN autotuning, pinned non-blocking copies, and no host synchronisation
per batch (losses and hits are summed on the device and read once per epoch). On CPU: fp32,
deterministic for a given seed.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from tune_inat.backbones import get_backbone
from tune_inat.data.batches import Augmentation, DeviceBatches
from tune_inat.data.dataset import TrainValData
from tune_inat.errors import UserError
from tune_inat.features import FeatureBatches, feature_key, prefix_outputs
from tune_inat.host_memory import reuse_freed_memory
from tune_inat.models import FineTuneModel, HeadSpec, build_model, parameter_groups
from tune_inat.settings import TrainConfig


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' -> CUDA when present, else CPU; asking for CUDA without one is a user error."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("device cuda asked for, but no CUDA GPU is visible (use --device cpu)")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise UserError(f"device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)


class MixedPrecision:
    """bf16 autocast on CUDA (fp16 + grad scaling where bf16 is missing, or when `half` asks); fp32 on CPU."""

    def __init__(self, device: torch.device, half: torch.dtype | None = None) -> None:
        self.device = device
        self.dtype: torch.dtype | None = None
        self.scaler: torch.amp.GradScaler | None = None
        if device.type == "cuda":
            self.dtype = half or (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
            if self.dtype == torch.float16:
                self.scaler = torch.amp.GradScaler("cuda")

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()


def build_optimizer(model: FineTuneModel, config: TrainConfig) -> torch.optim.Optimizer:
    groups = parameter_groups(model, config.lr, config.backbone_lr_scale, config.weight_decay)
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=True)
    optimizers = {
        "adamw": torch.optim.AdamW,
        "adam": torch.optim.Adam,
        "nadam": torch.optim.NAdam,
        "rmsprop": torch.optim.RMSprop,
    }
    return optimizers[config.optimizer](groups, lr=config.lr)  # weight decay per group (none on norms and biases)


def warmup_cosine(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over `warmup_steps`, then cosine decay to zero at `total_steps`; stepped per batch."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_one_epoch(
    model: FineTuneModel,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    criterion: nn.Module,
    precision: MixedPrecision,
    grad_accum_steps: int = 1,
) -> dict[str, float]:
    """One pass over `batches`; returns train_loss (main head), train_acc and the image count."""
    model.train()
    device = precision.device
    loss_sum = torch.zeros((), device=device)
    hits = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    optimizer.zero_grad(set_to_none=True)
    step = -1
    for step, (images, labels) in enumerate(batches):
        with precision.autocast():
            loss, main_loss, logits = model.training_loss(images, labels, criterion)
        precision.backward(loss / grad_accum_steps)
        if (step + 1) % grad_accum_steps == 0:
            precision.step(optimizer)
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
        loss_sum += main_loss.detach().float() * len(labels)
        hits += (logits.detach().argmax(1) == labels).sum()
        seen += len(labels)
    if (step + 1) % grad_accum_steps:  # a trailing partial accumulation still updates
        precision.step(optimizer)
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
    if seen == 0:
        raise RuntimeError("no training batches")
    return {"train_loss": loss_sum.item() / seen, "train_acc": hits.item() / seen, "train_images": seen}


@torch.inference_mode()
def evaluate(
    model: nn.Module, batches: Iterator[tuple[torch.Tensor, torch.Tensor]], precision: MixedPrecision
) -> dict[str, float]:
    """Plain cross-entropy (no label smoothing, so comparable across runs) and accuracy."""
    model.eval()
    device = precision.device
    loss_sum = torch.zeros((), device=device)
    hits = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    for images, labels in batches:
        with precision.autocast():
            logits = model(images)
        loss_sum += nn.functional.cross_entropy(logits.float(), labels, reduction="sum")
        hits += (logits.argmax(1) == labels).sum()
        seen += len(labels)
    return {"val_loss": loss_sum.item() / seen, "val_acc": hits.item() / seen}


@torch.inference_mode()
def predict_probabilities(
    model: nn.Module, batches: Iterator[tuple[torch.Tensor, torch.Tensor]], precision: MixedPrecision
) -> tuple[Any, Any]:
    """(class probabilities, true labels) as NumPy arrays, in the order of the batches."""
    model.eval()
    probabilities, labels = [], []
    for images, batch_labels in batches:
        with precision.autocast():
            logits = model(images)
        probabilities.append(torch.softmax(logits.float(), dim=1).cpu())
        labels.append(batch_labels.cpu())
    return torch.cat(probabilities).numpy(), torch.cat(labels).numpy()


class FineTuning:
    """One fine-tuning run of `config` on `data`: build once, then `run_epoch()` until `done`."""

    def __init__(self, config: TrainConfig, data: TrainValData, device: torch.device) -> None:
        self.config = config = config.validated()
        self.device = device
        torch.manual_seed(config.seed)
        if device.type == "cpu":
            reuse_freed_memory()  # every batch and activation would otherwise be page-faulted in anew
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        model = build_model(
            config.backbone,
            len(data.classes),
            config.weights,
            config.image_size,
            config.freeze_fraction,
            freeze_form=config.freeze_form,
            head=HeadSpec(config.dropout, config.head_hidden),
        )
        channels_last = device.type == "cuda" and get_backbone(config.backbone).channels_last
        self.model = model.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
        self.precision = MixedPrecision(device)
        micro_batch, eval_batch = config.batch_size // config.grad_accum_steps, max(64, config.batch_size)
        features = self._frozen_prefix_outputs(data) if config.frozen_features and not config.augment else None
        self.uses_cached_features = features is not None
        if features is not None:  # train only the rest of the network, on the prefix's cached outputs
            self.forward_model: nn.Module = self.model.split_frozen_prefix()[1]
            self.train_batches = FeatureBatches(
                features,
                data.labels,
                data.train_rows,
                batch_size=micro_batch,
                device=device,
                train=True,
                seed=config.seed,
            )
            self.val_batches = (
                FeatureBatches(features, data.labels, data.val_rows, batch_size=eval_batch, device=device, train=False)
                if len(data.val_rows)
                else None
            )
        else:
            self.forward_model = self.model
            images = data.cache.open_images()
            common = dict(image_size=config.image_size, device=device, seed=config.seed, channels_last=channels_last)
            self.train_batches = DeviceBatches(
                images, data.labels, data.train_rows, train=True, batch_size=micro_batch,
                augmentation=Augmentation(config.augment, config.crop_scale_min, True, config.color_jitter), **common,
            )  # fmt: skip
            self.val_batches = (
                DeviceBatches(images, data.labels, data.val_rows, train=False, batch_size=eval_batch, **common)
                if len(data.val_rows)
                else None  # the final re-training on train + validation validates nothing
            )
        if config.compile:  # in place, so parameter names (and checkpoints) stay the same
            (self.forward_model.rest if self.uses_cached_features else self.model.net).compile()
        self.criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
        self.optimizer = build_optimizer(self.model, config)
        steps_per_epoch = math.ceil(len(self.train_batches) / config.grad_accum_steps)
        self.scheduler = warmup_cosine(
            self.optimizer, round(config.warmup_epochs * steps_per_epoch), config.epochs * steps_per_epoch
        )
        self.epoch = 0  # epochs completed
        self.last_metrics: dict[str, float] = {}

    def _frozen_prefix_outputs(self, data: TrainValData) -> np.ndarray | None:
        """The frozen prefix's outputs for every cached image (computed once, shared), or None where not cacheable."""
        split = self.model.split_frozen_prefix()
        if split is None:
            return None
        config = self.config
        dtype = str(self.precision.dtype or torch.float32).removeprefix("torch.")
        key = feature_key(
            data, config.backbone, config.weights, self.model.prefix_length, config.image_size, config.seed, dtype
        )
        return prefix_outputs(split[0], data, config.image_size, self.device, key, self.precision.dtype)

    @property
    def done(self) -> bool:
        return self.epoch >= self.config.epochs

    def run_epoch(self) -> dict[str, float]:
        """Train one epoch, evaluate on the validation rows, return the epoch's metrics."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        train = train_one_epoch(
            self.forward_model, self.train_batches.epoch(self.epoch), self.optimizer, self.scheduler,
            self.criterion, self.precision, self.config.grad_accum_steps,
        )  # fmt: skip
        train_seconds = time.perf_counter() - start
        if self.val_batches is not None:
            val = evaluate(self.forward_model, self.val_batches.epoch(self.epoch), self.precision)
        else:
            val = {"val_loss": math.nan, "val_acc": math.nan}
        self.epoch += 1
        peak = torch.cuda.max_memory_allocated(self.device) / 2**20 if self.device.type == "cuda" else math.nan
        self.last_metrics = {
            "epoch": self.epoch,
            "train_loss": train["train_loss"],
            "train_acc": train["train_acc"],
            "val_loss": val["val_loss"],
            "val_acc": val["val_acc"],
            "current_lr": self.optimizer.param_groups[0]["lr"],
            "epoch_seconds": time.perf_counter() - start,
            "images_per_second": train["train_images"] / train_seconds,
            "peak_gpu_memory_mb": peak,
        }
        return self.last_metrics

    def model_state(self) -> dict[str, torch.Tensor]:
        """The model tensors that training can change: everything outside the frozen modules."""
        frozen = {f"net.{name}".rstrip(".") for name in self.model.frozen_modules}
        return {k: v for k, v in self.model.state_dict().items() if k.rpartition(".")[0] not in frozen}

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue this run where it stopped (the frozen part excluded)."""
        state = {
            "epoch": self.epoch,
            "config": self.config.to_dict(),
            "model": self.model_state(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
        }
        if self.precision.scaler is not None:
            state["scaler"] = self.precision.scaler.state_dict()
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing, unexpected = self.model.load_state_dict(state["model"], strict=False)
        expected_missing = set(self.model.state_dict()) - set(self.model_state())
        if unexpected or set(missing) - expected_missing:
            raise RuntimeError(
                f"checkpoint does not match the model: missing {sorted(set(missing) - expected_missing)[:3]}, "
                f"unexpected {unexpected[:3]}"
            )
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        if "scaler" in state and self.precision.scaler is not None:
            self.precision.scaler.load_state_dict(state["scaler"])
        if "cuda_rng" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        self.epoch = state["epoch"]
