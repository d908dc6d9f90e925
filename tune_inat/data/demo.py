"""A small iNaturalist-style image folder, generated, for the demo and the tests.

Ten classes named like iNaturalist 12K's, each a visual pattern (stripes at several angles,
checkerboard, rings, dots, spokes, plaid, blobs) with random frequency, phase, rotation and
colours, plus pixel noise: learnable by a small CNN at 32-64 px, not trivially. Images have
varied sizes and aspect ratios; some are grayscale JPEGs, some PNGs (RGB and RGBA).
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

DEMO_CLASSES = (
    "Amphibia", "Animalia", "Arachnida", "Aves", "Fungi",
    "Insecta", "Mammalia", "Mollusca", "Plantae", "Reptilia",
)  # fmt: skip


def _pattern(label: int, u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Pattern intensity in [0, 1] for class `label` at coordinates (u, v) in about [-1, 1]."""
    freq = rng.uniform(2.5, 4.5) * math.pi
    phase = rng.uniform(0, 2 * math.pi)
    angle = rng.uniform(-0.2, 0.2)
    cu, su = math.cos(angle), math.sin(angle)
    x, y = u * cu - v * su, u * su + v * cu
    radius = np.hypot(x, y)
    if label == 0:  # horizontal stripes
        value = np.sin(freq * y + phase)
    elif label == 1:  # vertical stripes
        value = np.sin(freq * x + phase)
    elif label == 2:  # diagonal stripes /
        value = np.sin(freq * (x + y) / math.sqrt(2) + phase)
    elif label == 3:  # diagonal stripes \
        value = np.sin(freq * (x - y) / math.sqrt(2) + phase)
    elif label == 4:  # checkerboard
        value = np.sign(np.sin(freq * x + phase) * np.sin(freq * y + phase))
    elif label == 5:  # concentric rings
        value = np.sin(freq * radius * 1.5 + phase)
    elif label == 6:  # dots on a grid
        value = (np.cos(freq * x + phase) * np.cos(freq * y + phase) > 0.6) * 2.0 - 1
    elif label == 7:  # spokes around the centre
        value = np.sin(rng.integers(5, 9) * np.arctan2(y, x) + phase)
    elif label == 8:  # plaid: thin lines both ways
        value = np.maximum(np.cos(freq * x + phase), np.cos(freq * y + phase)) > 0.8
        value = value * 2.0 - 1
    else:  # smooth blobs: a few random low-frequency waves
        value = (
            sum(
                np.sin(rng.uniform(1, 2.5) * math.pi * (x * np.cos(t) + y * np.sin(t)) + rng.uniform(0, 6.3))
                for t in rng.uniform(0, math.pi, 3)
            )
            / 1.5
        )
    return np.clip((value + 1) / 2, 0, 1)


def demo_image(label: int, rng: np.random.Generator) -> np.ndarray:
    """One (H, W, 3) uint8 image of class `label`, of random size and aspect ratio."""
    height, width = int(rng.integers(96, 320)), int(rng.integers(96, 320))
    scale = max(height, width) / 2
    v, u = np.mgrid[0:height, 0:width].astype(np.float32)
    u, v = (u - width / 2) / scale, (v - height / 2) / scale
    value = _pattern(label, u, v, rng)[..., None]
    foreground = rng.uniform(0, 255, 3)
    background = 255 - foreground + rng.uniform(-60, 60, 3)
    image = background * (1 - value) + foreground * value + rng.normal(0, 25, (height, width, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def make_demo(root: Path, train_per_class: int = 40, test_per_class: int = 10, seed: int = 0) -> Path:
    """Write `root/train/<class>/` and `root/val/<class>/`; returns root. Deterministic for a seed."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for split, count in (("train", train_per_class), ("val", test_per_class)):
        for label, name in enumerate(DEMO_CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = demo_image(label, rng)
                kind = rng.uniform()
                if kind < 0.1:
                    Image.fromarray(pixels).convert("L").save(folder / f"{i:04d}.jpg", quality=90)
                elif kind < 0.2:
                    Image.fromarray(pixels).save(folder / f"{i:04d}.png")
                elif kind < 0.23:
                    Image.fromarray(pixels).convert("RGBA").save(folder / f"{i:04d}.png")
                else:
                    Image.fromarray(pixels).save(folder / f"{i:04d}.jpg", quality=int(rng.integers(70, 95)))
    return root


def ensure_demo_data(cache_dir: Path) -> Path:
    """The demo folder under the cache dir, generated on first use (atomically: temp name, rename)."""
    root = Path(cache_dir) / "demo-data-v1"
    if (root / "val").is_dir():
        return root
    partial = root.with_name(f"{root.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    make_demo(partial)
    try:
        partial.rename(root)
    except OSError:  # another process made it first
        shutil.rmtree(partial, ignore_errors=True)
    return root
