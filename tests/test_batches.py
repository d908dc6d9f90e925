"""Device batches from the cache: exact evaluation crops, seeded augmentation, batching rules."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tune_inat.data.batches import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Augmentation,
    DeviceBatches,
    _prefetched,
    center_crop,
    random_resized_crop,
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


def test_full_crop_without_flip_is_a_plain_resize() -> None:
    images = torch.from_numpy(_images(4, 16))
    aug = Augmentation(crop_scale_min=1.0, hflip=False)
    out = random_resized_crop(images, 16, aug, torch.Generator().manual_seed(0))
    # area 1 with aspect != 1 still crops a little; at aspect 1 it is the identity
    same = center_crop(images, 16)
    assert out.shape == same.shape
    assert (out - same).abs().mean() < 0.6  # close to the untouched image, not noise


def test_augmentation_is_seeded_by_epoch() -> None:
    batches = DeviceBatches(_images(), np.arange(10) % 2, np.arange(10), batch_size=4, image_size=16,
                            device=CPU, train=True, seed=3)
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
    batches = DeviceBatches(_images(), np.zeros(10, int), np.arange(3), batch_size=8, image_size=16, device=CPU, train=True)
    assert len(batches) == 1 and next(iter(batches.epoch(0)))[0].shape[0] == 3


def test_colour_jitter_changes_images_but_keeps_range() -> None:
    images = torch.from_numpy(_images())
    plain = random_resized_crop(images, 16, Augmentation(color_jitter=0.0), torch.Generator().manual_seed(1))
    jittered = random_resized_crop(images, 16, Augmentation(color_jitter=0.4), torch.Generator().manual_seed(1))
    assert not torch.allclose(plain, jittered)
    low = (0 - max(IMAGENET_MEAN)) / min(IMAGENET_STD)
    high = (1 - min(IMAGENET_MEAN)) / min(IMAGENET_STD)
    assert jittered.min() >= low - 1e-4 and jittered.max() <= high + 1e-4


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
