"""Reading one medical image file into a float tensor in [0, 1], whatever its depth and format.

PNG / JPEG / BMP / TIFF through Pillow (8- and 16-bit, grayscale, RGB, RGBA, palette) and DICOM through
pydicom (modality LUT, VOI LUT or window, MONOCHROME1 inverted, full bit depth kept until the end).
"""

from __future__ import annotations

import io
import re
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

__all__ = ["IMAGE_EXTS", "ImageReadError", "ImageTooLargeError", "read_image", "read_image_bytes", "MAX_PIXELS"]

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".dicom"}
#: Images above this many pixels are refused (a 20k x 20k image would take gigabytes as float).
MAX_PIXELS = 150_000_000


class ImageReadError(ValueError):
    """A file that is not a readable image (corrupt, empty, unsupported, or without pixel data)."""


class ImageTooLargeError(ImageReadError):
    """An image (or upload) past a size limit: refused before it is decoded in full."""


_REPR = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")


def _reason(exc: BaseException) -> str:
    """A library's error text without Python object reprs (``<_io.BytesIO object at 0x...>``)."""
    return _REPR.sub("the data", str(exc))


def _normalize_array(a: np.ndarray) -> np.ndarray:
    """uint8 by its range; deeper integers (12/16-bit medical data) and floats by min-max."""
    if a.dtype == np.uint8:
        return a.astype(np.float32) / 255.0
    a = a.astype(np.float32)
    lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)


def _pil_to_array(img: Image.Image) -> np.ndarray:
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return np.asarray(img, dtype=np.uint16)
    if img.mode in ("I", "F"):
        return np.asarray(img)
    if img.mode in ("L", "RGB"):
        return np.asarray(img)
    if img.mode in ("LA", "1"):
        return np.asarray(img.convert("L"))
    return np.asarray(img.convert("RGB"))  # RGBA, P, CMYK, YCbCr...: drop alpha, expand palettes


def _read_pil(fp: str | io.BytesIO, name: str) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(fp) as img:
                if img.width * img.height > MAX_PIXELS:
                    raise ImageTooLargeError(f"{name}: {img.width}x{img.height} pixels is larger than the "
                                         f"{MAX_PIXELS:,}-pixel limit")
                img.load()
                return _pil_to_array(img)
    except ImageReadError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise ImageTooLargeError(f"{name}: image too large ({_reason(exc)})") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(f"{name}: not a readable image ({_reason(exc)})") from exc


def _read_dicom(fp: str | io.BytesIO, name: str) -> np.ndarray:
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        ds = pydicom.dcmread(fp)
    except (InvalidDicomError, OSError, EOFError, ValueError) as exc:
        raise ImageReadError(f"{name}: not a readable DICOM file ({_reason(exc)})") from exc
    if "PixelData" not in ds:
        raise ImageReadError(f"{name}: DICOM file has no pixel data")
    try:
        arr = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for undecodable pixel data
        raise ImageReadError(f"{name}: cannot decode DICOM pixel data ({_reason(exc)})") from exc
    n_frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    samples = int(getattr(ds, "SamplesPerPixel", 1) or 1)
    if n_frames > 1:
        arr = arr[n_frames // 2]  # the middle frame of a multi-frame series
    if samples == 1:
        arr = apply_modality_lut(arr, ds)
        arr = apply_voi_lut(arr, ds) if ("WindowCenter" in ds or "VOILUTSequence" in ds) else arr
        out = _normalize_array(np.asarray(arr, dtype=np.float32))
        if getattr(ds, "PhotometricInterpretation", "") == "MONOCHROME1":
            out = 1.0 - out
        return out
    if getattr(ds, "PhotometricInterpretation", "RGB") != "RGB":
        from pydicom.pixels import convert_color_space

        arr = convert_color_space(arr, ds.PhotometricInterpretation, "RGB")
    return np.asarray(arr)


def _is_dicom(head: bytes, name: str) -> bool:
    return head[128:132] == b"DICM" or Path(name).suffix.lower() in (".dcm", ".dicom")


def _to_tensor(a: np.ndarray) -> torch.Tensor:
    a = a if a.dtype == np.float32 and a.max(initial=0) <= 1.0 else _normalize_array(a)
    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
    return t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1).contiguous()


def read_image_bytes(data: bytes, name: str = "upload") -> torch.Tensor:
    """Decode an image or DICOM held in memory to float [C, H, W] in [0, 1] (C = 1 or 3)."""
    if not data:
        raise ImageReadError(f"{name}: empty file")
    buf = io.BytesIO(data)
    a = _read_dicom(buf, name) if _is_dicom(data[:132], name) else _read_pil(buf, name)
    return _to_tensor(a)


def read_image(path: str | Path) -> torch.Tensor:
    """Read an image or DICOM file to float [C, H, W] in [0, 1] (C = 1 or 3)."""
    p = Path(path)
    if not p.is_file():
        raise ImageReadError(f"{p}: file not found")
    if p.stat().st_size == 0:
        raise ImageReadError(f"{p}: empty file")
    with p.open("rb") as fh:
        head = fh.read(132)
    a = _read_dicom(str(p), str(p)) if _is_dicom(head, p.name) else _read_pil(str(p), str(p))
    return _to_tensor(a)
