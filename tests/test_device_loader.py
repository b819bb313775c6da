"""The loader that keeps a GPU fed: settings from the machine, batched cache reads, augmentation on the device."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from medsight.config import DataConfig
from medsight.data import ImageDataset
from medsight.data.cache import Rows, open_cache, prepare_cache
from medsight.data.loader import (BatchAugment, DeviceLoader, batch_augment_of, build_loader, loader_settings,
                                  read_rows)
from medsight.data.transforms import make_transform

SIZE = 24
MEAN, STD = [0.5, 0.4, 0.3], [0.25, 0.2, 0.5]


@pytest.fixture
def cache(small_npz: Path, tmp_path: Path) -> Path:
    prepare_cache(DataConfig(path=str(small_npz), image_size=SIZE), tmp_path / "cache")
    return tmp_path / "cache"


def dataset(cache: Path, split: str = "train", train: bool = True, **kw) -> ImageDataset:
    cfg = DataConfig(image_size=SIZE, **kw)
    return ImageDataset(open_cache(cache)[0][split], make_transform(SIZE, MEAN, STD, train=train, cfg=cfg))


def test_settings_follow_the_device_and_the_cores():
    gpu = loader_settings(torch.device("cuda"), cores=16)
    assert (gpu.num_workers, gpu.pin_memory, gpu.persistent_workers, gpu.prefetch_factor, gpu.non_blocking) == \
        (8, True, True, 4, True)
    assert loader_settings(torch.device("cuda"), cores=16, world_size=4).num_workers == 3  # 4 processes share 16
    assert loader_settings(torch.device("cuda"), cores=1).num_workers == 0
    cpu = loader_settings(torch.device("cpu"), cores=16)
    assert (cpu.num_workers, cpu.pin_memory, cpu.persistent_workers, cpu.prefetch_factor) == (0, False, False, None)
    assert loader_settings(torch.device("cpu"), num_workers=2).persistent_workers  # the user's count wins


def test_read_rows_returns_rows_in_the_order_asked_from_a_memory_map_or_a_view():
    base = np.arange(10 * 4, dtype=np.uint8).reshape(10, 2, 2)
    idx = np.array([7, 2, 9, 2, 0])
    assert np.array_equal(read_rows(base, idx), base[idx])
    view = Rows(base, np.array([9, 8, 1, 3, 5, 0]))
    assert np.array_equal(read_rows(view, np.array([3, 0, 5])), base[[3, 9, 0]])


def test_evaluation_batches_equal_the_per_image_path(cache):
    ds = dataset(cache, "test", train=False)
    loader = build_loader(ds, 5, False, loader_settings(torch.device("cpu")), torch.device("cpu"))
    assert isinstance(loader, DeviceLoader) and len(loader) == -(-len(ds) // 5)
    xs, ys = zip(*[(x, y) for x, y, bad in loader])
    x, y = torch.cat(xs), torch.cat(ys)
    want = torch.stack([ds[i][0] for i in range(len(ds))])
    assert x.shape == want.shape == (len(ds), 3, SIZE, SIZE) and x.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(x, want, atol=1e-5, rtol=0)
    assert y.tolist() == [int(v) for v in ds.data.labels]


def test_flip_and_rotation_on_the_batch_are_torchvisions():
    g = torch.Generator().manual_seed(0)
    img = (torch.rand(2, SIZE, SIZE, 3, generator=g) * 255).to(torch.uint8)
    aug = BatchAugment([0.0] * 3, [1.0] * 3, hflip=0.5, degrees=30)
    plain = img.permute(0, 3, 1, 2).float() / 255
    out = aug(img, {"hflip": torch.tensor([True, False]), "vflip": torch.tensor([False, False]),
                    "angle": torch.tensor([0.0, 20.0])})
    torch.testing.assert_close(out[0], TF.horizontal_flip(plain[0]))
    turned = TF.rotate(plain[1], 20.0, interpolation=v2.InterpolationMode.NEAREST)
    # the same turn, counter-clockwise; nearest-neighbour sampling may round a pixel on an edge the other way
    assert float(((out[1] - turned).abs() < 1e-6).float().mean()) > 0.95
    assert float(((out[1] - TF.rotate(plain[1], -20.0)).abs() < 1e-6).float().mean()) < 0.9


def test_only_what_the_batch_can_do_goes_to_the_device(cache, small_npz):
    aug = batch_augment_of(dataset(cache, hflip=True, rotate_degrees=10))
    assert aug is not None and (aug.hflip, aug.vflip, aug.degrees) == (0.5, 0.0, 10.0) and aug.mean == MEAN
    assert batch_augment_of(dataset(cache, brightness=0.2)) is None  # colour jitter: per image
    assert batch_augment_of(dataset(cache, translate=0.1)) is None
    from medsight.data import load_data

    split = load_data(DataConfig(path=str(small_npz), image_size=SIZE)).splits["train"]  # not a prepared cache
    assert batch_augment_of(ImageDataset(split, make_transform(SIZE, MEAN, STD, True, DataConfig()))) is None
    assert not isinstance(build_loader(ImageDataset(split, make_transform(SIZE, MEAN, STD, True, DataConfig())), 4,
                                       True, loader_settings(torch.device("cpu")), torch.device("cpu")), DeviceLoader)


def test_training_batches_are_augmented_per_image_and_follow_the_seed(cache):
    ds = dataset(cache, hflip=True, rotate_degrees=15)
    settings = loader_settings(torch.device("cpu"))

    def epoch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(seed)
        loader = build_loader(ds, 8, True, settings, torch.device("cpu"), seed=seed)
        xs, ys = zip(*[(x, y) for x, y, _ in loader])
        return torch.cat(xs), torch.cat(ys)

    a, b, c = epoch(0), epoch(0), epoch(1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    assert sorted(a[1].tolist()) == sorted(int(v) for v in ds.data.labels)  # every image once
    plain = torch.stack([dataset(cache, train=False)[i][0] for i in range(len(ds))])
    # each augmented image is one of the data set's images, turned or flipped: never all of them unchanged
    unchanged = sum(any(torch.allclose(x, p, atol=1e-5) for p in plain) for x in a[0])
    assert unchanged < len(ds) // 2


def test_robustness_on_a_prepared_cache_corrupts_after_the_framing_and_does_not_depend_on_workers(cache):
    # regression: robustness on a cached split failed (its corruption took the place of the geometric step)
    from medsight.evaluation.robustness import CorruptedImages, corrupt, robustness
    from medsight.models import create_model
    from medsight.tasks import build_task

    ds = dataset(cache, "test", train=False)
    img = ds.load(3)
    x, y = CorruptedImages(ds, "gaussian_noise", 2, seed=5)[3]
    want = ds._apply(corrupt(img, "gaussian_noise", 2, torch.Generator().manual_seed(5 * 1_000_003 + 3)))
    assert torch.equal(x, want) and x.shape == (3, SIZE, SIZE) and y == int(ds.data.labels[3])
    assert not torch.equal(x, CorruptedImages(ds, "gaussian_noise", 2, seed=6)[3][0])
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=2, img_size=SIZE).eval()
    task = build_task("auto", ["a", "b"], ds.data.labels)
    kw = {"corruptions": ["gaussian_noise", "blur"], "severities": (1, 3), "seed": 1}
    one = robustness(model, task, ds.data, ds.transform, torch.device("cpu"), batch_size=5, **kw)
    two = robustness(model, task, ds.data, ds.transform, torch.device("cpu"), batch_size=4, num_workers=2, **kw)
    assert one == two and one["n"] == len(ds) and set(one["corruptions"]) == {"gaussian_noise", "blur"}
