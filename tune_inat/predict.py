"""`python -m tune_inat.predict MODEL IMAGE_OR_DIR [...] [--top-k 3] [--json]`: classify images with an exported model.

The model file holds everything needed (weights, class names, backbone, input size,
normalisation) and is loaded with `weights_only=True`. Images go through the same path as in
training: decoded once to the stored square, centre crop, ImageNet normalisation.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tune_inat.cli import command_parser, make_callable, run_command
from tune_inat.data.batches import center_crop
from tune_inat.data.decode import decode_image, stored_size_for
from tune_inat.data.folders import sniff_image_format
from tune_inat.engine import resolve_device
from tune_inat.errors import EXIT_USER_ERROR, UserError
from tune_inat.models import FineTuneModel, load_model_file

BATCH = 64


def image_files(paths: Sequence[Path]) -> list[Path]:
    """The given files, and every image (by content) under the given folders, sorted."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files += sorted(
                p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".") and sniff_image_format(p)
            )
        elif path.exists():
            files.append(path)
        else:
            raise UserError(f"{path} does not exist")
    if not files:
        raise UserError(f"no images in {', '.join(map(str, paths))}")
    return files


@torch.inference_mode()
def classify(model: FineTuneModel, squares: np.ndarray, image_size: int, device: torch.device) -> np.ndarray:
    """Class probabilities for (N, S, S, 3) uint8 stored squares."""
    model.eval().to(device)
    out = []
    for start in range(0, len(squares), BATCH):
        batch = center_crop(torch.from_numpy(squares[start : start + BATCH]).to(device), image_size)
        out.append(torch.softmax(model(batch).float(), dim=1).cpu().numpy())
    return np.concatenate(out)


def predict_parser() -> argparse.ArgumentParser:
    parser = command_parser("python -m tune_inat.predict", "Classify images with an exported tune-inat model.")
    parser.add_argument("model", type=Path, metavar="MODEL", help="a model file written by final or train (model.pt)")
    parser.add_argument(
        "images",
        type=Path,
        nargs="+",
        metavar="IMAGE_OR_DIR",
        help="image files, or folders searched for images (by content)",
    )
    parser.add_argument("--top-k", type=int, default=3, help="classes shown per image, most probable first")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of lines")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to run the model")
    return parser


def classify_files(
    model_path: Path, images: Sequence[Path], top_k: int = 3, device_name: str = "auto"
) -> tuple[list[dict[str, Any]], list[str], str]:
    """The images' top classes (unreadable ones are one line each, the others still classified), and the timing line."""
    if top_k < 1:
        raise UserError(f"--top-k must be at least 1, got {top_k}")
    model, meta = load_model_file(model_path)
    classes, image_size = meta["classes"], meta["image_size"]
    stored = stored_size_for(image_size)
    decoded, readable, failures = [], [], []
    started = time.perf_counter()
    for path in image_files(images):
        try:
            decoded.append(decode_image(path, stored))
            readable.append(path)
        except Exception as err:  # one line per unreadable image, the others still classified
            failures.append(
                f"error: cannot read image {path}: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
            )
    results, timing = [], ""
    device = resolve_device(device_name)
    if decoded:
        model_started = time.perf_counter()
        probabilities = classify(model, np.stack(decoded), image_size, device)
        model_seconds = time.perf_counter() - model_started
        for path, probs in zip(readable, probabilities):
            top = np.argsort(-probs)[:top_k]
            results.append(
                {"file": str(path), "predictions": [{"label": classes[i], "probability": float(probs[i])} for i in top]}
            )
        total = time.perf_counter() - started
        timing = (
            f"{len(decoded)} images in {total:.2f} s: {1000 * total / len(decoded):.1f} ms per image (reading and "
            f"the model), {1000 * model_seconds / len(decoded):.1f} ms the model alone, on {device}"
        )
    return results, failures, timing


def predict(args: argparse.Namespace) -> int:
    results, failures, timing = classify_files(args.model, args.images, args.top_k, args.device)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for result in results:
            shown = ", ".join(f"{p['label']} {100 * p['probability']:.1f}%" for p in result["predictions"])
            print(f"{result['file']}: {shown}")
    if timing:
        print(timing, file=sys.stderr)
    for line in failures:
        print(line, file=sys.stderr)
    return EXIT_USER_ERROR if failures else 0


def run(model: str | Path, images: str | Path | Sequence[str | Path], top_k: int = 3, device: str = "auto") -> list:
    """`tune_inat.predict(model, images)`: each image's top classes, as the command's --json gives them; an
    unreadable image is a UserError naming it (the command goes on with the others and exits 2)."""
    paths = [Path(images)] if isinstance(images, (str, Path)) else [Path(p) for p in images]
    results, failures, _ = classify_files(Path(model), paths, top_k, device)
    if failures:
        raise UserError("; ".join(line.removeprefix("error: ") for line in failures))
    return results


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(predict_parser(), predict, argv)


make_callable(__name__, run)  # tune_inat.predict(...) is the API, python -m tune_inat.predict the command

if __name__ == "__main__":
    sys.exit(main())
