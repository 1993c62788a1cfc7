"""Reading real-world ultrasound exports, and prompts in the Slicer/OHIF conventions (no server needed)."""

import numpy as np
import pytest
from PIL import Image

from fetal_head.io import ImageReadError, read_image, to_gray_uint8, read_mask, write_mask
from fetal_head.segmentation.prompts import pixel_size_from_request, prompt_from_request, prompt_mode
from fetal_head.segmentation import Prompt, PromptError


def _save(tmp_path, array, name="x.png", mode=None):
    p = tmp_path / name
    im = Image.fromarray(array) if mode is None else Image.fromarray(array).convert(mode)
    im.save(p)
    return p


def test_real_hc18_image_reads_as_8bit_gray(hc18):
    img = read_image(hc18[0].image_path)
    assert img.dtype == np.uint8 and img.shape == (540, 800)


def test_16bit_keeps_contrast(tmp_path):
    a = (np.arange(100 * 120).reshape(100, 120) * 5).astype(np.uint16)
    img = read_image(_save(tmp_path, a))
    assert img.dtype == np.uint8 and img.min() == 0 and img.max() == 255


def test_rgba_and_palette_become_gray(tmp_path):
    g = np.tile(np.arange(256, dtype=np.uint8), (10, 1))
    rgba = np.dstack([g, g, g, np.full_like(g, 128)])
    assert np.array_equal(read_image(_save(tmp_path, rgba, "a.png")), g)
    pal = read_image(_save(tmp_path, g, "p.png", mode="P"))
    assert np.abs(pal.astype(int) - g).max() <= 8


@pytest.mark.parametrize("content", [b"", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, b"GIF89a not really"])
def test_broken_files_raise_clear_errors(tmp_path, content):
    p = tmp_path / "broken.png"
    p.write_bytes(content)
    with pytest.raises(ImageReadError) as e:
        read_image(p)
    assert str(e.value)


def test_truncated_png_raises(tmp_path, hc18):
    raw = open(hc18[0].image_path, "rb").read()
    p = tmp_path / "t.png"
    p.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ImageReadError, match="decode"):
        read_image(p)


def test_one_pixel_image_is_refused(tmp_path):
    with pytest.raises(ImageReadError, match="too small"):
        read_image(_save(tmp_path, np.zeros((1, 1), np.uint8)))


def test_float_and_constant_arrays():
    assert to_gray_uint8(np.ones((4, 4), np.float32)).max() == 0
    assert to_gray_uint8(np.linspace(0, 1, 16).reshape(4, 4)).max() == 255
    with pytest.raises(ImageReadError):
        to_gray_uint8(np.full((4, 4), np.nan))


def test_slicer_roi_pairs_are_sorted_and_k_ignored():
    p = prompt_from_request({"roi": [500, 300, 400, 150, 0, 0], "foreground": [], "background": []})
    assert p.box == (300, 150, 500, 400)
    assert prompt_mode(p) == "box"


def test_clicks_and_modes():
    p = prompt_from_request({"foreground": [[10, 20, 0], [11, 21]], "background": [[1, 2, 0]]})
    assert p.points.tolist() == [[10, 20], [11, 21], [1, 2]]
    assert p.labels.tolist() == [1, 1, 0]
    assert prompt_mode(p) == "clicks"
    assert prompt_mode(prompt_from_request({})) == "automatic"
    assert prompt_mode(prompt_from_request({"box": [1, 2, 30, 40], "foreground": [[5, 5]]})) == "box+clicks"


@pytest.mark.parametrize(
    "request_, match",
    [
        ({"roi": [1, 2, 3]}, "roi"),
        ({"roi": "1,2,3,4"}, "roi"),
        ({"roi": [1, 2, "a", 4]}, "numbers"),
        ({"roi": [1, 2, 3, 4], "box": [1, 2, 3, 4]}, "either"),
        ({"foreground": [[1]]}, "foreground"),
        ({"foreground": "here"}, "foreground"),
        ({"box": [0, 0, float("inf"), 3]}, "finite"),
    ],
)
def test_malformed_prompts(request_, match):
    with pytest.raises(PromptError, match=match):
        prompt_from_request(request_)


@pytest.mark.parametrize(
    "prompt, match",
    [
        (Prompt(box=(900, 600, 1000, 700)), "outside"),
        (Prompt(box=(10, 10, 10.5, 50)), "degenerate"),
        (Prompt(points=np.array([[-5.0, 3.0]]), labels=np.array([1])), "outside"),
        (Prompt(points=np.array([[5.0, 3.0]]), labels=np.array([1, 0])), "label"),
    ],
)
def test_prompts_checked_against_the_image(prompt, match):
    with pytest.raises(PromptError, match=match):
        prompt.validated(540, 800)


def test_box_partly_outside_is_clipped():
    p = Prompt(box=(-30, -10, 900, 300)).validated(540, 800)
    assert p.box == (0, 0, 799, 300)


def test_pixel_size_forms():
    assert pixel_size_from_request(None) is None
    assert pixel_size_from_request(0.1) == (0.1, 0.1)
    assert pixel_size_from_request("0.2") == (0.2, 0.2)
    assert pixel_size_from_request([0.1, 0.2]) == (0.1, 0.2)
    with pytest.raises(PromptError):
        pixel_size_from_request([0, 1])


@pytest.mark.parametrize("suffix", [".nrrd", ".nii.gz"])
def test_itk_label_files_round_trip_with_spacing(tmp_path, hc18, suffix):
    """Slicer submits labelmaps as (1, H, W) NRRD; OHIF asks infer for NRRD: both read back as the (H, W) mask."""
    import itk

    case = hc18[0]
    ref = case.load_mask()
    out = write_mask(ref, tmp_path / f"label{suffix}", spacing_mm=case.pixel_size_mm)
    assert read_mask(out).shape == ref.shape and (read_mask(out) == ref).all()
    assert np.allclose(itk.imread(str(out)).GetSpacing(), case.pixel_size_mm)
    slicer_like = itk.image_from_array(ref[None].astype(np.uint8))  # Slicer's labelmap: one slice, k = 0
    itk.imwrite(slicer_like, str(tmp_path / "slicer.nrrd"))
    assert (read_mask(tmp_path / "slicer.nrrd") == ref).all()


def test_mask_dice_agrees_with_monai_on_a_real_label_and_says_what_empty_means(hc18):
    """The package's one mask-overlap helper (candidate agreement, active-learning uncertainty, synthetic QC) against
    MONAI's compute_dice: a real HC18 label and the same label shifted by 15 px."""
    from conftest import dice as monai_dice
    from fetal_head.segmentation.prompts import mask_dice

    ref = read_mask(hc18[0].mask_path) > 0
    moved = np.roll(ref, 15, axis=1)
    assert 0.8 < mask_dice(ref, moved) < 0.99
    assert mask_dice(ref, moved) == pytest.approx(monai_dice(ref, moved), abs=1e-6)
    assert mask_dice(ref, ref.astype(np.uint8) * 255) == 1.0  # any nonzero value is foreground
    empty = np.zeros_like(ref)
    assert mask_dice(ref, empty) == 0.0 and mask_dice(empty, empty) == 0.0 and mask_dice(empty, empty, empty=1.0) == 1.0
