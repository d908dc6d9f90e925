"""Find the dataset layout, list image files by content, validate classes, split stratified.

Accepted layouts (first match wins):
- `<root>/train/<class>/...` and `<root>/val/<class>/...` (or `test/`): iNaturalist 12K as
  unzipped; `<root>` may also be the folder above `inaturalist_12K/` or `nature_12K/`.
  `val/` is the held-out TEST set, as in the seeds.
- `<root>/<class>/...`: one pool; the test set is split off it (stratified, seeded).
Files are recognised as images by their first bytes, not their extension; hidden files and
folders (and macOS `__MACOSX`) are ignored.
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tune_inat.errors import UserError

log = logging.getLogger(__name__)

NESTED_ROOTS = ("", "inaturalist_12K", "nature_12K", "nature_12K/inaturalist_12K")
TEST_FOLDER_NAMES = ("val", "test")


@dataclass(frozen=True, eq=False)
class FileList:
    """Image files with their class labels; the identity of a dataset for the cache."""

    root: Path
    classes: tuple[str, ...]
    files: tuple[str, ...]  # paths relative to root, "/"-separated
    labels: np.ndarray  # int64, one per file
    sizes: np.ndarray  # int64 bytes, one per file
    mtimes_ns: np.ndarray  # int64, one per file

    def __len__(self) -> int:
        return len(self.files)

    def path(self, i: int) -> Path:
        return self.root / self.files[i]

    def subset(self, indices: np.ndarray) -> FileList:
        indices = np.asarray(indices, dtype=np.int64)
        return FileList(
            self.root,
            self.classes,
            tuple(self.files[i] for i in indices),
            self.labels[indices],
            self.sizes[indices],
            self.mtimes_ns[indices],
        )

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=len(self.classes))


@dataclass(frozen=True)
class Layout:
    """Where the training pool and the test set live; `test_dir` None means split test off."""

    train_dir: Path
    test_dir: Path | None


def sniff_image_format(path: Path) -> str | None:
    """The image format from the file's first bytes, or None when it is not an image we read.

    Only regular files (or links to them) are opened: a FIFO or a device named like a photo would block or never end.
    """
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return None
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError:
        return None
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head.startswith(b"BM"):
        return "BMP"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    return None


def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name == "__MACOSX"


def _visible_subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not _is_hidden(p.name))


def find_layout(root: Path) -> Layout:
    """Locate train and test folders under `root`, or explain in one line why there are none."""
    root = Path(root).expanduser()
    if not root.exists():
        raise UserError(f"dataset folder {root} does not exist")
    if not root.is_dir():
        raise UserError(f"dataset path {root} is a file, not a folder")
    for nested in NESTED_ROOTS:
        base = root / nested if nested else root
        if (base / "train").is_dir():
            test_dir = next((base / n for n in TEST_FOLDER_NAMES if (base / n).is_dir()), None)
            return Layout(train_dir=base / "train", test_dir=test_dir)
    if not any(True for p in root.iterdir() if not _is_hidden(p.name)):
        raise UserError(f"dataset folder {root} is empty")
    if not _visible_subdirs(root):
        raise UserError(
            f"{root} has no class folders: expected {root}/train/<class>/*.jpg with "
            f"{root}/val/<class>/*.jpg, or {root}/<class>/*.jpg"
        )
    return Layout(train_dir=root, test_dir=None)


def scan_class_folders(folder: Path) -> FileList:
    """List every image under `folder/<class>/` (recursively), sorted; classes = folder names."""
    class_dirs = _visible_subdirs(folder)
    if not class_dirs:
        raise UserError(f"{folder} has no class folders (expected {folder}/<class>/<images>)")
    if len(class_dirs) < 2:
        raise UserError(f"{folder} has only one class folder ({class_dirs[0].name}); need at least 2 classes")
    files: list[str] = []
    labels: list[int] = []
    sizes: list[int] = []
    mtimes: list[int] = []
    ignored = 0
    empty: list[str] = []
    for label, class_dir in enumerate(class_dirs):
        found = 0
        for dirpath, dirnames, filenames in os.walk(class_dir):
            dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
            for name in sorted(filenames):
                if _is_hidden(name):
                    continue
                path = Path(dirpath) / name
                if sniff_image_format(path) is None:
                    ignored += 1
                    continue
                info = path.stat()
                files.append(path.relative_to(folder).as_posix())
                labels.append(label)
                sizes.append(info.st_size)
                mtimes.append(info.st_mtime_ns)
                found += 1
        if found == 0:
            empty.append(class_dir.name)
    if empty:
        shown = ", ".join(repr(name) for name in empty[:5])
        raise UserError(
            f"class folder {shown} in {folder} has no images"
            if len(empty) == 1
            else f"{len(empty)} class folders in {folder} have no images: {shown}"
        )
    if ignored:
        log.info("ignored %d files in %s that are not images", ignored, folder)
    return FileList(
        root=folder,
        classes=tuple(d.name for d in class_dirs),
        files=tuple(files),
        labels=np.asarray(labels, dtype=np.int64),
        sizes=np.asarray(sizes, dtype=np.int64),
        mtimes_ns=np.asarray(mtimes, dtype=np.int64),
    )


def check_same_classes(train: FileList, test: FileList) -> None:
    if train.classes == test.classes:
        return
    only_train = sorted(set(train.classes) - set(test.classes))
    only_test = sorted(set(test.classes) - set(train.classes))
    raise UserError(
        f"train and test classes differ: only in {train.root.name}/: {only_train or 'none'}; "
        f"only in {test.root.name}/: {only_test or 'none'}"
    )


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (kept, held_out) with `fraction` of every class held out.

    Each class is shuffled by its own seeded generator, so adding a class does not reshuffle the
    others. A class with at least 2 items always keeps one and holds out at least one.
    """
    if not 0.0 <= fraction < 1.0:
        raise UserError(f"split fraction must be in [0, 1), got {fraction}")
    kept: list[np.ndarray] = []
    held: list[np.ndarray] = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        members = np.random.default_rng([seed, int(label)]).permutation(members)
        n_held = int(round(len(members) * fraction))
        if fraction > 0 and len(members) >= 2:
            n_held = min(max(n_held, 1), len(members) - 1)
        held.append(members[:n_held])
        kept.append(members[n_held:])
    return np.sort(np.concatenate(kept)), np.sort(np.concatenate(held))


def discover(root: Path, test_fraction: float = 0.2, split_seed: int = 0) -> tuple[FileList, FileList]:
    """Return (training pool, test set) for any accepted layout, validated."""
    layout = find_layout(root)
    pool = scan_class_folders(layout.train_dir)
    if layout.test_dir is not None:
        test = scan_class_folders(layout.test_dir)
        check_same_classes(pool, test)
        return pool, test
    log.info(
        "no val/ or test/ folder beside %s: holding out %.0f%% of it as the test set",
        layout.train_dir,
        100 * test_fraction,
    )
    keep, held = stratified_split(pool.labels, test_fraction, split_seed)
    return pool.subset(keep), pool.subset(held)
