"""decode_image on the awkward-input corpus and on every Pillow mode we promise to handle."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
from PIL import Image, ImageFile

from m2f.pipeline.decode import DecodeError, decode_image
from tests.corpus import UNICODE_KEY, build_corpus, png_header_only

CORPUS = build_corpus()


def _encode(image: Image.Image, fmt: str = "PNG", **params) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **params)
    return buf.getvalue()


@pytest.mark.parametrize("rel", sorted(CORPUS.expected))
def test_corpus_file_gives_expected_outcome(rel: str) -> None:
    expected = CORPUS.expected[rel]
    data = CORPUS.files[rel]
    if expected.ok:
        rgb = decode_image(data)
        width, height = expected.size
        assert rgb.shape == (height, width, 3)
        assert rgb.dtype == np.uint8
        assert rgb.flags.c_contiguous and rgb.flags.writeable
    else:
        with pytest.raises(DecodeError) as info:
            decode_image(data)
        assert info.value.reason.startswith(expected.reason), info.value.reason
        assert str(info.value) == info.value.reason


def test_decode_error_is_a_value_error() -> None:
    assert issubclass(DecodeError, ValueError)


def test_exif_orientation_makes_the_image_upright() -> None:
    rgb = decode_image(CORPUS.files["exif_rotated.jpg"])  # stored 40x20, left red / right blue
    assert rgb.shape == (40, 20, 3)
    top, bottom = rgb[5, 10].astype(int), rgb[35, 10].astype(int)
    assert top[0] > 200 and top[2] < 60  # red on top
    assert bottom[2] > 200 and bottom[0] < 60  # blue below


def test_first_frame_of_animated_gif_and_multipage_tiff() -> None:
    gif = decode_image(CORPUS.files["animated.gif"])
    assert tuple(gif[0, 0]) == (255, 0, 0)
    tiff = decode_image(CORPUS.files["multipage.tiff"])
    assert tiff.shape == (16, 24, 3) and tuple(tiff[0, 0]) == (0, 255, 0)


def test_cmyk_becomes_rgb() -> None:
    rgb = decode_image(CORPUS.files["cmyk.jpg"]).astype(int)
    assert np.all(rgb[..., 0] > 230) and np.all(rgb[..., 1:] < 30)


def test_16_bit_grey_is_scaled_not_clipped() -> None:
    rgb = decode_image(CORPUS.files["grey16.png"])  # ramp 0..65535 along x
    row = rgb[0, :, 0].astype(int)
    assert row[0] == 0 and row[-1] == 255
    assert np.all(np.diff(row) >= 0)
    assert abs(row[32] - round(32 / 63 * 255)) <= 1  # mid-ramp is mid-grey, not saturated
    assert np.array_equal(rgb[..., 0], rgb[..., 2])


def test_palette_transparency_is_composited_over_white() -> None:
    rgb = decode_image(CORPUS.files["palette_transparent.png"])
    assert np.all(rgb[:, :8] == 255)  # transparent index -> white
    assert np.all(rgb[:, 8:] == (255, 0, 0))


def test_unicode_named_file_decodes() -> None:
    assert decode_image(CORPUS.files[UNICODE_KEY]).shape == (12, 16, 3)


def test_rgba_and_la_are_composited_over_white() -> None:
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)  # opaque red
    rgba[0, 1] = (0, 0, 0, 0)  # fully transparent -> white
    rgba[1, 0] = (0, 0, 0, 128)  # half-transparent black -> mid grey
    out = decode_image(_encode(Image.fromarray(rgba, "RGBA")))
    assert tuple(out[0, 0]) == (255, 0, 0)
    assert tuple(out[0, 1]) == (255, 255, 255)
    assert tuple(out[1, 0]) == (127, 127, 127)
    la = Image.fromarray(np.array([[[0, 0], [50, 255]]], np.uint8), "LA")
    assert decode_image(_encode(la)).tolist() == [[[255, 255, 255], [50, 50, 50]]]


def test_one_bit_and_grey_modes() -> None:
    bits = Image.fromarray(np.array([[True, False]]))
    assert bits.mode == "1"
    assert decode_image(_encode(bits)).tolist() == [[[255, 255, 255], [0, 0, 0]]]
    grey = Image.fromarray(np.array([[0, 77, 255]], np.uint8))
    assert decode_image(_encode(grey))[0, :, 1].tolist() == [0, 77, 255]


def _decode_mode(image: Image.Image) -> np.ndarray:
    """Decode an image in a mode no common file format keeps, via TIFF (which stores I and F)."""
    data = _encode(image, "TIFF")
    assert Image.open(io.BytesIO(data)).mode == image.mode
    return decode_image(data)[..., 0]


def test_big_endian_16_bit_is_scaled() -> None:
    values = np.array([[0, 257, 32896, 65535]], np.uint16)
    image = Image.frombytes("I;16B", (4, 1), values.astype(">u2").tobytes())
    assert _decode_mode(image).tolist() == [[0, 1, 128, 255]]


def test_32_bit_integer_grey() -> None:
    in_16_bit = Image.fromarray(np.array([[0, 65535, 257]], np.int32), "I")
    assert _decode_mode(in_16_bit).tolist() == [[0, 255, 1]]
    wide = Image.fromarray(np.array([[-100, 0, 100]], np.int32), "I")  # beyond 16 bits: min..max
    assert _decode_mode(wide).tolist() == [[0, 128, 255]]


def test_float_grey() -> None:
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32), "F")
    assert _decode_mode(unit).tolist() == [[0, 128, 255]]
    wide = Image.fromarray(np.array([[-2.0, 0.0, 2.0, np.nan]], np.float32), "F")
    assert _decode_mode(wide).tolist() == [[0, 128, 255, 0]]


def test_pixel_limit_is_checked_before_decoding() -> None:
    # The header claims 11000x10000 but there are no pixels: only a header check can say "too many".
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # Pillow's own soft limit
        with pytest.raises(DecodeError, match=r"^too many pixels: 11000x10000 = 110000000 exceeds the limit"):
            decode_image(png_header_only(11_000, 10_000))
    with pytest.raises(DecodeError, match="too many pixels"):
        decode_image(_encode(Image.new("RGB", (10, 10))), max_pixels=99)
    assert decode_image(_encode(Image.new("RGB", (10, 10))), max_pixels=100).shape == (10, 10, 3)


def test_header_without_pixels_is_corrupt_within_the_limit() -> None:
    with pytest.raises(DecodeError, match="^truncated or corrupt"):
        decode_image(png_header_only(10, 10))


def test_corrupt_bytes_after_a_valid_header() -> None:
    data = bytearray(_encode(Image.new("RGB", (32, 32), (1, 2, 3))))
    data[60:80] = b"\xff" * 20  # inside IDAT
    with pytest.raises(DecodeError, match="^truncated or corrupt"):
        decode_image(bytes(data))


def test_truncated_images_are_not_loaded_silently() -> None:
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    with pytest.raises(DecodeError, match="truncated"):
        decode_image(CORPUS.files["truncated.jpg"])
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_formats_outside_the_allow_list_are_not_images() -> None:
    ppm = _encode(Image.new("RGB", (4, 4)), "PPM")
    with pytest.raises(DecodeError, match="^not an image"):
        decode_image(ppm)


def test_bad_max_pixels_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="max_pixels"):
        decode_image(b"x", max_pixels=0)
