"""Reading one medical image file into a float tensor in [0, 1], whatever its depth and format.

PNG / JPEG / BMP / TIFF through Pillow (8- and 16-bit, grayscale, RGB, RGBA, palette) and DICOM through
pydicom (modality LUT, VOI LUT or window, MONOCHROME1 inverted, full bit depth kept until the end).

Decoding for the size you need (``reduce_to``): when the caller knows its input size, a large image is
decoded at a reduced size whose sides stay at least ``reduce_to`` (callers pass twice their input size, so
the final resize still has two source pixels per output pixel). JPEG uses Pillow's ``draft`` (the
decoder's DCT scaling by 1/2, 1/4 or 1/8: the reduced image costs a fraction of the full decode); every
format is then shrunk by area averaging while still integer (8- or 16-bit, DICOM's stored values), and
only the small result becomes float. Intensity scaling (min-max of 16-bit data, DICOM's LUTs) uses the
full image's range, so the reduced image matches the full decode resized to the same input (tested: mean
absolute difference under 0.01 of the range at 224 px).
"""

from __future__ import annotations

import io
import re
import warnings
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from medsight.errors import MedsightError

__all__ = ["IMAGE_EXTS", "ImageReadError", "ImageTooLargeError", "read_image", "read_image_bytes", "MAX_PIXELS",
           "pixel_limit"]

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".dicom"}
#: Images above this many pixels are refused (a 20k x 20k image would take gigabytes as float).
MAX_PIXELS = 150_000_000
#: Bytes per pixel a DICOM may store (four 8-bit samples, or two 16-bit ones) within the pixel limit.
_MAX_BYTES_PER_PIXEL = 4


def pixel_limit() -> int:
    """The pixel limit every format is held to before decoding: ``MAX_PIXELS``, or Pillow's decompression-bomb
    limit (``Image.MAX_IMAGE_PIXELS``, about 89 megapixels) when lower."""
    pil = Image.MAX_IMAGE_PIXELS
    return min(MAX_PIXELS, int(pil)) if pil else MAX_PIXELS


class ImageReadError(MedsightError, ValueError):
    """A file that is not a readable image (corrupt, empty, unsupported, or without pixel data)."""


class ImageTooLargeError(ImageReadError):
    """An image (or upload) past a size limit: refused before it is decoded in full."""


_REPR = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")


def _reason(exc: BaseException) -> str:
    """A library's error text without Python object reprs (``<_io.BytesIO object at 0x...>``)."""
    return _REPR.sub("the data", str(exc))


