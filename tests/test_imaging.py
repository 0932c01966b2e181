"""THE preprocessing handles every image mode and format, and rejects bad input with clear messages."""

from __future__ import annotations

import io
import os
import socket
import threading
import tracemalloc

import numpy as np
import pytest
from PIL import Image

from chestct.imaging.decode import decode_grayscale, to_grayscale
from chestct.imaging.errors import (
    CorruptImageError,
    ImageDecodeError,
    ImageTooLargeError,
    UnreadableFileError,
    UnsupportedImageError,
)
from chestct.imaging.files import DEFAULT_MAX_BYTES, read_image_file
from chestct.imaging.preprocess import preprocess_image
from chestct.imaging.transforms import BAND_PIXELS, apply_window, resize_square
from tests.conftest import save_image, textured_image

GRAY = textured_image(7, (90, 150))


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "I;16"])
def test_png_modes_decode_to_the_same_grayscale(tmp_path, mode):
    path = save_image(tmp_path / f"x_{mode.replace(';', '')}.png", GRAY, "PNG", mode)
    decoded = decode_grayscale(path)
    assert decoded.dtype == np.uint8 and decoded.shape == GRAY.shape
    tolerance = 1 if mode in ("L", "RGB", "RGBA", "I;16") else 8  # palette quantises colours
    assert np.abs(decoded.astype(int) - GRAY.astype(int)).max() <= tolerance


def test_jpeg_behind_a_png_name_is_read_by_content(tmp_path):
    path = save_image(tmp_path / "n7.png", GRAY, "JPEG", "RGB")
    assert Image.open(path).format == "JPEG"
    decoded = decode_grayscale(path)
    assert np.abs(decoded.astype(int) - GRAY.astype(int)).mean() < 3


def test_transparent_pixels_become_black(tmp_path):
    rgba = np.zeros((20, 20, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[:10, :, 3] = 255  # top half opaque, bottom half transparent
    path = tmp_path / "alpha.png"
    Image.fromarray(rgba, "RGBA").save(path)
    decoded = decode_grayscale(path)
    assert decoded[:10].min() == 200 and decoded[10:].max() == 0


def test_pipeline_output_shape_dtype_and_clahe(original_params, tmp_path):
    params = original_params.preprocess.model_copy(update={"image_size": 64})
    path = save_image(tmp_path / "a.png", GRAY, "PNG", "RGBA")
    out = preprocess_image(path, params)
    assert out.shape == (64, 64, 1) and out.dtype == np.uint8
    from_bytes = preprocess_image(path.read_bytes(), params)
    np.testing.assert_array_equal(out, from_bytes)
    no_clahe = params.model_copy(update={"clahe": params.clahe.model_copy(update={"enabled": False})})
    assert not np.array_equal(out, preprocess_image(path, no_clahe))


def test_resize_keeps_aspect_ratio_by_padding():
    wide = np.full((50, 100), 255, np.uint8)
    padded = resize_square(wide, 40, "pad")
    assert padded.shape == (40, 40)
    assert padded[:9].max() == 0 and padded[-9:].max() == 0  # black bars above and below
    assert padded[15:25].min() == 255
    stretched = resize_square(wide, 40, "stretch")
    assert stretched.min() == 255


def test_window_maps_linearly_and_clips():
    values = np.array([[0, 64, 128, 192, 255]], np.uint8)
    windowed = apply_window(values, center=128, width=128)
    np.testing.assert_array_equal(windowed, [[0, 0, 128, 255, 255]])


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "empty"),
        (b"this is a text file, not a scan", "not a recognised image"),
    ],
)
def test_bad_bytes_get_clear_errors(content, message):
    with pytest.raises(ImageDecodeError, match=message):
        decode_grayscale(content, name="upload.png")


