"""Reading user images: every bad file is a reason, never a crash; every good file comes out upright 8-bit sRGB."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from flux2lora.data.captions import caption_from_filename, read_caption_file
from flux2lora.data.images import ImageRejected, decode_rgb, inspect_image, to_rgb
from flux2lora.data.synthetic import AWKWARD_INPUTS, BAD_INPUTS, write_awkward_inputs, write_bad_inputs

CAPTION_REASONS = {"missing_caption", "empty_caption", "undecodable_caption"}


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad")
    write_bad_inputs(folder)
    return folder


@pytest.fixture(scope="module")
def awkward(tmp_path_factory):
    folder = tmp_path_factory.mktemp("awkward")
    write_awkward_inputs(folder)
    return folder


def _rgb(folder, name) -> np.ndarray:
    image = decode_rgb((folder / name).read_bytes(), name)
    assert image.mode == "RGB"
    return np.asarray(image).astype(int)


@pytest.mark.parametrize("name", [n for n, r in BAD_INPUTS.items() if r not in CAPTION_REASONS | {"too_small",
                                                                                                 "unsupported_format"}])
def test_each_bad_image_file_is_rejected_with_its_reason(bad, name):
    with pytest.raises(ImageRejected) as err:
        inspect_image(bad / name)
    assert err.value.reason == BAD_INPUTS[name]
    assert name in str(err.value)  # the message names the file


@pytest.mark.parametrize("name", [n for n, r in BAD_INPUTS.items() if r in CAPTION_REASONS])
def test_each_bad_caption_is_rejected_with_its_reason(bad, name):
    inspect_image(bad / name)  # the image itself is fine
    with pytest.raises(ImageRejected) as err:
        read_caption_file(bad / name, ".txt")
    assert err.value.reason == BAD_INPUTS[name]


def test_decompression_bomb_is_refused_before_decoding(bad):
    # the file is ~70 bytes and claims 30000x30000: refused from its header, nothing allocated
    assert (bad / "bomb.png").stat().st_size < 200
    with pytest.raises(ImageRejected, match="too_large|decompression bomb|exceeds") as err:
        inspect_image(bad / "bomb.png")
    assert err.value.reason == "too_large"


def test_an_unreadable_file_is_a_reason_not_an_oserror(tmp_path):
    locked = tmp_path / "gone.png"
    with pytest.raises(ImageRejected) as err:
        inspect_image(locked)
    assert err.value.reason == "unreadable"


@pytest.mark.parametrize("name", list(AWKWARD_INPUTS))
def test_awkward_good_files_are_accepted_with_their_upright_size(awkward, name):
    facts = inspect_image(awkward / name)
    assert (facts.width, facts.height) == AWKWARD_INPUTS[name][1]
    assert decode_rgb((awkward / name).read_bytes(), name).size == AWKWARD_INPUTS[name][1]


def test_exif_orientation_is_applied(awkward):
    # stored: top half red, bottom half blue; orientation 6 (rotate 90 clockwise) puts red on the right
    pixels = _rgb(awkward, "rotated_exif.jpg")
    assert pixels.shape == (96, 64, 3)
    assert np.abs(pixels[48, 60] - [255, 0, 0]).max() < 30
    assert np.abs(pixels[48, 3] - [0, 0, 255]).max() < 30


@pytest.mark.parametrize("name", ["rgba.png", "la.png", "palette.png"])
def test_transparency_is_composited_on_white_not_black(awkward, name):
    pixels = _rgb(awkward, name)
    assert (pixels[40, 70] == 255).all(), "a transparent pixel must come out white"
    opaque = pixels[40, 10]
    assert opaque.tolist() == ([0, 0, 0] if name == "la.png" else [255, 0, 0])


def test_cmyk_becomes_the_same_colour_in_rgb(awkward):
    assert np.abs(_rgb(awkward, "cmyk.jpg")[40, 40] - [255, 0, 0]).max() < 10


def test_sixteen_bit_grayscale_is_scaled_not_clipped(awkward):
    pixels = _rgb(awkward, "gray16.png")
    assert pixels[40, 10].tolist() == [255, 255, 255]  # 65535
    assert pixels[40, 70].tolist() == [128, 128, 128]  # 32768: clipping would have made it white


def test_grayscale_and_32_bit_modes_convert():
    assert to_rgb(Image.new("L", (4, 4), 77)).getpixel((0, 0)) == (77, 77, 77)
    assert to_rgb(Image.new("1", (4, 4), 1)).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32))).getpixel((0, 0)) == (128, 128, 128)
    assert to_rgb(Image.fromarray(np.full((4, 4), 1000, dtype=np.int32))).getpixel((0, 0))[0] == 4  # 16-bit data


def test_filename_captions_swap_underscores_for_spaces(tmp_path):
    assert caption_from_filename(tmp_path / "a_red__circle_02.png") == "a red circle 02"
    with pytest.raises(ImageRejected, match="no caption"):
        caption_from_filename(tmp_path / "___.png")