def _normalize_array(a: np.ndarray, value_range: tuple[float, float] | None = None) -> np.ndarray:
    """uint8 by its range; deeper integers (12/16-bit medical data) and floats by min-max (of ``value_range``
    when given: the full image's range, for an image that was shrunk)."""
    if a.dtype == np.uint8:
        return a.astype(np.float32) / 255.0
    a = a.astype(np.float32)
    lo, hi = value_range if value_range is not None else (float(np.nanmin(a)), float(np.nanmax(a)))
    return np.clip((a - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(a)


#: dtypes OpenCV's area resize takes
_SHRINKABLE = (np.uint8, np.uint16, np.int16, np.float32, np.float64)


def _shrink(a: np.ndarray, reduce_to: int | None) -> np.ndarray:
    """Area-average ``a`` (H, W[, C]) down so that both sides stay at least ``reduce_to``, in its own dtype
    (integers stay integers). Unchanged when it is already that small (or of a dtype OpenCV cannot resize)."""
    if not reduce_to or a.dtype.type not in _SHRINKABLE:
        return a
    h, w = a.shape[:2]
    scale = max(reduce_to / h, reduce_to / w)
    if scale >= 1:
        return a
    import cv2

    size = (max(reduce_to, round(w * scale)), max(reduce_to, round(h * scale)))
    return cv2.resize(np.ascontiguousarray(a), size, interpolation=cv2.INTER_AREA)


def _range(a: np.ndarray) -> tuple[float, float] | None:
    """The min-max range normalization would use on ``a`` (None for 8-bit, which is scaled by 255)."""
    if a.dtype == np.uint8:
        return None
    return float(np.nanmin(a)), float(np.nanmax(a))


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


def _read_pil(fp: str | io.BytesIO, name: str, reduce_to: int | None = None
              ) -> tuple[np.ndarray, tuple[float, float] | None]:
    """(pixels, the full image's value range) — shrunk towards ``reduce_to`` when given."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(fp) as img:
                if img.width * img.height > pixel_limit():
                    raise ImageTooLargeError(f"{name}: {img.width}x{img.height} pixels is larger than the "
                                             f"{pixel_limit():,}-pixel limit")
                if reduce_to and img.format == "JPEG":
                    img.draft(img.mode, (reduce_to, reduce_to))  # DCT scaling: both sides stay >= reduce_to
                img.load()
                a = _pil_to_array(img)
                if not reduce_to:
                    return a, None
                return _shrink(a, reduce_to), _range(a)
    except ImageReadError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise ImageTooLargeError(f"{name}: image too large ({_reason(exc)})") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(f"{name}: not a readable image ({_reason(exc)})") from exc


def _check_inflated(fh: Any, name: str, limit: int) -> None:
    """A deflated DICOM's data set, inflated in bounded steps and counted (pydicom inflates all of it at
    once: a few hundred kB can hold gigabytes)."""
    inflater, total = zlib.decompressobj(-zlib.MAX_WBITS), 0
    while not inflater.eof and (chunk := fh.read(1 << 20)):
        while chunk and not inflater.eof:
            total += len(inflater.decompress(chunk, 1 << 24))
            if total > limit:
                raise ImageTooLargeError(f"{name}: its deflated data set inflates past {limit:,} bytes")
            chunk = inflater.unconsumed_tail


def _dicom_header(fp: str | io.BytesIO, name: str) -> None:
    """Check a DICOM's pixel size from its header, before any pixel data is decoded (or a deflated data set
    inflated): rows × columns × frames within :func:`pixel_limit`, at most ``_MAX_BYTES_PER_PIXEL`` bytes
    per pixel, bits allocated 1, 8, 16, 32 or 64."""
    import pydicom
    from pydicom.filereader import _read_file_meta_info, read_preamble  # no public reader of an open file's meta

    limit = pixel_limit()
    fh = open(fp, "rb") if isinstance(fp, str) else fp  # noqa: SIM115 - closed below
    try:
        fh.seek(0)
        read_preamble(fh, False)
        if _read_file_meta_info(fh).get("TransferSyntaxUID") == pydicom.uid.DeflatedExplicitVRLittleEndian:
            _check_inflated(fh, name, limit * _MAX_BYTES_PER_PIXEL + (16 << 20))
        fh.seek(0)
        ds = pydicom.dcmread(fh, stop_before_pixels=True)
    finally:
        if fh is fp:
            fh.seek(0)
        else:
            fh.close()
    try:
        rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        samples, bits = int(ds.get("SamplesPerPixel", 1) or 1), int(ds.get("BitsAllocated", 8) or 8)
    except (TypeError, ValueError) as exc:
        raise ImageReadError(f"{name}: unreadable DICOM image size ({_reason(exc)})") from exc
    if min(rows, cols, frames, samples) < 0 or bits not in (1, 8, 16, 32, 64):
        raise ImageReadError(f"{name}: DICOM header gives an impossible image ({rows} rows, {cols} columns, "
                             f"{frames} frames, {samples} samples, {bits} bits allocated)")
    pixels = rows * cols * frames
    if pixels > limit or pixels * samples * max(bits, 8) // 8 > limit * _MAX_BYTES_PER_PIXEL:
        raise ImageTooLargeError(f"{name}: {cols}x{rows} pixels x {frames} frame(s) x {samples} sample(s) of "
                                 f"{bits} bits is larger than the {limit:,}-pixel limit")


def _read_dicom(fp: str | io.BytesIO, name: str, reduce_to: int | None = None) -> np.ndarray:
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        _dicom_header(fp, name)
        ds = pydicom.dcmread(fp)
    except ImageReadError:
        raise
    except (InvalidDicomError, OSError, EOFError, ValueError, zlib.error) as exc:
        raise ImageReadError(f"{name}: not a readable DICOM file ({_reason(exc)})") from exc
    if "PixelData" not in ds:
        raise ImageReadError(f"{name}: DICOM file has no pixel data")
    try:
        with warnings.catch_warnings():  # compressed frames decoded by Pillow: its bomb check refuses, too
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            arr = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for undecodable pixel data
        if isinstance(exc, (Image.DecompressionBombWarning, Image.DecompressionBombError)):
            raise ImageTooLargeError(f"{name}: DICOM frame too large ({_reason(exc)})") from exc
        raise ImageReadError(f"{name}: cannot decode DICOM pixel data ({_reason(exc)})") from exc
    n_frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    samples = int(getattr(ds, "SamplesPerPixel", 1) or 1)
    if n_frames > 1:
        arr = arr[n_frames // 2]  # the middle frame of a multi-frame series
    if samples == 1:
        def luts(stored: np.ndarray) -> np.ndarray:
            out = apply_modality_lut(stored, ds)
            return apply_voi_lut(out, ds) if ("WindowCenter" in ds or "VOILUTSequence" in ds) else out

        value_range = None
        if reduce_to:  # shrink the stored integers; the range is the full image's, through the (monotonic) LUTs
            small = _shrink(arr, reduce_to)
            ends = np.asarray(luts(np.array([[arr.min(), arr.max()]], dtype=arr.dtype)), dtype=np.float32)
            arr = luts(small)
            value_range = (min(float(ends.min()), float(np.min(arr))), max(float(ends.max()), float(np.max(arr))))
        else:
            arr = luts(arr)
        out = _normalize_array(np.asarray(arr, dtype=np.float32), value_range)
        if getattr(ds, "PhotometricInterpretation", "") == "MONOCHROME1":
            out = 1.0 - out
        return out
    if getattr(ds, "PhotometricInterpretation", "RGB") != "RGB":
        from pydicom.pixels import convert_color_space

        arr = convert_color_space(arr, ds.PhotometricInterpretation, "RGB")
    return _shrink(np.asarray(arr), reduce_to)


def _is_dicom(head: bytes, name: str) -> bool:
    return head[128:132] == b"DICM" or Path(name).suffix.lower() in (".dcm", ".dicom")


def _to_tensor(a: np.ndarray, value_range: tuple[float, float] | None = None) -> torch.Tensor:
    a = a if a.dtype == np.float32 and a.max(initial=0) <= 1.0 else _normalize_array(a, value_range)
    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
    return t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1).contiguous()


def _decode(fp: str | io.BytesIO, head: bytes, name: str, reduce_to: int | None) -> torch.Tensor:
    if _is_dicom(head, name):
        return _to_tensor(_read_dicom(fp, name, reduce_to))
    return _to_tensor(*_read_pil(fp, name, reduce_to))


def read_image_bytes(data: bytes, name: str = "upload", reduce_to: int | None = None) -> torch.Tensor:
    """Decode an image or DICOM held in memory to float [C, H, W] in [0, 1] (C = 1 or 3); with
    ``reduce_to``, at a reduced size whose sides stay at least ``reduce_to`` (see the module's notes)."""
    if not data:
        raise ImageReadError(f"{name}: empty file")
    return _decode(io.BytesIO(data), data[:132], name, reduce_to)


def read_image(path: str | Path, reduce_to: int | None = None) -> torch.Tensor:
    """Read an image or DICOM file to float [C, H, W] in [0, 1] (C = 1 or 3); with ``reduce_to``, at a
    reduced size whose sides stay at least ``reduce_to`` (see the module's notes)."""
    p = Path(path)
    if not p.is_file():
        raise ImageReadError(f"{p}: file not found")
    if p.stat().st_size == 0:
        raise ImageReadError(f"{p}: empty file")
    with p.open("rb") as fh:
        head = fh.read(132)
    return _decode(str(p), head, str(p), reduce_to)
