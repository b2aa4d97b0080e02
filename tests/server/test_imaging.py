"""Image encoding: files decode back to the pixels they were made from."""

import io

import numpy as np
import pytest
from PIL import Image

from denoised.server.imaging import encode_image, encode_stack_npy, preview_png, to_unit_range


@pytest.fixture
def samples():
    rng = np.random.default_rng(0)
    return rng.uniform(-1.2, 1.2, size=(2, 3, 9, 7)).astype(np.float32)


def test_unit_range_maps_and_clamps(samples):
    pixels = to_unit_range(samples)
    assert pixels.shape == (2, 9, 7, 3)
    expected = np.clip((samples + 1) / 2, 0, 1).transpose(0, 2, 3, 1)
    np.testing.assert_allclose(pixels, expected, atol=1e-7)
    with pytest.raises(ValueError, match="n, C, H, W"):
        to_unit_range(samples[0])


@pytest.mark.parametrize("fmt", ["png", "webp"])
@pytest.mark.parametrize("channels", [1, 3])
def test_lossless_files_round_trip_to_8_bit(samples, fmt, channels):
    pixels = to_unit_range(samples[:, :channels])[0]
    image = Image.open(io.BytesIO(encode_image(pixels, fmt)))
    assert image.format == fmt.upper()
    decoded = np.asarray(image.convert("L" if channels == 1 else "RGB"), dtype=np.float32)
    decoded = decoded.reshape(9, 7, channels) / 255.0
    np.testing.assert_allclose(decoded, pixels, atol=0.5 / 255 + 1e-6)


def test_npy_keeps_float32_exactly(samples):
    pixels = to_unit_range(samples)
    one = np.load(io.BytesIO(encode_image(pixels[1], "npy")))
    assert one.dtype == np.float32
    np.testing.assert_array_equal(one, pixels[1])
    np.testing.assert_array_equal(np.load(io.BytesIO(encode_stack_npy(pixels))), pixels)


def test_preview_is_a_box_average_within_max_side():
    rng = np.random.default_rng(1)
    pixels = rng.uniform(0, 1, size=(32, 16, 3)).astype(np.float32)
    image = Image.open(io.BytesIO(preview_png(pixels, max_side=8)))
    assert image.size == (4, 8)  # (width, height): factor 4
    expected = pixels.reshape(8, 4, 4, 4, 3).mean(axis=(1, 3))
    np.testing.assert_allclose(np.asarray(image) / 255.0, expected, atol=0.5 / 255 + 1e-6)


def test_bad_format_and_channel_count_are_named(samples):
    pixels = to_unit_range(samples)[0]
    with pytest.raises(ValueError, match="png, webp, npy"):
        encode_image(pixels, "jpeg")
    with pytest.raises(ValueError, match="1, 3 or 4 channels"):
        encode_image(np.zeros((4, 4, 2), np.float32), "png")
