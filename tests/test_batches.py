"""Device batches from the cache: exact evaluation crops, seeded augmentation, batching rules."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tune_inat.data.batches import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Augmentation,
    Crops,
    DeviceBatches,
    _ordered_in_threads,
    _prefetched,
    augment,
    center_crop,
    crop_resize_each,
    crop_resize_grid,
    normalize_,
    sample_crops,
)

CPU = torch.device("cpu")


def _images(n: int = 10, side: int = 20) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, side, side, 3), dtype=np.uint8)


def test_center_crop_is_the_exact_normalised_centre() -> None:
    images = _images()
    out = center_crop(torch.from_numpy(images), 16)
    assert out.shape == (10, 3, 16, 16)
    expected = images[:, 2:18, 2:18, :].transpose(0, 3, 1, 2) / 255.0
    expected = (expected - np.array(IMAGENET_MEAN)[:, None, None]) / np.array(IMAGENET_STD)[:, None, None]
    assert torch.allclose(out, torch.from_numpy(expected).float(), atol=1e-5)


def test_crops_follow_random_resized_crop_rules() -> None:
    crops = sample_crops(2000, 256, Augmentation(crop_scale_min=0.25), torch.Generator().manual_seed(0))
    area = crops.height * crops.width / 256**2
    aspect = crops.width / crops.height
    assert area.min() >= 0.24 and area.max() <= 1.0
    assert aspect.min() >= 0.7 and aspect.max() <= 1.45
    assert (crops.top >= 0).all() and (crops.top + crops.height <= 256).all()
    assert (crops.left >= 0).all() and (crops.left + crops.width <= 256).all()
    assert 0.4 < crops.flip.mean() < 0.6


def test_cpu_and_gpu_resampling_agree() -> None:
    """The CPU path (uint8 per crop) and the GPU path (one grid_sample) make the same crops."""
    images = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (6, 64, 64, 3), dtype=np.uint8))
    images = (
        torch.nn.functional.avg_pool2d(images.permute(0, 3, 1, 2).float(), 5, 1, 2).permute(0, 2, 3, 1).to(torch.uint8)
    )
    crops = sample_crops(6, 64, Augmentation(crop_scale_min=0.5), torch.Generator().manual_seed(3))
    each, grid = crop_resize_each(images, crops, 48, normalize=False), crop_resize_grid(images, crops, 48)
    assert each.shape == grid.shape == (6, 3, 48, 48)
    assert (each - grid).abs().mean() < 6.0  # bilinear both; borders and antialiasing differ a little


def test_whole_square_and_flip() -> None:
    images = torch.from_numpy(_images(2, 32))
    whole = Crops(np.zeros(2, int), np.zeros(2, int), np.full(2, 32), np.full(2, 32), np.array([False, True]), None)
    out = crop_resize_each(images, whole, 32, normalize=False)
    plain = images.permute(0, 3, 1, 2).float()
    assert torch.equal(out[0], plain[0]) and torch.equal(out[1], plain[1].flip(-1))
    grid = crop_resize_grid(images, whole, 32)
    assert torch.allclose(grid[0], plain[0], atol=1e-3) and torch.allclose(grid[1], plain[1].flip(-1), atol=1e-3)


def test_per_image_normalisation_equals_the_batch_one() -> None:
    images = torch.from_numpy(_images(4, 32))
    crops = sample_crops(4, 32, Augmentation(), torch.Generator().manual_seed(2))
    fused = crop_resize_each(images, crops, 24, normalize=True)
    assert torch.allclose(fused, normalize_(crop_resize_each(images, crops, 24, normalize=False)), atol=1e-5)


def test_batches_made_in_threads_equal_those_made_inline() -> None:
    common = dict(batch_size=3, image_size=16, device=CPU, train=True, seed=5)
    inline = DeviceBatches(_images(), np.arange(10), np.arange(10), **common)
    threaded = DeviceBatches(_images(), np.arange(10), np.arange(10), cpu_workers=2, **common)
    for (a, la), (b, lb) in zip(inline.epoch(1), threaded.epoch(1), strict=True):
        assert torch.equal(a, b) and torch.equal(la, lb)


def test_augmentation_is_seeded_by_epoch() -> None:
    batches = DeviceBatches(
        _images(), np.arange(10) % 2, np.arange(10), batch_size=4, image_size=16, device=CPU, train=True, seed=3
    )
    first = [x for x, _ in batches.epoch(0)]
    again = [x for x, _ in batches.epoch(0)]
    other = [x for x, _ in batches.epoch(1)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))


def test_train_batches_shuffle_and_drop_the_last_partial() -> None:
    labels = np.arange(10)
    batches = DeviceBatches(_images(), labels, np.arange(10), batch_size=4, image_size=16, device=CPU, train=True)
    assert len(batches) == 2 and batches.num_images == 8
    seen = torch.cat([y for _, y in batches.epoch(0)]).tolist()
    assert len(seen) == 8 and len(set(seen)) == 8


def test_eval_batches_cover_every_row_once_with_matching_labels() -> None:
    images = _images()
    labels = np.arange(10) * 7
    rows = np.array([9, 0, 4, 5, 2])
    batches = DeviceBatches(images, labels, rows, batch_size=2, image_size=16, device=CPU, train=False)
    assert len(batches) == 3
    xs, ys = zip(*batches.epoch(0))
    got = torch.cat(ys).tolist()
    assert sorted(got) == sorted((rows * 7).tolist())
    for x, y in zip(torch.cat(xs), got):  # each image travels with its own label
        assert torch.equal(x, center_crop(torch.from_numpy(images[y // 7 : y // 7 + 1]), 16)[0])


def test_a_tiny_train_set_still_gives_one_batch() -> None:
    batches = DeviceBatches(
        _images(), np.zeros(10, int), np.arange(3), batch_size=8, image_size=16, device=CPU, train=True
    )
    assert len(batches) == 1 and next(iter(batches.epoch(0)))[0].shape[0] == 3


def test_colour_jitter_changes_images_but_keeps_range() -> None:
    images = torch.from_numpy(_images())
    plain = augment(images, sample_crops(10, 20, Augmentation(color_jitter=0.0), torch.Generator().manual_seed(1)), 16)
    jittered = augment(
        images, sample_crops(10, 20, Augmentation(color_jitter=0.4), torch.Generator().manual_seed(1)), 16
    )
    assert not torch.allclose(plain, jittered)
    low = (0 - max(IMAGENET_MEAN)) / min(IMAGENET_STD)
    high = (1 - min(IMAGENET_MEAN)) / min(IMAGENET_STD)
    assert jittered.min() >= low - 1e-4 and jittered.max() <= high + 1e-4


def test_threaded_batches_come_in_order_and_surface_errors() -> None:
    assert list(_ordered_in_threads(lambda x: x * x, list(range(20)), 3)) == [x * x for x in range(20)]

    def fails(x: int) -> int:
        if x == 5:
            raise ValueError("bad batch")
        return x

    with pytest.raises(ValueError, match="bad batch"):
        list(_ordered_in_threads(fails, list(range(10)), 2))


def test_prefetch_surfaces_producer_errors() -> None:
    def broken():
        yield 1
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        list(_prefetched(broken(), 2))


def test_prefetch_stops_when_the_consumer_stops() -> None:
    produced = []

    def endless():
        i = 0
        while True:
            produced.append(i)
            yield i
            i += 1

    for item in _prefetched(endless(), 2):
        if item == 3:
            break
    count = len(produced)
    assert count <= 3 + 2 + 2  # consumed + queue depth + one in hand
