"""Reading chest X-ray files and LLM-CXR's image pre/postprocessing (SPEC §12).

`load_image` returns the stored pixels without resampling: uint8 for 8-bit sources and DICOM, uint16 for
16-bit PNG; (H, W) for grayscale, (H, W, 3) for colour (alpha is dropped, palettes are expanded).

DICOM (grayscale, single frame) has two documented modes, both ending in 8 bits:
- `mimic_jpg`: how MIMIC-CXR-JPG was made from MIMIC-CXR, as we read its paper: stored pixel values,
  inverted for MONOCHROME1 (x -> max - x), shifted to start at 0, divided by their maximum, ×255 and
  truncated to uint8. No modality or VOI LUT. (The paper also mentions histogram equalisation; that is
  not applied here, so DICOM-derived codes can differ from codes of the released JPGs.)
- `voi`: the display pipeline of the DICOM standard: modality LUT (rescale slope/intercept), then the VOI
  LUT or window (pydicom's `apply_voi_lut`), then MONOCHROME1 inversion and the same min-max to uint8.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import pydicom

DICOM_MODES = ("mimic_jpg", "voi")
# Recorded in every codes directory: codes made with another recipe are not interchangeable.
RECIPE = {"name": "llmcxr-pil-lanczos-centercrop", "version": 1}

_DICOM_SUFFIXES = {".dcm", ".dicom"}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", *sorted(_DICOM_SUFFIXES))
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}
_GRAY_MODES = {"1", "L", "LA", "La"}


def image_files(directory: Path) -> list[Path]:
    """The chest X-ray files (IMAGE_SUFFIXES, any case) under `directory`, recursively, sorted."""
    return sorted(p for p in Path(directory).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def png_bytes(pixels: np.ndarray) -> bytes:
    """A lossless PNG of uint8 pixels (H, W), (H, W, 1) or (H, W, 3)."""
    buffer = io.BytesIO()
    Image.fromarray(pixels[..., 0] if pixels.ndim == 3 and pixels.shape[-1] == 1 else pixels).save(buffer,
                                                                                                   format="PNG")
    return buffer.getvalue()


class ImageLoadError(Exception):
    """A file that cannot be read as an image; `path` and `reason` are kept for error reports."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.reason = reason


class ImageTooSmallError(ValueError):
    """The short side is below the model resolution and upscaling was not allowed."""


def load_image(path: str | Path, dicom_mode: str = "mimic_jpg") -> np.ndarray:
    """Pixels of a JPG, PNG or DICOM file (see the module docstring for dtypes, shapes and DICOM modes)."""
    if dicom_mode not in DICOM_MODES:
        raise ValueError(f"dicom_mode must be one of {DICOM_MODES}, got {dicom_mode!r}")
    path = Path(path)
    try:
        with path.open("rb") as f:
            head = f.read(132)
    except OSError as err:
        raise ImageLoadError(path, f"cannot open: {err}") from err
    if path.suffix.lower() in _DICOM_SUFFIXES or head[128:132] == b"DICM":
        return _load_dicom(path, dicom_mode)
    return _load_pil(path)


