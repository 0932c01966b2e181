"""DICOM input: detection by content, HU from rescale, lung window, and refusals with clear messages."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGLosslessSV1

from chestct.imaging.dicom import dicom_to_grayscale, looks_like_dicom
from chestct.imaging.errors import CorruptImageError, ImageTooLargeError, UnsupportedImageError
from tests.dicom_factory import make_ct_dicom, phantom_to_dicom

CENTER, WIDTH = -600.0, 1500.0  # params.yaml serve.dicom_window
MAX_PIXELS = 1_000_000


def decode(data: bytes, name: str = "slice.dcm", max_pixels: int = MAX_PIXELS) -> np.ndarray:
    return dicom_to_grayscale(data, name, CENTER, WIDTH, max_pixels)


def rewrite(data: bytes, **changes) -> bytes:
    """Re-save a DICOM with some elements changed (None deletes the element)."""
    ds = pydicom.dcmread(io.BytesIO(data))
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_detection_is_by_content():
    assert looks_like_dicom(make_ct_dicom(np.zeros((2, 2))))
    ok, png = cv2.imencode(".png", np.zeros((4, 4), dtype=np.uint8))
    assert ok and not looks_like_dicom(png.tobytes())
    assert not looks_like_dicom(b"")
    assert not looks_like_dicom(b"\0" * 130 + b"DI")
    assert not looks_like_dicom(b"DICM" + b"\0" * 200)  # the magic must follow the 128-byte preamble


def test_hu_from_slope_and_intercept_then_lung_window():
    # window [-1350, 150] HU -> 0..255, i.e. 0.17 grey levels per HU; values chosen away from .5 rounding ties
    hu = np.array([[-2000, -1350, -1250, -1050],
                   [-1002, -998, -450, 50],
                   [98, 150, 152, 3000]], dtype=np.float64)
    expected = np.array([[0, 0, 17, 51],
                         [59, 60, 153, 238],
                         [246, 255, 255, 255]], dtype=np.uint8)
    data = make_ct_dicom(hu, slope=2.0, intercept=-1000.0)
    stored = pydicom.dcmread(io.BytesIO(data))
    assert float(stored.RescaleSlope) == 2.0 and float(stored.RescaleIntercept) == -1000.0
    np.testing.assert_array_equal(stored.pixel_array, (hu + 1000) / 2)  # the file really holds rescaled values
    gray = decode(data)
    assert gray.dtype == np.uint8 and gray.shape == (3, 4)
    np.testing.assert_array_equal(gray, expected)


def test_missing_rescale_means_slope_1_intercept_0():
    hu = np.array([[-1250, -1050], [-450, 50]], dtype=np.float64)
    data = rewrite(make_ct_dicom(hu, intercept=0.0), RescaleSlope=None, RescaleIntercept=None, RescaleType=None)
    assert "RescaleSlope" not in pydicom.dcmread(io.BytesIO(data))
    np.testing.assert_array_equal(decode(data), [[17, 51], [153, 238]])


def test_monochrome1_is_inverted_after_windowing():
    hu = np.linspace(-1400, 200, 24).reshape(4, 6)
    normal = decode(make_ct_dicom(hu, photometric="MONOCHROME2"))
    inverted = decode(make_ct_dicom(hu, photometric="MONOCHROME1"))
    assert normal.min() == 0 and normal.max() == 255
    np.testing.assert_array_equal(inverted, 255 - normal)


def test_no_pixel_data_is_refused_by_name():
    data = make_ct_dicom(np.zeros((4, 4)), with_pixels=False)
    with pytest.raises(CorruptImageError, match="no pixel data") as info:
        decode(data, name="report.dcm")
    assert str(info.value).startswith("report.dcm: ")


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about the cut-off values it reads
def test_every_truncation_is_a_corrupt_image_error():
    data = make_ct_dicom(np.full((6, 5), -800.0))
    for cut in range(132, len(data)):
        with pytest.raises(CorruptImageError) as info:
            decode(data[:cut], name="cut.dcm")
        assert str(info.value).startswith("cut.dcm: ")
    pixel_start = len(data) - 6 * 5 * 2
    with pytest.raises(CorruptImageError, match="pixel data is less than expected"):
        decode(data[:-7], name="cut.dcm")
    with pytest.raises(CorruptImageError, match="no pixel data: it stops in the middle of an element"):
        decode(data[:pixel_start - 9], name="cut.dcm")  # inside the 12-byte Pixel Data element header


def test_garbage_after_the_magic_is_corrupt():
    with pytest.raises(CorruptImageError, match="^junk.dcm: "):
        decode(b"\0" * 128 + b"DICM" + bytes(range(256)) * 4, name="junk.dcm")


def test_pixel_limit_is_checked_before_decoding():
    data = make_ct_dicom(np.zeros((4, 5)))
    assert decode(data, max_pixels=20).shape == (4, 5)
    with pytest.raises(ImageTooLargeError, match=r"^big.dcm: 5x4 px exceeds the limit of 19 pixels"):
        decode(data, name="big.dcm", max_pixels=19)
    # a header claiming a huge image is refused on its size, without touching the (too short) pixel data
    with pytest.raises(ImageTooLargeError, match="50000x40000 px"):
        decode(rewrite(data, Rows=40000, Columns=50000), name="big.dcm")


def test_multi_frame_is_refused():
    data = make_ct_dicom(np.zeros((4, 4)))
    ds = pydicom.dcmread(io.BytesIO(data))
    data = rewrite(data, NumberOfFrames=2, PixelData=ds.PixelData * 2)
    with pytest.raises(UnsupportedImageError, match="multi-frame DICOM .*export a single slice"):
        decode(data)


def test_colour_is_refused():
    data = rewrite(make_ct_dicom(np.zeros((4, 4))), PhotometricInterpretation="RGB", SamplesPerPixel=3)
    with pytest.raises(UnsupportedImageError, match="colour DICOM .*RGB"):
        decode(data)


def test_compression_without_a_decoder_is_corrupt_with_a_hint():
    data = make_ct_dicom(np.zeros((4, 4)))
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
    ds.PixelData = encapsulate([b"\xff\xd8not really a jpeg\xff\xd9"])
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    with pytest.raises(CorruptImageError, match="export it uncompressed"):
        decode(buffer.getvalue())


def test_phantom_round_trip_recovers_the_grey_levels():
    rng = np.random.default_rng(0)
    gray = np.concatenate([np.arange(256, dtype=np.uint8).reshape(16, 16),
                           rng.integers(0, 256, (16, 16), dtype=np.uint8)])
    data = phantom_to_dicom(gray, center=CENTER, width=WIDTH)
    assert looks_like_dicom(data)
    back = decode(data)
    assert back.shape == gray.shape
    assert np.abs(back.astype(int) - gray.astype(int)).max() <= 1


def test_decoding_a_dicom_without_a_window_is_refused_not_guessed():
    from chestct.imaging.decode import decode_grayscale

    with pytest.raises(UnsupportedImageError, match=r"slice\.dcm: DICOM input here needs a Hounsfield window"):
        decode_grayscale(make_ct_dicom(np.zeros((8, 8))), "slice.dcm")


@pytest.mark.parametrize("slope", [1e308, -1e308, 1e30, 10.0])
def test_hounsfield_values_outside_the_sane_range_are_corrupt(slope):
    # a ramp of stored values that is fine with slope 1 (-1024..976 HU) and implausible with these slopes
    data = rewrite(make_ct_dicom(np.linspace(-1024, 976, 12).reshape(3, 4)), RescaleSlope=slope)
    with pytest.raises(CorruptImageError) as info:
        decode(data, name="bright.dcm")
    message = str(info.value)
    assert message.startswith("bright.dcm: Hounsfield values ")
    assert "outside the sane CT range -3100..4000 HU" in message and f"slope {slope:g}" in message
    stored = pydicom.dcmread(io.BytesIO(data)).pixel_array
    low, high = sorted((float(stored.min()) * slope - 1024, float(stored.max()) * slope - 1024))
    assert f"{low:g}..{high:g}" in message


def test_the_sane_range_is_inclusive():
    data = make_ct_dicom(np.array([[-3100.0, 0.0], [1000.0, 4000.0]]))
    np.testing.assert_array_equal(decode(data), [[0, 230], [255, 255]])
    with pytest.raises(CorruptImageError, match=r"-3101\.\.4000 after rescale"):
        decode(make_ct_dicom(np.array([[-3101.0, 0.0], [1000.0, 4000.0]])))
    with pytest.raises(CorruptImageError, match=r"-1024\.\.4001 after rescale"):
        decode(make_ct_dicom(np.array([[-1024.0, 0.0], [1000.0, 4001.0]])))


def test_padding_outside_the_scan_is_not_held_to_the_sane_range():
    # stored -2000 with intercept -1024 is -3024 HU: what several scanners write outside the scanned circle.
    # Unmarked it is within the range's allowance; a fill below the range needs marking as padding.
    hu = np.array([[-3024.0, -1002.0], [0.0, -3024.0]])
    np.testing.assert_array_equal(decode(make_ct_dicom(hu)), [[0, 59], [230, 0]])
    too_low = np.array([[-3500.0, -1002.0], [0.0, -3500.0]])
    with pytest.raises(CorruptImageError, match=r"-3500\.\.0 after rescale"):
        decode(make_ct_dicom(too_low))
    padded = make_ct_dicom(too_low, padding_hu=-3500.0)
    assert pydicom.dcmread(io.BytesIO(padded)).PixelPaddingValue == -2476
    np.testing.assert_array_equal(decode(padded), [[0, 59], [230, 0]])
    all_padding = make_ct_dicom(np.full((2, 2), -3500.0), padding_hu=-3500.0)
    with pytest.raises(CorruptImageError, match="every pixel is padding"):
        decode(all_padding, name="empty.dcm")


def test_large_slices_are_windowed_band_by_band_like_the_whole_formula():
    hu = np.round(np.random.default_rng(4).uniform(-1500, 1500, (1500, 900)))  # more than one band of rows
    gray = decode(make_ct_dicom(hu, slope=1.0, intercept=-1024.0), max_pixels=2_000_000)
    low = CENTER - WIDTH / 2
    whole = np.clip(np.round((hu.astype(np.float32) - np.float32(low)) * np.float32(255 / WIDTH)), 0, 255)
    np.testing.assert_array_equal(gray, whole.astype(np.uint8))


def with_modality_lut(data: bytes, first_stored: int, table: list[int]) -> bytes:
    """The slice with a Modality LUT (stored value -> HU table) in place of Rescale Slope/Intercept."""
    ds = pydicom.dcmread(io.BytesIO(data))
    item = pydicom.Dataset()
    item.add_new(0x00283002, "US", [len(table), first_stored, 16])  # LUT Descriptor
    item.ModalityLUTType = "HU"
    item.add_new(0x00283006, "US", table)  # LUT Data
    ds.ModalityLUTSequence = pydicom.Sequence([item])
    del ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_a_modality_lut_gives_the_hounsfield_values_and_is_range_checked():
    data = make_ct_dicom(np.array([[-1024.0, -1023.0], [-1022.0, -1021.0]]))  # stored 0, 1, 2, 3
    soft_tissue = dicom_to_grayscale(with_modality_lut(data, 0, [0, 50, 100, 150]), "lut.dcm", 75.0, 150.0, 100)
    np.testing.assert_array_equal(soft_tissue, [[0, 85], [170, 255]])
    with pytest.raises(CorruptImageError, match=r"^lut\.dcm: Hounsfield values 0\.\.6000 after the modality LUT"):
        decode(with_modality_lut(data, 0, [0, 500, 1000, 6000]), name="lut.dcm")
