"""The skull ring (fetal_head.segmentation.skull_ring): the head's ellipse from the image's bright skull ridges
around a known centre, the extra candidate box of the automatic and click answers."""

import numpy as np
import pytest
from skimage.draw import ellipse_perimeter

from fetal_head.io import read_image
from fetal_head.segmentation.prompts import box_iou, mask_box
from fetal_head.segmentation.skull_ring import skull_ring


def test_finds_a_drawn_skull_in_speckle():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 60, size=(540, 800)).astype(np.uint8)
    rr, cc = ellipse_perimeter(260, 420, 110, 150, orientation=0.4, shape=image.shape)
    for d in range(-3, 4):  # a 7 px thick bright skull
        image[np.clip(rr + d, 0, 539), cc] = 230
    image[265:275, 300:540] = 200  # a midline-like bright bar inside the head
    ring = skull_ring(image, (430.0, 250.0))  # a centre 14 px off the true one
    assert ring is not None
    assert abs(ring.centre[0] - 420) < 4 and abs(ring.centre[1] - 260) < 4
    assert sorted(ring.axes) == [pytest.approx(110, rel=0.04), pytest.approx(150, rel=0.04)]
    assert ring.support > 0.25


def test_no_ridges_no_ring():
    assert skull_ring(np.full((300, 400), 40, dtype=np.uint8), (200.0, 150.0)) is None


def test_real_heads_from_their_centre(hc18_subset):
    """On HC18 test images, from the reference head's centroid: the ring's box overlaps the reference box. It is
    a candidate (the decoder's scores choose), so the bar is 'usually close', not 'always right'."""
    cases = [c for c in hc18_subset if c.split == "test"][:12]
    ious = []
    for c in cases:
        mask = c.load_mask()
        rows, cols = np.nonzero(mask)
        ring = skull_ring(read_image(c.image_path), (cols.mean(), rows.mean()))
        ious.append(0.0 if ring is None else box_iou(ring.box(0.0, *mask.shape), mask_box(mask)))
    assert np.median(ious) >= 0.6 and sum(i >= 0.5 for i in ious) >= 8, np.round(ious, 2)
