"""Property-based folder trees for the data scanner: any mix of entries ends in a file list or one UserError, fast.

Entries of every kind a user's disk holds: images, text and empty files, FIFOs named like photos, dangling
links, links that loop, links to folders, hidden files, names of every kind (spaces, unicode, dots).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from conftest import write_image
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tune_inat.data.folders import discover
from tune_inat.errors import UserError

KINDS = ("jpg", "png", "text", "empty", "fifo", "dangling", "loop", "dirlink", "subdir")
names = st.text(
    alphabet=st.characters(blacklist_characters="/\x00", blacklist_categories=("Cs",)), min_size=1, max_size=12
)
entries = st.lists(st.tuples(st.integers(0, 2), names, st.sampled_from(KINDS)), max_size=12)


def make_entry(folder: Path, name: str, kind: str, index: int) -> None:
    path = folder / name
    if path.exists() or path.is_symlink() or name in (".", ".."):
        return
    try:
        if kind in ("jpg", "png"):
            write_image(path, size=(8, 8), fmt="JPEG" if kind == "jpg" else "PNG", seed=index)
        elif kind == "text":
            path.write_text("not an image")
        elif kind == "empty":
            path.touch()
        elif kind == "fifo":
            os.mkfifo(path)
        elif kind == "dangling":
            path.symlink_to(folder / "missing-target")
        elif kind == "loop":
            path.symlink_to(path)
        elif kind == "dirlink":
            path.symlink_to(folder.parent)
        else:
            path.mkdir()
            write_image(path / "inner.jpg", size=(8, 8), fmt="JPEG", seed=index)
    except OSError:  # a name the file system refuses (too long in bytes, ...)
        pass


@settings(max_examples=60, deadline=10_000, suppress_health_check=[HealthCheck.too_slow])
@given(tree=entries)
def test_any_tree_ends_in_a_file_list_or_one_error(tree: list) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        classes = [root / "train" / c for c in ("cat", "dog", "odd name é")]
        for folder in classes:
            folder.mkdir(parents=True)
        for index, (which, name, kind) in enumerate(tree):
            make_entry(classes[which], name, kind, index)
        try:
            train, test = discover(root)
        except UserError as err:
            assert "\n" not in str(err) and str(err)
            return
        for files in (train, test):
            for relative in files.files:
                path = files.root / relative
                assert path.is_file() and not path.is_fifo()