def test_truncated_png_is_reported(tmp_path):
    buffer = io.BytesIO()
    Image.fromarray(GRAY).save(buffer, format="PNG")
    truncated = buffer.getvalue()[: len(buffer.getvalue()) // 2]
    with pytest.raises(ImageDecodeError, match="truncated or corrupt"):
        decode_grayscale(truncated, name="half.png")


def test_missing_file_and_pixel_limit(tmp_path):
    with pytest.raises(ImageDecodeError, match="file not found"):
        decode_grayscale(tmp_path / "missing.png")
    path = save_image(tmp_path / "big.png", GRAY)
    with pytest.raises(ImageDecodeError, match="exceeds the limit"):
        decode_grayscale(path, max_pixels=1000)


def image_bytes(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


RGB = Image.fromarray(np.stack([GRAY, np.roll(GRAY, 5, axis=1), 255 - GRAY], axis=-1))


@pytest.mark.parametrize(("name", "image", "fmt"), [
    ("lab.tif", RGB.convert("LAB"), "TIFF"),  # the case: once a 500 from convert("L")
    ("scan.bmp", RGB, "BMP"),
    ("scan.gif", RGB, "GIF"),
    ("scan.webp", RGB, "WEBP"),
    ("scan.eps", RGB, "EPS"),  # Pillow would hand an EPS to Ghostscript where installed
])
def test_formats_other_than_png_and_jpeg_are_refused_by_name(tmp_path, name, image, fmt):
    path = tmp_path / name
    path.write_bytes(image_bytes(image, fmt))
    with pytest.raises(UnsupportedImageError) as info:
        decode_grayscale(path)
    assert str(info.value) == (f"{path}: {fmt} content is not accepted (only PNG, JPEG or DICOM); "
                               "convert it to PNG")


def test_a_damaged_png_header_is_corrupt_not_unsupported():
    data = bytearray(image_bytes(Image.fromarray(GRAY), "PNG"))
    data[12:16] = b"XXXX"  # the IHDR chunk's type
    with pytest.raises(CorruptImageError, match=r"^bad\.png: the PNG header cannot be read"):
        decode_grayscale(bytes(data), name="bad.png")


def test_cmyk_jpeg_decodes_to_its_grey_levels():
    decoded = decode_grayscale(image_bytes(Image.fromarray(GRAY).convert("CMYK"), "JPEG"), name="cmyk.jpg")
    assert decoded.shape == GRAY.shape and np.abs(decoded.astype(int) - GRAY.astype(int)).mean() < 3


EVERY_MODE = ["1", "L", "P", "RGB", "RGBA", "LA", "PA", "CMYK", "YCbCr", "LAB", "HSV", "I", "I;16", "I;16L", "I;16B",
              "I;16N", "F"]


@pytest.mark.parametrize("mode", EVERY_MODE)
def test_every_pillow_mode_becomes_grayscale_of_the_image(mode):
    ramp = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (8, 1))  # 0..252 left to right
    if mode == "1":
        source = Image.fromarray(ramp).point(lambda v: 255 if v >= 128 else 0).convert("1")
    elif mode.startswith("I;16") or mode in ("I", "F"):
        source = Image.fromarray(ramp.astype(np.uint16) * 257).convert(mode)
    elif mode in ("P", "PA"):  # an adaptive palette: the default web palette dithers
        source = Image.fromarray(ramp).convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE).convert(mode)
    else:
        source = Image.fromarray(ramp).convert("RGB").convert(mode)
    gray = to_grayscale(source, "mode.png")
    assert gray.dtype == np.uint8 and gray.shape == ramp.shape
    # every mode keeps the ramp's order: darker on the left, brighter on the right
    assert (np.diff(gray.astype(int), axis=1) >= 0).all() and gray[:, -1].min() > gray[:, 0].max()


def test_a_mode_without_grayscale_is_refused_by_name():
    premultiplied = Image.new("La", (4, 3))  # Pillow cannot convert premultiplied luminance-alpha to anything
    with pytest.raises(UnsupportedImageError, match=r"^scan\.png: pixel mode La cannot be turned into grayscale"):
        to_grayscale(premultiplied, "scan.png")


def test_float_pixels_with_nan_are_corrupt():
    values = np.ones((4, 4), np.float32)
    values[1, 2] = np.nan
    with pytest.raises(CorruptImageError, match=r"^f\.tif: the pixel values include NaN"):
        to_grayscale(Image.fromarray(values), "f.tif")


def test_alpha_over_black_stays_within_one_grey_level_of_pillow_compositing():
    rgba = np.random.default_rng(3).integers(0, 256, (60, 70, 4), dtype=np.uint8)
    image = Image.fromarray(rgba, "RGBA")
    composited = Image.alpha_composite(Image.new("RGBA", image.size, (0, 0, 0, 255)), image).convert("L")
    gray = to_grayscale(image, "alpha.png")
    assert np.abs(gray.astype(int) - np.asarray(composited, dtype=int)).max() <= 1
    opaque = Image.fromarray(rgba[..., :3]).convert("RGBA")
    np.testing.assert_array_equal(to_grayscale(opaque, "opaque.png"), np.asarray(opaque.convert("L")))


def test_16_bit_stretch_is_within_one_grey_level_of_the_float64_formula(tmp_path):
    values = np.random.default_rng(1).integers(300, 60000, (1200, 1000), dtype=np.uint16)  # more than one band
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    low, high = float(values.min()), float(values.max())
    reference = np.round((values.astype(np.float64) - low) / (high - low) * 255.0).astype(int)
    difference = np.abs(decode_grayscale(path).astype(int) - reference)
    assert difference.max() <= 1 and (difference == 0).mean() > 0.99