def _load_pil(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as image:
            image.load()  # decode now: truncated files fail here, not later
            return _pil_pixels(image, path)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ImageLoadError(path, f"not a readable image: {err}") from err


def _pil_pixels(image: Image.Image, path: Path) -> np.ndarray:
    if image.mode in _SIXTEEN_BIT_MODES:
        pixels = np.asarray(image)
        if pixels.min() < 0 or pixels.max() > 65535:
            raise ImageLoadError(path, f"{image.mode} pixel values outside 0..65535")
        return pixels.astype(np.uint16)
    if image.mode in _GRAY_MODES:
        return np.asarray(image.convert("L"))
    if image.mode == "F":
        raise ImageLoadError(path, "floating-point images are not supported")
    return np.asarray(image.convert("RGB"))


def _load_dicom(path: Path, mode: str) -> np.ndarray:
    try:  # pydicom is needed only for DICOM input (the `data` extra)
        import pydicom
    except ImportError as err:
        raise ImageLoadError(path, "reading DICOM needs pydicom: pip install pydicom") from err
    try:
        ds = pydicom.dcmread(path)
    except Exception as err:  # malformed headers raise many types (NotImplementedError, BytesLengthException, ...)
        raise ImageLoadError(path, f"not a readable DICOM file: {err}") from err
    try:
        return _dicom_pixels(ds, path, mode)
    except ImageLoadError:
        raise
    except Exception as err:  # a malformed element or LUT; one bad file must not stop a dataset build
        raise ImageLoadError(path, f"malformed DICOM: {type(err).__name__}: {err}") from err


def _dicom_pixels(ds: pydicom.Dataset, path: Path, mode: str) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    if "PixelData" not in ds:
        raise ImageLoadError(path, "DICOM file has no pixel data (PixelData element missing)")
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ImageLoadError(path, f"PhotometricInterpretation {photometric!r} is not MONOCHROME1/MONOCHROME2")
    if int(ds.get("NumberOfFrames", 1) or 1) != 1:
        raise ImageLoadError(path, f"multi-frame DICOM ({ds.NumberOfFrames} frames) is not supported")
    try:
        pixels = ds.pixel_array
    except Exception as err:  # pydicom's decoders raise many types; all mean "cannot decode this file"
        raise ImageLoadError(path, _decode_failure(ds, err)) from err
    if mode == "voi":
        pixels = apply_voi_lut(apply_modality_lut(pixels, ds), ds)
    return _min_max_uint8(pixels, invert=photometric == "MONOCHROME1")


def _decode_failure(ds: pydicom.Dataset, err: Exception) -> str:
    file_meta = getattr(ds, "file_meta", None)
    syntax = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    try:
        compressed = syntax is not None and syntax.is_compressed
    except ValueError:  # a UID that is not a transfer syntax at all
        return f"cannot decode pixel data: {err} (TransferSyntaxUID {syntax} is not a transfer syntax)"
    if compressed:
        return (f"cannot decode compressed pixel data ({syntax.name}): {err}. Install a pydicom decoder plugin: "
                "pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg (or python-gdcm)")
    return f"cannot decode pixel data: {err}"


def _min_max_uint8(pixels: np.ndarray, invert: bool) -> np.ndarray:
    """MONOCHROME1 inversion, shift to 0, divide by the maximum, ×255, truncate (MIMIC-CXR-JPG's normalisation)."""
    x = np.asarray(pixels, dtype=np.float64)
    if invert:
        x = x.max() - x
    x = x - x.min()
    peak = x.max()
    if peak > 0:
        x = x / peak * 255.0
    return np.floor(x).astype(np.uint8)


def to_pil(image: np.ndarray) -> Image.Image:
    """uint8 (H, W) or (H, W, 3) as a PIL image; uint16 becomes 8-bit by round(x / 257) first.

    round(x/257) inverts the usual 8->16-bit expansion v·257 exactly and uses the full 16-bit range, with
    no windowing: 16-bit files holding e.g. 12-bit data come out dark, so window them beforehand.
    """
    if image.dtype == np.uint16:
        image = ((image.astype(np.uint32) + 128) // 257).astype(np.uint8)
    if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
        raise ValueError(f"expected uint8/uint16 (H, W) or (H, W, 3), got {image.dtype} {image.shape}")
    return Image.fromarray(image)


def preprocess(image: np.ndarray, size: int = 256, allow_upscale: bool = False) -> np.ndarray:
    """LLM-CXR's encode_cxr_all.py recipe: float32 (size, size, 3) in [-1, 1].

    PIL convert("RGB"); scale the short side to `size` (new (H, W) = Python round of r·H, r·W) with PIL
    LANCZOS; centre crop with torchvision 0.8.1's offset floor((L - size + 1) / 2); /255; 2x - 1.
    """
    pil = to_pil(image).convert("RGB")
    width, height = pil.size
    short = min(width, height)
    if short < size and not allow_upscale:
        raise ImageTooSmallError(f"image is {height}x{width}: short side {short} < {size} "
                                 "(the original refuses to upscale such images too)")
    ratio = size / short
    new_h, new_w = round(ratio * height), round(ratio * width)
    pil = pil.resize((new_w, new_h), Image.Resampling.LANCZOS)
    top, left = (new_h - size + 1) // 2, (new_w - size + 1) // 2
    pixels = np.asarray(pil.crop((left, top, left + size, top + size)), dtype=np.float32)
    return pixels / np.float32(255) * np.float32(2) - np.float32(1)


def postprocess(images: np.ndarray) -> np.ndarray:
    """Decoder output in [-1, 1], (..., H, W, 3) -> grayscale uint8 (..., H, W): our PNGs.

    clip to [-1, 1], (x + 1) / 2, ×255, mean over channels, round half to even. A chest X-ray is grayscale, so
    one channel loses nothing the decoder meant; `postprocess_original` is what LLM-CXR saved.
    """
    x = (np.clip(np.asarray(images, dtype=np.float32), -1.0, 1.0) + 1.0) / 2.0 * 255.0
    return np.round(x.mean(axis=-1)).astype(np.uint8)


def postprocess_original(images: np.ndarray) -> np.ndarray:
    """Decoder output in [-1, 1], (..., H, W, 3) -> uint8 (..., H, W, 3) as LLM-CXR saved its JPEGs (SPEC §12):
    clip, (x + 1) / 2, then matplotlib `imsave`'s float conversion, x·255 truncated (unverified, as in SPEC)."""
    x = (np.clip(np.asarray(images, dtype=np.float32), -1.0, 1.0) + 1.0) / 2.0
    return (x * np.float32(255)).astype(np.uint8)
