"""THE preprocessing handles every image mode and format, and rejects bad input with clear messages."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from chestct.imaging.decode import decode_grayscale
from chestct.imaging.errors import ImageDecodeError
from chestct.imaging.preprocess import preprocess_image
from chestct.imaging.transforms import apply_window, resize_square
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