def test_16_bit_decoding_allocates_no_full_size_float_arrays():
    side = 4000
    deep = np.tile(np.linspace(0, 65535, side).astype(np.uint16), (side, 1))
    data = image_bytes(Image.fromarray(deep), "PNG")
    tracemalloc.start()  # numpy's buffers are traced; Pillow's decoded image is not
    try:
        gray = decode_grayscale(data, name="deep.png")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert gray.shape == (side, side)
    # the uint8 result (16 MB) plus a few MB of band temporaries (24 MB measured), where one full-size float32
    # copy alone would be 64 MB and the float64 arithmetic this replaced several times 128 MB
    assert peak < side * side + 12 * BAND_PIXELS, f"peak {peak / 1e6:.1f} MB"


def test_window_in_bands_equals_the_whole_image_formula():
    values = np.random.default_rng(2).normal(-500, 600, (3000, 700)).astype(np.float32)  # two bands and a rest
    low, width = -1350.0, 1500.0
    whole = np.clip(np.round((values - np.float32(low)) * np.float32(255.0 / width)), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(apply_window(values, -600.0, width), whole)


# --- reading files: regular files only, bounded --------------------------------------------------------------


def decode_within(path, seconds: float = 10.0) -> BaseException | np.ndarray:
    """decode_grayscale(path) in a daemon thread, so a read that blocks fails the test instead of hanging it."""
    outcome: list = []

    def target():
        try:
            outcome.append(decode_grayscale(path))
        except BaseException as exc:  # noqa: BLE001  (handed to the test)
            outcome.append(exc)

    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(seconds)
    assert outcome, f"decoding {path} still blocked after {seconds} s"
    return outcome[0]


def test_a_fifo_is_refused_at_once_not_waited_on(tmp_path):
    fifo = tmp_path / "scan.png"
    os.mkfifo(fifo)  # opening it to read would wait for a writer forever
    error = decode_within(fifo)
    assert isinstance(error, UnreadableFileError)
    assert str(error) == f"{fifo}: is a FIFO (named pipe), not a regular file; copy the image into a regular file"


def test_devices_and_sockets_are_refused(tmp_path):
    error = decode_within("/dev/zero")  # a device that would stream zeros forever
    assert isinstance(error, UnreadableFileError) and str(error).startswith("/dev/zero: is a character device")
    sock_path = tmp_path / "s.png"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(sock_path))
        error = decode_within(sock_path)
    assert isinstance(error, UnreadableFileError) and str(error).startswith(f"{sock_path}: is a socket")


@pytest.mark.parametrize(("make", "message"), [
    (lambda tmp: tmp / "missing.png", "file not found; check the path"),
    (lambda tmp: tmp, "is a folder, not an image file"),
    (lambda tmp: save_image(tmp / "scan.png", GRAY) / "inner.png", "a part of the path is a file, not a folder"),
    (lambda tmp: tmp / ("n" * 300 + ".png"), "the file name or path is too long"),
])
def test_unreadable_paths_are_named_with_what_to_do(tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises(UnreadableFileError) as info:
        decode_grayscale(path)
    assert str(info.value).startswith(f"{path}: {message}")


def test_a_symlink_loop_is_named(tmp_path):
    first, second = tmp_path / "a.png", tmp_path / "b.png"
    first.symlink_to(second)
    second.symlink_to(first)
    with pytest.raises(UnreadableFileError, match="symlink loop") as info:
        decode_grayscale(first)
    assert str(info.value).startswith(f"{first}: ")
    target = save_image(tmp_path / "real.png", GRAY)
    (tmp_path / "link.png").symlink_to(target)  # a link to a regular file is read as that file
    np.testing.assert_array_equal(decode_grayscale(tmp_path / "link.png"), GRAY)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_permission_denied_is_named(tmp_path):
    path = save_image(tmp_path / "locked.png", GRAY)
    path.chmod(0)
    with pytest.raises(UnreadableFileError, match=r"locked\.png: permission denied; make the file readable"):
        decode_grayscale(path)


def test_reads_stop_at_the_byte_limit(tmp_path):
    path = save_image(tmp_path / "scan.png", GRAY)
    size = path.stat().st_size
    assert read_image_file(path, max_bytes=size) == path.read_bytes()
    with pytest.raises(ImageTooLargeError, match=rf"^{path}: the file is {size:,} bytes, over the limit of "
                                                 rf"{size - 1:,} bytes per image \(serve\.max_upload_mb\)"):
        decode_grayscale(path, max_bytes=size - 1)
    huge = tmp_path / "huge.png"
    with huge.open("wb") as handle:
        handle.truncate(DEFAULT_MAX_BYTES + 1)  # sparse: refused on its size, never read
    with pytest.raises(ImageTooLargeError, match="huge.png: the file is 20,000,001 bytes"):
        decode_grayscale(huge)
