"""HC18-style folders (images/, masks/ or annotations/, pixel_size_and_HC.csv, splits.csv) and importing them
into a MONAI Label datastore folder.

The datastore gets each image, its final label (0/1 PNG, MONAI Label's label-index convention) and, in the
datastore's image info, ``pixel_size_mm`` and the reference ``hc_mm``: the server reads the pixel size from
there to report HC, BPD and OFD in mm.
"""

from __future__ import annotations

import csv
import os
import shutil
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional

import numpy as np
from PIL import Image
from scipy import ndimage

PIXEL_SIZE_KEY = "pixel_size_mm"
REFERENCE_HC_KEY = "hc_mm_reference"
LABEL_NAME = "fetal_head"


@dataclass
class HC18Case:
    name: str  # e.g. "003_HC.png"
    image_path: str
    mask_path: Optional[str]  # filled mask
    annotation_path: Optional[str]  # 1-pixel ellipse outline (original HC18)
    pixel_size_mm: Optional[float]
    hc_mm: Optional[float]
    split: Optional[str]
    subject: Optional[str]

    @property
    def image_id(self) -> str:
        return os.path.splitext(self.name)[0]

    def load_mask(self) -> np.ndarray:
        """The filled head mask as bool (filled from the outline when only the annotation exists)."""
        if self.mask_path:
            with Image.open(self.mask_path) as im:
                a = np.array(im)
            return (a[..., 0] if a.ndim == 3 else a) > 0
        if self.annotation_path:
            return fill_outline(self.annotation_path)
        raise FileNotFoundError(f"no mask or annotation for {self.name}")


def fill_outline(path: str) -> np.ndarray:
    """Fill a closed ellipse outline (HC18's annotation format) into a mask, outline included."""
    with Image.open(path) as im:
        a = np.array(im)
    outline = (a[..., 0] if a.ndim == 3 else a) > 0
    # An outline that runs into the image border (e.g. 787_HC) is closed along that border first; small gaps are
    # then closed with growing structuring elements until the inside fills, i.e. the filled area is clearly more
    # than the outline itself.
    sealed_border = outline.copy()
    for edge in (np.s_[0, :], np.s_[-1, :], np.s_[:, 0], np.s_[:, -1]):
        hits = np.flatnonzero(outline[edge])
        if len(hits) >= 2:
            border = sealed_border[edge]
            border[hits[0] : hits[-1] + 1] = True
            sealed_border[edge] = border
    for candidate in (outline, sealed_border):
        for radius in range(0, 6):
            sealed = candidate if radius == 0 else ndimage.binary_closing(candidate, np.ones((2 * radius + 1,) * 2)) | candidate
            filled = ndimage.binary_fill_holes(sealed)
            if filled.sum() > 2 * outline.sum():
                return filled
    raise ValueError(f"{path}: the outline is not closed, cannot fill it")


def read_cases(src: str) -> List[HC18Case]:
    """All images in an HC18-style folder, with whatever of masks, outlines, pixel sizes and splits exists."""
    images_dir = os.path.join(src, "images")
    if not os.path.isdir(images_dir):
        raise FileNotFoundError(f"{src} has no images/ folder")
    sizes: Dict[str, tuple] = {}
    csv_path = os.path.join(src, "pixel_size_and_HC.csv")
    if os.path.isfile(csv_path):
        with open(csv_path, newline="") as f:
            for row in csv.reader(f):
                if len(row) < 2 or not row[0].lower().endswith((".png", ".jpg")):
                    continue
                hc = float(row[2]) if len(row) > 2 and row[2].strip() else None
                sizes[row[0].strip()] = (float(row[1]), hc)
    splits: Dict[str, tuple] = {}
    split_path = os.path.join(src, "splits.csv")
    if os.path.isfile(split_path):
        with open(split_path, newline="") as f:
            for row in csv.DictReader(f):
                splits[row["filename"]] = (row.get("split"), row.get("subject"))
    cases = []
    for name in sorted(os.listdir(images_dir)):
        if not name.lower().endswith((".png", ".jpg", ".jpeg")):
            continue
        stem = os.path.splitext(name)[0]
        mask = os.path.join(src, "masks", f"{stem}_Mask.png")
        ann = os.path.join(src, "annotations", f"{stem}_Annotation.png")
        ps, hc = sizes.get(name, (None, None))
        split, subject = splits.get(name, (None, None))
        cases.append(
            HC18Case(
                name=name,
                image_path=os.path.join(images_dir, name),
                mask_path=mask if os.path.isfile(mask) else None,
                annotation_path=ann if os.path.isfile(ann) else None,
                pixel_size_mm=ps,
                hc_mm=hc,
                split=split,
                subject=subject,
            )
        )
    return cases


def select(cases: Iterable[HC18Case], split: Optional[str] = None, names: Optional[Iterable[str]] = None) -> List[HC18Case]:
    out = list(cases)
    if split:
        out = [c for c in out if c.split == split]
    if names is not None:
        wanted = set(names)
        out = [c for c in out if c.name in wanted or c.image_id in wanted]
    return out


def import_cases(cases: Iterable[HC18Case], dst: str, with_labels: bool = True, progress: bool = False) -> int:
    """Copy cases into a MONAI Label datastore folder ``dst``; returns the number imported.

    Existing final labels are never overwritten: a label someone corrected stays as it is.
    """
    from monailabel.datastore.local import LocalDatastore

    cases = list(cases)
    labels_dir = os.path.join(dst, "labels", "final")
    os.makedirs(labels_dir, exist_ok=True)
    if progress:
        from tqdm import tqdm

        cases_iter = tqdm(cases, desc="import", unit="image")
    else:
        cases_iter = cases
    for c in cases_iter:
        shutil.copyfile(c.image_path, os.path.join(dst, c.name))
        label_path = os.path.join(labels_dir, f"{c.image_id}.png")
        if with_labels and (c.mask_path or c.annotation_path) and not os.path.exists(label_path):
            Image.fromarray(c.load_mask().astype(np.uint8)).save(label_path)
    ds = LocalDatastore(dst, extensions=["*.png", "*.jpg", "*.jpeg"], auto_reload=False)
    for c in cases:
        info = {}
        if c.pixel_size_mm:
            info[PIXEL_SIZE_KEY] = c.pixel_size_mm
        if c.hc_mm:
            info[REFERENCE_HC_KEY] = c.hc_mm
        if info:
            ds.update_image_info(c.image_id, info)
    return len(cases)
