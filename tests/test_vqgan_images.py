"""Image loading (JPG, PNG, DICOM) and LLM-CXR's preprocessing, against references written here."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGLSLossless, ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from vqgan_flax.images import (ImageLoadError, ImageTooSmallError, load_image, postprocess, postprocess_original,
                               preprocess)


def xray_like(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth uint8 image with structure at several scales (so resampling differences would show)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    smooth = 0.5 + 0.3 * np.sin(7 * xx + 3 * yy) * np.cos(5 * yy)
    return np.clip(255 * smooth + rng.normal(0, 12, (height, width)), 0, 255).astype(np.uint8)


def encode_cxr_all_recipe(path: Path, size: int) -> np.ndarray:
    """LLM-CXR's preprocessing re-derived from its description (SPEC §12) with PIL alone."""
    img = Image.open(path).convert("RGB")
    w, h = img.size
    scale = size / min(w, h)
    img = img.resize((round(w * scale), round(h * scale)), resample=Image.LANCZOS)
    w, h = img.size
    left, top = int((w - size + 1) * 0.5), int((h - size + 1) * 0.5)  # torchvision 0.8.1 center_crop
    tensor = np.array(img.crop((left, top, left + size, top + size))).astype(np.float32) / 255.0  # ToTensor
    return 2.0 * tensor - 1.0


@pytest.mark.parametrize("height, width, suffix", [
    (300, 451, ".jpg"),  # long side 385 after resizing: odd margin, where floor and round crops differ
    (451, 300, ".png"),
    (256, 301, ".jpg"),  # no scaling of the short side
    (700, 512, ".png"),  # downscaling, 350 -> margin 94
    (257, 257, ".png"),
])
def test_preprocess_matches_reference_recipe(tmp_path, height, width, suffix):
    path = tmp_path / f"img{suffix}"
    Image.fromarray(xray_like(height, width)).save(path, quality=95)
    ours = preprocess(load_image(path), size=256)
    reference = encode_cxr_all_recipe(path, 256)
    assert ours.dtype == np.float32 and ours.shape == (256, 256, 3)
    np.testing.assert_array_equal(ours, reference)


def test_preprocess_rgb_matches_reference_recipe(tmp_path):
    rgb = np.stack([xray_like(320, 280, seed) for seed in range(3)], axis=-1)
    path = tmp_path / "rgb.png"
    Image.fromarray(rgb).save(path)
    np.testing.assert_array_equal(preprocess(load_image(path), size=256), encode_cxr_all_recipe(path, 256))


