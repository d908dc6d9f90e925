"""Layouts, validation, content sniffing and stratified splits, on real files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import make_folder, write_image

from tune_inat.data.folders import discover, find_layout, scan_class_folders, stratified_split
from tune_inat.errors import UserError


def test_inat_layout_train_and_val(tmp_path: Path) -> None:
    make_folder(tmp_path, {"Aves": 3, "Fungi": 2}, "train")
    make_folder(tmp_path, {"Aves": 1, "Fungi": 1}, "val")
    pool, test = discover(tmp_path)
    assert pool.classes == test.classes == ("Aves", "Fungi")
    assert len(pool) == 5 and len(test) == 2
    assert pool.class_counts().tolist() == [3, 2]


@pytest.mark.parametrize("nested", ["inaturalist_12K", "nature_12K", "nature_12K/inaturalist_12K"])
def test_nested_roots_are_found(tmp_path: Path, nested: str) -> None:
    make_folder(tmp_path / nested, {"a": 1, "b": 1}, "train")
    make_folder(tmp_path / nested, {"a": 1, "b": 1}, "val")
    layout = find_layout(tmp_path)
    assert layout.train_dir == tmp_path / nested / "train"
    assert layout.test_dir == tmp_path / nested / "val"


def test_class_folders_only_split_off_a_test_set(tmp_path: Path) -> None:
    make_folder(tmp_path, {"a": 10, "b": 10, "c": 5})
    pool, test = discover(tmp_path, test_fraction=0.2, split_seed=3)
    assert test.class_counts().tolist() == [2, 2, 1]
    assert pool.class_counts().tolist() == [8, 8, 4]
    assert not set(pool.files) & set(test.files)
    again_pool, again_test = discover(tmp_path, test_fraction=0.2, split_seed=3)
    assert again_test.files == test.files and again_pool.files == pool.files


def test_images_found_by_content_not_extension(tmp_path: Path) -> None:
    base = tmp_path / "train"
    write_image(base / "a" / "png_named.jpg", fmt="PNG")
    write_image(base / "a" / "jpeg_no_ext", fmt="JPEG")
    write_image(base / "a" / "photo.webp", fmt="WEBP")
    write_image(base / "b" / "photo.bmp", fmt="BMP")
    (base / "b" / "notes.jpg").write_text("not an image")
    (base / "b" / "README.txt").write_text("hello")
    write_image(base / "b" / ".hidden.jpg")
    write_image(base / "b" / ".thumbs" / "x.jpg")
    write_image(base / ".git" / "x.jpg")
    files = scan_class_folders(base)
    assert files.classes == ("a", "b")
    assert sorted(files.files) == ["a/jpeg_no_ext", "a/photo.webp", "a/png_named.jpg", "b/photo.bmp"]


def test_class_names_with_spaces_and_non_ascii(tmp_path: Path) -> None:
    make_folder(tmp_path, {"Ürsus arctos": 2, "Pájaro azul": 2, "蘑菇": 2}, "train")
    make_folder(tmp_path, {"Ürsus arctos": 1, "Pájaro azul": 1, "蘑菇": 1}, "val")
    pool, _ = discover(tmp_path)
    assert set(pool.classes) == {"Ürsus arctos", "Pájaro azul", "蘑菇"}
    assert all(pool.path(i).is_file() for i in range(len(pool)))


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda r: None, "does not exist"),
        (lambda r: r.write_text("x"), "is a file"),
        (lambda r: r.mkdir(), "is empty"),
        (lambda r: write_image(r / "loose.jpg"), "no class folders"),
        (lambda r: make_folder(r, {"only": 2}, "train"), "only one class"),
        (lambda r: (make_folder(r, {"a": 2}, "train"), (r / "train" / "b").mkdir()), "'b'"),
        (lambda r: (make_folder(r, {"a": 1, "b": 1}, "train"), make_folder(r, {"a": 1, "c": 1}, "val")), "differ"),
        (lambda r: ((r / "train" / "a").mkdir(parents=True), (r / "train" / "b").mkdir()), "have no images"),
    ],
    ids=["missing", "file", "empty", "no-class-folders", "one-class", "empty-class", "class-mismatch", "all-empty"],
)
def test_bad_layouts_give_one_clear_line(tmp_path: Path, setup, message: str) -> None:
    root = tmp_path / "data"
    setup(root)
    with pytest.raises(UserError, match=message) as info:
        discover(root)
    assert "\n" not in str(info.value)


def test_class_mismatch_names_both_sides(tmp_path: Path) -> None:
    make_folder(tmp_path, {"a": 1, "b": 1}, "train")
    make_folder(tmp_path, {"a": 1, "c": 1}, "val")
    with pytest.raises(UserError, match=r"only in train/: \['b'\]; only in val/: \['c'\]"):
        discover(tmp_path)


def test_stratified_split_is_seeded_disjoint_and_proportional() -> None:
    labels = np.repeat(np.arange(4), [50, 30, 20, 2])
    kept, held = stratified_split(labels, 0.2, seed=7)
    assert not set(kept) & set(held)
    assert sorted(np.concatenate([kept, held]).tolist()) == list(range(len(labels)))
    assert np.bincount(labels[held]).tolist() == [10, 6, 4, 1]
    kept2, held2 = stratified_split(labels, 0.2, seed=7)
    assert np.array_equal(held, held2) and np.array_equal(kept, kept2)
    _, held3 = stratified_split(labels, 0.2, seed=8)
    assert not np.array_equal(held, held3)


def test_split_of_one_class_does_not_move_another() -> None:
    labels = np.repeat(np.arange(2), [20, 20])
    _, held = stratified_split(labels, 0.25, seed=1)
    more = np.concatenate([labels, np.full(20, 2)])
    _, held_more = stratified_split(more, 0.25, seed=1)
    assert set(held) <= set(held_more)


def test_split_fraction_out_of_range() -> None:
    with pytest.raises(UserError, match="fraction"):
        stratified_split(np.zeros(4, dtype=int), 1.0, 0)
