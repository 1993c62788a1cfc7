"""scripts/import_hc18.py: an HC18-style folder becomes a MONAI Label datastore with labels and pixel sizes."""

import json
import shutil

import numpy as np
from PIL import Image

from conftest import REPO, run_script


def test_import_fills_outlines_and_records_pixel_sizes(tmp_path, hc18):
    # a small HC18-style source: two cases with filled masks, one with only the original outline annotation
    with_ann = next(c for c in hc18 if c.annotation_path)
    others = [c for c in hc18 if not c.annotation_path][:2]
    src = tmp_path / "src"
    for sub in ("images", "masks", "annotations"):
        (src / sub).mkdir(parents=True)
    rows = ["filename,pixel size(mm),head circumference (mm)"]
    for c in others + [with_ann]:
        shutil.copy(c.image_path, src / "images" / c.name)
        rows.append(f"{c.name},{c.pixel_size_mm},{c.hc_mm}")
    for c in others:
        shutil.copy(c.mask_path, src / "masks" / f"{c.image_id}_Mask.png")
    shutil.copy(with_ann.annotation_path, src / "annotations" / f"{with_ann.image_id}_Annotation.png")
    (src / "pixel_size_and_HC.csv").write_text("\n".join(rows) + "\n")

    dst = tmp_path / "datastore"
    assert run_script(REPO / "scripts" / "import_hc18.py", src, dst) == 0
    store = json.loads((dst / "datastore_v2.json").read_text())
    for c in others + [with_ann]:
        obj = store["objects"][c.image_id]
        assert obj["image"]["info"]["pixel_size_mm"] == c.pixel_size_mm
        assert "final" in obj["labels"]
        label = np.array(Image.open(dst / "labels" / "final" / f"{c.image_id}.png"))
        assert set(np.unique(label)) == {0, 1}
        # the outline-only case is filled: it agrees with the reference filled mask
        ref = c.load_mask() if c is not with_ann else np.array(Image.open(with_ann.mask_path)) > 0
        overlap = 2 * ((label > 0) & ref).sum() / ((label > 0).sum() + ref.sum())
        assert overlap > 0.99

    # re-import never overwrites a label someone corrected
    corrected = dst / "labels" / "final" / f"{others[0].image_id}.png"
    Image.fromarray(np.zeros((540, 800), np.uint8)).save(corrected)
    before = corrected.read_bytes()
    assert run_script(REPO / "scripts" / "import_hc18.py", src, dst) == 0
    assert corrected.read_bytes() == before
