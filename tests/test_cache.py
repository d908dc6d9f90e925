"""Decoding odd images, and the decode-once cache: reuse, rebuild on change, concurrency, bad files."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import make_folder, write_image
from PIL import Image

from tune_inat.data.cache import build_or_load_cache, cache_key
from tune_inat.data.dataset import DataConfig, prepare_test, prepare_train_val
from tune_inat.data.decode import decode_image, stored_size_for
from tune_inat.data.folders import scan_class_folders
from tune_inat.errors import UserError


def test_stored_size_keeps_the_classic_eval_crop() -> None:
    assert stored_size_for(224) == 256
    assert all(stored_size_for(s) >= s for s in (32, 48, 64, 299, 384))


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [
        ("RGB", "JPEG"),
        ("L", "JPEG"),
        ("CMYK", "JPEG"),
        ("RGBA", "PNG"),
        ("P", "PNG"),
        ("LA", "PNG"),
        ("1", "PNG"),
        ("RGB", "WEBP"),
        ("RGB", "BMP"),
        ("P", "GIF"),
        ("I;16", "PNG"),
        ("I", "TIFF"),
        ("F", "TIFF"),
    ],
)
def test_every_mode_decodes_to_square_rgb(tmp_path: Path, mode: str, fmt: str) -> None:
    path = write_image(tmp_path / f"img.{fmt.lower()}", size=(50, 30), mode=mode, fmt=fmt)
    array = decode_image(path, 24)
    assert array.shape == (24, 24, 3) and array.dtype == np.uint8


def test_sixteen_bit_is_scaled_not_clipped(tmp_path: Path) -> None:
    path = tmp_path / "deep.png"
    Image.fromarray(np.full((20, 20), 32768, dtype=np.uint16)).save(path)
    assert Image.open(path).mode.startswith("I;16")
    array = decode_image(path, 16)
    assert 120 <= array.mean() <= 135  # half of 65535 -> about half of 255, not 255


def test_transparency_is_composited_over_white(tmp_path: Path) -> None:
    path = tmp_path / "clear.png"
    Image.new("RGBA", (10, 10), (0, 0, 0, 0)).save(path)
    assert decode_image(path, 8).min() == 255


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, :20] = (255, 0, 0)  # left half red, right half blue, as stored
    pixels[:, 20:] = (0, 0, 255)
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display": red ends up on top
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif, quality=95)
    array = decode_image(path, 20).astype(int)
    top, bottom = array[:5].mean((0, 1)), array[-5:].mean((0, 1))
    assert top[0] > 200 and top[2] < 60
    assert bottom[2] > 200 and bottom[0] < 60


def test_centre_square_is_kept(tmp_path: Path) -> None:
    pixels = np.zeros((10, 30, 3), dtype=np.uint8)
    pixels[:, 10:20] = 255  # only the centre third is white
    path = tmp_path / "wide.png"
    Image.fromarray(pixels).save(path)
    assert decode_image(path, 10).min() >= 250


def _truncated_jpeg(path: Path) -> Path:
    write_image(path, size=(64, 64), fmt="JPEG")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def test_unreadable_files_are_skipped_and_reported(tmp_path: Path, cache_dir: Path, caplog) -> None:
    make_folder(tmp_path, {"a": 4, "b": 4}, "train")
    make_folder(tmp_path, {"a": 1, "b": 1}, "val")
    _truncated_jpeg(tmp_path / "train" / "a" / "truncated.jpg")
    (tmp_path / "train" / "b" / "garbage.jpg").write_bytes(b"\xff\xd8\xff" + b"\x00" * 100)
    with caplog.at_level(logging.WARNING):
        data = prepare_train_val(DataConfig(tmp_path, cache_dir, progress=False), 16)
    assert len(data.cache.skipped) == 2
    assert {name for name, _ in data.cache.skipped} == {"a/truncated.jpg", "b/garbage.jpg"}
    assert len(data.train_rows) + len(data.val_rows) == 8
    assert "skipped 2 unreadable images" in caplog.text and "a/truncated.jpg" in caplog.text


def test_class_with_no_readable_images_is_an_error(tmp_path: Path, cache_dir: Path) -> None:
    make_folder(tmp_path, {"a": 3}, "train")
    _truncated_jpeg(tmp_path / "train" / "b" / "broken.jpg")
    make_folder(tmp_path, {"a": 1, "b": 1}, "val")
    with pytest.raises(UserError, match="class 'b' .* has no readable images"):
        prepare_train_val(DataConfig(tmp_path, cache_dir, progress=False), 16)


def test_cache_is_reused_and_rebuilt_on_change(tmp_path: Path, cache_dir: Path) -> None:
    data = tmp_path / "data"
    make_folder(data, {"a": 3, "b": 3})
    files = scan_class_folders(data)
    first = build_or_load_cache(files, 16, cache_dir, progress=False)
    images_file = first.directory / "images.npy"
    stamp = images_file.stat().st_mtime_ns
    second = build_or_load_cache(scan_class_folders(data), 16, cache_dir, progress=False)
    assert second.directory == first.directory and images_file.stat().st_mtime_ns == stamp
    assert np.array_equal(first.open_images(), second.open_images())

    other_size = build_or_load_cache(files, 24, cache_dir, progress=False)
    assert other_size.directory != first.directory and other_size.open_images().shape[1] == 24

    write_image(data / "a" / "000.jpg", seed=99)  # same name, new content and mtime
    os.utime(data / "a" / "000.jpg", ns=(stamp + 10**9, stamp + 10**9))
    changed = build_or_load_cache(scan_class_folders(data), 16, cache_dir, progress=False)
    assert changed.directory != first.directory
    assert not np.array_equal(changed.open_images()[0], first.open_images()[0])


def test_cache_content_matches_a_direct_decode(tmp_path: Path, cache_dir: Path) -> None:
    data = tmp_path / "data"
    make_folder(data, {"a": 2, "b": 2})
    files = scan_class_folders(data)
    cache = build_or_load_cache(files, 20, cache_dir, progress=False)
    images = cache.open_images()
    assert not images.flags.writeable
    for row in range(len(files)):
        assert np.array_equal(images[row], decode_image(files.path(row), 20))
    assert cache.labels.tolist() == files.labels.tolist()


def test_stale_partial_build_is_never_taken_for_a_cache(tmp_path: Path, cache_dir: Path) -> None:
    data = tmp_path / "data"
    make_folder(data, {"a": 2, "b": 2})
    files = scan_class_folders(data)
    key = cache_key(files, 16)
    stale = cache_dir / f"{key}.partial-999-dead"
    stale.mkdir(parents=True)
    (stale / "images.npy").write_bytes(b"half")
    cache = build_or_load_cache(files, 16, cache_dir, progress=False)
    assert cache.directory == cache_dir / key
    assert not stale.exists()
    assert cache.open_images().shape == (4, 16, 16, 3)


BUILD_SCRIPT = textwrap.dedent(
    """
    import sys, logging
    from pathlib import Path
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from tune_inat.data.folders import scan_class_folders
    from tune_inat.data.cache import build_or_load_cache
    cache = build_or_load_cache(scan_class_folders(Path(sys.argv[1])), 32, Path(sys.argv[2]), workers=1, progress=False)
    print("DIR", cache.directory, len(cache.rows))
    """
)


def test_two_processes_building_the_same_cache_build_it_once(tmp_path: Path, cache_dir: Path) -> None:
    make_folder(tmp_path / "data", {"a": 60, "b": 60})
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", BUILD_SCRIPT, str(tmp_path / "data"), str(cache_dir)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    dirs = {line.split()[1] for out in outputs for line in out.splitlines() if line.startswith("DIR")}
    assert len(dirs) == 1
    assert sum(out.count("built image cache") for out in outputs) == 1
    assert [p.name for p in cache_dir.iterdir() if ".partial-" in p.name] == []


def test_unwritable_cache_dir_is_a_user_error(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        blocked = tmp_path / "file-not-dir"
        blocked.write_text("x")
        cache_dir = blocked / "cache"
    else:
        cache_dir = tmp_path / "ro"
        cache_dir.mkdir(mode=0o500)
    make_folder(tmp_path / "data", {"a": 1, "b": 1})
    with pytest.raises(UserError, match="not writable"):
        build_or_load_cache(scan_class_folders(tmp_path / "data"), 16, cache_dir, progress=False)


def test_search_view_has_no_test_split(demo_root: Path, cache_dir: Path) -> None:
    cfg = DataConfig(demo_root, cache_dir, progress=False)
    data = prepare_train_val(cfg, 32)
    test = prepare_test(cfg, 32)
    assert not hasattr(data, "test_rows") and not hasattr(data, "test")
    assert test.cache.directory != data.cache.directory
    train_files = {data.cache.files[r] for r in np.concatenate([data.train_rows, data.val_rows])}
    assert len(train_files) == 400 and len(test.rows) == 100
    assert data.cache.source == demo_root / "train" and test.cache.source == demo_root / "val"
    assert len(set(data.train_rows) & set(data.val_rows)) == 0
    assert np.bincount(data.labels[data.val_rows]).tolist() == [8] * 10