def test_png_modes_drop_alpha_and_keep_16_bits(tmp_path):
    gray = xray_like(40, 60)
    alpha = np.full_like(gray, 7)
    rgb = np.stack([gray, 255 - gray, gray // 2], axis=-1)
    Image.fromarray(gray).save(tmp_path / "l.png")
    Image.fromarray(np.stack([gray, alpha], -1)).save(tmp_path / "la.png")
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(np.concatenate([rgb, alpha[..., None]], -1)).save(tmp_path / "rgba.png")
    wide = gray.astype(np.uint16) * 257 + 3  # 16-bit values that 8 bits cannot hold
    Image.fromarray(wide).save(tmp_path / "sixteen.png")

    assert Image.open(tmp_path / "la.png").mode == "LA" and Image.open(tmp_path / "sixteen.png").mode.startswith("I")
    for name, expected in [("l", gray), ("la", gray), ("rgb", rgb), ("rgba", rgb), ("sixteen", wide)]:
        loaded = load_image(tmp_path / f"{name}.png")
        assert loaded.dtype == expected.dtype, name
        np.testing.assert_array_equal(loaded, expected, err_msg=name)


def test_sixteen_bit_png_reduces_to_eight_bits_by_rounding_x_over_257(tmp_path):
    gray = xray_like(256, 280)
    wide = np.clip(gray.astype(np.int32) * 257 + np.random.default_rng(1).integers(-128, 129, gray.shape), 0, 65535)
    Image.fromarray(wide.astype(np.uint16)).save(tmp_path / "sixteen.png")
    Image.fromarray(gray).save(tmp_path / "eight.png")
    np.testing.assert_array_equal(preprocess(load_image(tmp_path / "sixteen.png")),
                                  preprocess(load_image(tmp_path / "eight.png")))


def write_dicom(path: Path, pixels: np.ndarray, photometric: str, *, syntax=ExplicitVRLittleEndian,
                pixel_data: bytes | None = None, with_pixels: bool = True, **elements) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    for key, value in elements.items():
        setattr(ds, key, value)
    if with_pixels:
        ds.PixelData = pixel_data if pixel_data is not None else pixels.astype(np.uint16).tobytes()
        if pixel_data is not None:
            ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture
def twelve_bit() -> np.ndarray:
    """12-bit detector values: high = more X-ray attenuation in MONOCHROME2 terms."""
    return (xray_like(48, 40).astype(np.int64) * 4000 // 255 + 50).astype(np.uint16)


def test_dicom_monochrome1_and_2_give_the_same_picture(tmp_path, twelve_bit):
    mono2 = write_dicom(tmp_path / "mono2.dcm", twelve_bit, "MONOCHROME2")
    mono1 = write_dicom(tmp_path / "mono1.dcm", 4095 - twelve_bit, "MONOCHROME1")  # same film, inverted storage
    p = twelve_bit.astype(np.float64)
    mimic = np.floor((p - p.min()) / (p.max() - p.min()) * 255).astype(np.uint8)  # MIMIC-CXR-JPG's normalisation
    for mode in ("mimic_jpg", "voi"):
        np.testing.assert_array_equal(load_image(mono2, dicom_mode=mode), mimic, err_msg=mode)
        np.testing.assert_array_equal(load_image(mono1, dicom_mode=mode), mimic, err_msg=mode)


def test_dicom_voi_applies_rescale_and_window(tmp_path, twelve_bit):
    center, width = 1500.0, 1200.0
    path = write_dicom(tmp_path / "window.dcm", twelve_bit, "MONOCHROME2", RescaleSlope=2, RescaleIntercept=-100,
                       WindowCenter=center, WindowWidth=width)
    hu = twelve_bit.astype(np.float64) * 2 - 100
    # DICOM PS3.3 C.11.2.1.2.1 (LINEAR) onto the output range [0, 2·4095 - 100] ... then min-max to 8 bits
    lo, hi = -100.0, 4095 * 2 - 100.0
    y = ((hu - (center - 0.5)) / (width - 1) + 0.5) * (hi - lo) + lo
    y = np.where(hu <= center - 0.5 - (width - 1) / 2, lo, np.where(hu > center - 0.5 + (width - 1) / 2, hi, y))
    expected = np.floor((y - y.min()) / (y.max() - y.min()) * 255).astype(np.uint8)
    np.testing.assert_array_equal(load_image(path, dicom_mode="voi"), expected)
    assert not np.array_equal(load_image(path, dicom_mode="mimic_jpg"), expected)


def test_truncated_jpeg(tmp_path):
    path = tmp_path / "cut.jpg"
    Image.fromarray(xray_like(300, 300)).save(path, quality=90)
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(ImageLoadError, match="cut.jpg: not a readable image.*truncated") as err:
        load_image(path)
    assert err.value.path == path


def test_text_file_named_png(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("FINDINGS: none\n")
    with pytest.raises(ImageLoadError, match="notes.png: not a readable image"):
        load_image(path)


def test_dicom_without_pixel_data(tmp_path, twelve_bit):
    path = write_dicom(tmp_path / "nopixels.dcm", twelve_bit, "MONOCHROME2", with_pixels=False)
    with pytest.raises(ImageLoadError, match="nopixels.dcm: DICOM file has no pixel data"):
        load_image(path)


def test_compressed_dicom_without_decoder_names_the_packages(tmp_path, twelve_bit):
    path = write_dicom(tmp_path / "jpegls.dcm", twelve_bit, "MONOCHROME2", syntax=JPEGLSLossless,
                       pixel_data=encapsulate([b"\xff\xd8\xff\xf7 not decodable here \xff\xd9"]))
    with pytest.raises(ImageLoadError, match=r"jpegls.dcm: cannot decode compressed pixel data .*JPEG-LS") as err:
        load_image(path)
    assert "pylibjpeg" in err.value.reason and "gdcm" in err.value.reason


def test_malformed_dicom_is_an_image_load_error(tmp_path, twelve_bit):
    """One bad file must be reported by name, not abort a dataset build with pydicom's own exception."""
    window = write_dicom(tmp_path / "window.dcm", twelve_bit, "MONOCHROME2", VOILUTFunction="SIGMOID",
                         WindowCenter=1, WindowWidth=0)
    with pytest.raises(ImageLoadError, match="window.dcm: malformed DICOM: .*Window Width"):
        load_image(window, dicom_mode="voi")
    short = write_dicom(tmp_path / "syntax.dcm", twelve_bit, "MONOCHROME2", pixel_data=twelve_bit.tobytes()[:-2])
    # a UID of the same length that is not a transfer syntax: pydicom's `is_compressed` raises on it
    short.write_bytes(short.read_bytes().replace(str(ExplicitVRLittleEndian).encode(), b"1.2.840.10008.1.2.9"))
    with pytest.raises(ImageLoadError, match=r"syntax.dcm: cannot decode pixel data.*is not a transfer syntax"):
        load_image(short)


def test_missing_file(tmp_path):
    with pytest.raises(ImageLoadError, match="absent.jpg: cannot open"):
        load_image(tmp_path / "absent.jpg")


def test_image_too_small_unless_upscaling_is_allowed():
    small = xray_like(200, 300)
    with pytest.raises(ImageTooSmallError, match="200x300: short side 200 < 256"):
        preprocess(small)
    upscaled = preprocess(small, allow_upscale=True)
    assert upscaled.shape == (256, 256, 3) and -1 <= upscaled.min() < upscaled.max() <= 1


def test_postprocess():
    x = np.array([[[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [-3.0, 2.0, 0.5], [0.2, 0.4, 0.9]]],
                 np.float32)
    expected = [np.round(np.mean((np.clip(px, -1, 1) + 1) / 2 * 255)) for px in x[0]]
    out = postprocess(x)
    assert out.dtype == np.uint8 and out.shape == (1, 5)
    np.testing.assert_array_equal(out[0], expected)
    assert out[0, 0] == 0 and out[0, 1] == 255
    # LLM-CXR's JPEGs (SPEC §12): 3 channels, matplotlib's x·255 truncated
    original = postprocess_original(np.array([[[0.999] * 3, [-1.0, 0.0, 1.0]]], np.float32))
    assert original.dtype == np.uint8 and original.tolist() == [[[254] * 3, [0, 127, 255]]]
