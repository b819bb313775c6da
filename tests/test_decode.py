"""Decoding for the size you need: reduced-size JPEG, 16-bit PNG and DICOM kept integer while shrunk, and
the result within a stated tolerance of today's full decode resized to the same input."""

import numpy as np
import pytest
import torch
from PIL import Image
from pydicom import examples
from torchvision.transforms import v2

from medsight.data import ImageDataset
from medsight.data.imageio import read_image, read_image_bytes
from medsight.data.sources import SplitData
from medsight.data.transforms import make_transform

#: The stated tolerance, on [0, 1] images at the model's input size: mean |Δ| and the 99.9th percentile.
MEAN_TOL, P999_TOL = 0.01, 0.08


def smooth_noise(h: int, w: int, seed: int, channels: int = 0) -> np.ndarray:
    """Smooth random structure in [0, 1] (so that compression and resizing behave as on real images)."""
    import cv2

    rng = np.random.default_rng(seed)
    shape = (h // 40 + 2, w // 40 + 2) + ((channels,) if channels else ())
    small = rng.random(shape).astype(np.float32)
    big = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
    return np.clip(big + 0.03 * rng.standard_normal(big.shape).astype(np.float32), 0, 1)


def files(tmp_path):
    out = {}
    jpg = (smooth_noise(900, 1200, 0, channels=3) * 255).astype(np.uint8)
    out["jpeg"] = tmp_path / "fundus.jpg"
    Image.fromarray(jpg).save(out["jpeg"], quality=90)
    png16 = (500 + smooth_noise(1000, 1000, 1) * 3000).astype(np.uint16)  # 12 bits used, as X-ray detectors do
    out["png16"] = tmp_path / "cxr.png"
    Image.fromarray(png16).save(out["png16"])
    ds = examples.ct  # a real CT header (rescale slope/intercept), with a larger picture
    ds.Rows, ds.Columns = 800, 800
    ds.PixelData = (smooth_noise(800, 800, 2) * 2000 - 200).astype(np.int16).tobytes()
    ds.WindowCenter, ds.WindowWidth = 40, 400
    out["dicom"] = tmp_path / "ct.dcm"
    ds.save_as(out["dicom"])
    return out


@pytest.mark.parametrize("kind", ["jpeg", "png16", "dicom"])
def test_reduced_decode_matches_the_full_decode_within_tolerance(tmp_path, kind):
    path = files(tmp_path)[kind]
    size = 64
    full = read_image(path)
    small = read_image(path, reduce_to=2 * size)
    assert min(small.shape[-2:]) >= 2 * size and small.numel() * 4 <= full.numel()  # really smaller
    assert small.dtype == torch.float32 and 0 <= float(small.min()) and float(small.max()) <= 1
    resize = v2.Resize((size, size), antialias=True)
    a, b = resize(full), resize(small)
    diff = (a - b).abs()
    assert float(diff.mean()) < MEAN_TOL, float(diff.mean())
    assert float(torch.quantile(diff.flatten(), 0.999)) < P999_TOL
    assert float((a.mean() - b.mean()).abs()) < 0.005  # intensity scale kept (the full image's range)


def test_small_images_are_decoded_as_they_are(tmp_path):
    path = tmp_path / "small.png"
    Image.fromarray((smooth_noise(100, 90, 3) * 65535).astype(np.uint16)).save(path)
    assert torch.equal(read_image(path, reduce_to=128), read_image(path))
    data = path.read_bytes()
    assert torch.equal(read_image_bytes(data, "small.png", reduce_to=128), read_image(path))


def test_the_dataset_decodes_at_twice_its_input_size(tmp_path):
    path = files(tmp_path)["jpeg"]
    split = SplitData(labels=np.array([0]), paths=[str(path)])
    tf = make_transform(64, [0.5] * 3, [0.5] * 3, train=False)
    reduced, full = ImageDataset(split, tf), ImageDataset(split, tf, reduce=False)
    assert reduced.reduce_to == 128 and full.reduce_to is None
    img = reduced.load(0)
    assert min(img.shape[-2:]) >= 128 and max(img.shape[-2:]) < 1200
    x, _ = reduced[0]
    y, _ = full[0]
    assert x.shape == y.shape == (3, 64, 64)
    assert float((x - y).abs().mean()) < 2 * MEAN_TOL / 0.5  # normalized by std 0.5: twice the [0, 1] tolerance
