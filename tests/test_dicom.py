"""DICOM, on the real files pydicom ships: rescale, windowing, MONOCHROME1, 16-bit depth, RGB, bad files."""

import numpy as np
import pytest
from pydicom import examples
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from medsight.config import Config, apply_overrides
from medsight.data.imageio import ImageReadError, read_image
from medsight.engine import train

from conftest import tiny_overrides


def minmax(a):
    a = a.astype(np.float64)
    return (a - a.min()) / (a.max() - a.min())


def test_ct_rescaled_and_kept_at_16_bit_depth(tmp_path):
    ds = examples.ct
    path = tmp_path / "ct.dcm"
    ds.save_as(path)
    img = read_image(path)
    assert img.shape == (1, 128, 128)
    expected = minmax(apply_modality_lut(ds.pixel_array, ds))
    np.testing.assert_allclose(img[0].numpy(), expected, atol=1e-6)
    assert len(np.unique(img.numpy())) > 256  # more grey levels than 8 bits could hold


def test_mr_window_is_applied(tmp_path):
    ds = examples.mr
    path = tmp_path / "mr.dcm"
    ds.save_as(path)
    img = read_image(path)[0].numpy()
    windowed = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds)
    np.testing.assert_allclose(img, minmax(windowed), atol=1e-6)
    raw = minmax(ds.pixel_array)
    assert not np.allclose(img, raw, atol=1e-3)  # the window changed the picture


def test_monochrome1_is_inverted(tmp_path):
    ds = examples.ct
    ds.save_as(tmp_path / "m2.dcm")
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(tmp_path / "m1.dcm")
    np.testing.assert_allclose(read_image(tmp_path / "m1.dcm").numpy(), 1 - read_image(tmp_path / "m2.dcm").numpy(),
                               atol=1e-6)


def test_rgb_dicom_has_three_channels(tmp_path):
    examples.rgb_color.save_as(tmp_path / "rgb.dcm")
    img = read_image(tmp_path / "rgb.dcm")
    assert img.shape[0] == 3 and 0 <= float(img.min()) and float(img.max()) <= 1


def test_bad_dicom_files_name_the_cause(tmp_path):
    ds = examples.ct
    del ds.PixelData
    ds.save_as(tmp_path / "nopix.dcm")
    with pytest.raises(ImageReadError, match="no pixel data"):
        read_image(tmp_path / "nopix.dcm")
    examples.ct.save_as(tmp_path / "full.dcm")
    (tmp_path / "cut.dcm").write_bytes((tmp_path / "full.dcm").read_bytes()[:2000])
    with pytest.raises(ImageReadError, match="cut.dcm"):
        read_image(tmp_path / "cut.dcm")


def test_training_on_a_dicom_folder(tmp_path):
    rng = np.random.default_rng(0)
    for label, name in enumerate(["normal", "lesion"]):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(10):
            ds = examples.ct
            arr = ds.pixel_array.copy()
            if label:
                arr[10:40, 10:40] = arr.max()
            arr = (arr + rng.integers(0, 50, arr.shape)).astype(arr.dtype)
            ds.PixelData = arr.tobytes()
            ds.save_as(tmp_path / "data" / name / f"{i}.dcm")
    cfg = apply_overrides(Config(), tiny_overrides(tmp_path / "run", tmp_path / "data") + ["train.sharpness_batches=1"])
    result = train(cfg, progress=False)
    assert result.metrics["test"]["n"] > 0 and (tmp_path / "run" / "best.pt").is_file()
    assert not result.metrics["skipped_files"]
