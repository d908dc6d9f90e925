"""Shared by the benchmarks: machine facts, an iNat-like JPEG folder, writing results as JSON + Markdown."""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    import torch

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    }
    try:
        import ray
        import torchvision

        info.update(torchvision=torchvision.__version__, ray=ray.__version__)
    except ImportError:
        pass
    return info


def inat_like_folder(
    root: Path, images: int, classes: int = 10, size: tuple[int, int] = (800, 600), seed: int = 0
) -> Path:
    """`root/train/<class>/*.jpg`: smooth photo-like 800x600 JPEGs (60-120 KB, like iNat's), written in parallel."""
    marker = root / f".complete-{images}"
    if marker.exists():
        return root
    for label in range(classes):
        (root / "train" / f"class_{label:02d}").mkdir(parents=True, exist_ok=True)
    jobs = [(root / "train" / f"class_{i % classes:02d}" / f"{i:05d}.jpg", size, seed, i) for i in range(images)]
    with ProcessPoolExecutor() as pool:
        list(pool.map(_write_jpeg, jobs, chunksize=16))
    for label in range(classes):  # a test folder so the layout is the iNat one
        test = root / "val" / f"class_{label:02d}"
        test.mkdir(parents=True, exist_ok=True)
        src = next((root / "train" / f"class_{label:02d}").iterdir())
        (test / src.name).write_bytes(src.read_bytes())
    marker.write_text("ok")
    return root


def _write_jpeg(job: tuple[Path, tuple[int, int], int, int]) -> None:
    path, (width, height), seed, index = job
    rng = np.random.default_rng([seed, index])
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    waves = sum(
        np.sin(xx * rng.uniform(0.005, 0.05) + yy * rng.uniform(0.005, 0.05) + rng.uniform(0, 6)) for _ in range(3)
    )
    pixels = rng.uniform(40, 200, 3) + 40 * waves[..., None] + rng.normal(0, 6, (height, width, 3))
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=85)


def run_search_cli(arguments: list[str], results: Path) -> Path:
    """Run `python -m tune_inat.search ARGUMENTS --results RESULTS` as users do; its experiment folder."""
    command = [sys.executable, "-m", "tune_inat.search", *arguments, "--results", str(results), "--no-wandb", "--quiet"]
    before = set(results.iterdir()) if results.exists() else set()
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode != 0:
        raise SystemExit(f"search failed ({completed.returncode}): {' '.join(command)}\n{completed.stderr[-3000:]}")
    (folder,) = set(results.iterdir()) - before
    return folder


def write_space(path: Path, parameters: dict, method: str = "random") -> Path:
    """A search-space YAML (W&B sweep format): a dict value is a searched parameter, anything else is fixed."""
    space = {
        "method": method,
        "metric": {"name": "val_acc", "goal": "maximize"},
        "parameters": {
            name: value if isinstance(value, dict) else {"value": value} for name, value in parameters.items()
        },
    }
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    return path


def write_results(name: str, rows: list[dict], notes: str = "", folder: Path = RESULTS) -> None:
    """benchmarks/results/<name>.json and .md (or in `folder`), with the machine and the exact command."""
    folder.mkdir(parents=True, exist_ok=True)
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0]), *sys.argv[1:]])
    record = {
        "benchmark": name,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": command,
        "machine": machine(),
        "rows": rows,
        "notes": notes,
    }
    suffix = "" if record["machine"]["device"] == "cpu" else "_gpu"
    (folder / f"{name}{suffix}.json").write_text(json.dumps(record, indent=2))
    columns = list(rows[0]) if rows else []
    table = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    table += ["| " + " | ".join(_cell(r[c]) for c in columns) + " |" for r in rows]
    md = [f"# {name}", "", f"`{command}`", "", f"{record['date']}; {record['machine']}", "", *table, "", notes]
    (folder / f"{name}{suffix}.md").write_text("\n".join(md) + "\n")
    print("\n".join(table))
    if notes:
        print(notes)


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 10 else f"{value:.3g}"
    return str(value)
