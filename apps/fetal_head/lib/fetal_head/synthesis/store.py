"""Synthetic image-mask pairs in a MONAI Label datastore folder: add, list, purge, and telling them apart.

A synthetic pair is stored like a real one (image in the datastore folder, mask as the ``final`` label, 0/1 PNG)
with two marks, so no consumer can mistake it for a real labelled image:

- its id starts with ``synthetic_`` (``synthetic_<scheme>_<seed>_<index>``);
- its image info holds ``{"synthetic": true, "provenance": {scheme, generator_version, seed, index, steps,
  sampler, created, ...}}``.

:func:`is_synthetic` checks either mark: the id survives a datastore file rewritten by a process that never saw
the info (a MONAI Label server whose in-memory datastore predates the synthesis run, when it saves a label).

Writes never overwrite: an id that exists (in the datastore file or as a file on disk) is refused. Purging removes
only synthetic pairs (image, labels, datastore entries); real images and labels are not touched.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from typing import Dict, Iterable, List, Optional, Tuple

import numpy as np
from PIL import Image

SYNTHETIC_PREFIX = "synthetic_"
SYNTHETIC_KEY = "synthetic"
PROVENANCE_KEY = "provenance"
FINAL = "final"
DATASTORE_EXTENSIONS = ["*.png", "*.jpg", "*.jpeg"]
PROVENANCE_FILE = "provenance.jsonl"


def synthetic_id(scheme: str, seed: int, index: int) -> str:
    return f"{SYNTHETIC_PREFIX}{scheme}_{seed}_{index}"


def is_synthetic(image_id: str, info: Optional[dict] = None) -> bool:
    return image_id.startswith(SYNTHETIC_PREFIX) or bool((info or {}).get(SYNTHETIC_KEY))


def open_datastore(path: str):
    """A MONAI Label LocalDatastore on ``path`` as the app's server opens it for 2D PNG/JPEG images."""
    from monailabel.datastore.local import LocalDatastore

    return LocalDatastore(path, extensions=DATASTORE_EXTENSIONS, auto_reload=False)


def real_labelled_pairs(ds) -> List[Tuple[str, str, str]]:
    """(image_id, image_path, final_label_path) of every real (non-synthetic) image with a final label."""
    out = []
    for image_id in sorted(ds.get_labeled_images(FINAL)):
        if is_synthetic(image_id, ds.get_image_info(image_id)):
            continue
        out.append((image_id, ds.get_image_uri(image_id), ds.get_label_uri(image_id, FINAL)))
    return out


def real_unlabelled_images(ds) -> List[Tuple[str, str]]:
    """(image_id, image_path) of every real (non-synthetic) image without a final label: what a semi-supervised
    generator learns the image distribution from. Synthetic images never are (a generator must not learn from
    its own or another generator's output)."""
    labelled = set(ds.get_labeled_images(FINAL))
    out = []
    for image_id in sorted(ds.list_images()):
        if image_id in labelled or is_synthetic(image_id, ds.get_image_info(image_id)):
            continue
        out.append((image_id, ds.get_image_uri(image_id)))
    return out


def list_synthetic(ds) -> List[str]:
    return sorted(i for i in ds.list_images() if is_synthetic(i, ds.get_image_info(i)))


def _image_file(ds, image_id: str, ext: str = ".png") -> str:
    return os.path.join(ds._datastore.image_path(), image_id + ext)


def _taken(ds, image_id: str) -> bool:
    if ds.get_image_uri(image_id):
        return True
    return any(os.path.exists(_image_file(ds, image_id, ext)) for ext in (".png", ".jpg", ".jpeg"))


def next_free_index(ds, scheme: str, seed: int) -> int:
    """One past the largest index used by ``synthetic_<scheme>_<seed>_*`` (entries or files): a rerun with the
    same seed continues the numbering (new candidates) instead of colliding with earlier pairs."""
    pattern = re.compile(re.escape(synthetic_id(scheme, seed, 0)[:-1]) + r"(\d+)(\.\w+)?$")
    used = [int(m.group(1)) for name in list(ds.list_images()) + os.listdir(ds._datastore.image_path())
            if (m := pattern.match(name))]
    return max(used) + 1 if used else 0


def add_pair(ds, image_id: str, image: np.ndarray, mask: np.ndarray, provenance: dict) -> str:
    """Add one synthetic pair; refuses an id that exists (never overwrites)."""
    if not image_id.startswith(SYNTHETIC_PREFIX):
        raise ValueError(f"synthetic ids start with {SYNTHETIC_PREFIX!r}, got {image_id!r}")
    if _taken(ds, image_id):
        raise FileExistsError(f"image id {image_id!r} is already in the datastore")
    with tempfile.TemporaryDirectory() as tmp:
        image_path = os.path.join(tmp, f"{image_id}.png")
        label_path = os.path.join(tmp, f"{image_id}_label.png")
        Image.fromarray(np.asarray(image, dtype=np.uint8)).save(image_path)
        Image.fromarray((np.asarray(mask) > 0).astype(np.uint8)).save(label_path)  # label index 1 = head
        ds.add_image(image_id, image_path, {SYNTHETIC_KEY: True, PROVENANCE_KEY: provenance})
        ds.save_label(image_id, label_path, FINAL, {SYNTHETIC_KEY: True})
    return image_id


def purge_synthetic(ds) -> List[str]:
    """Remove every pair the pipeline created (image, labels, datastore entry); returns the removed ids. Only ids
    that carry the pipeline's provenance record are removed: a real image is never purged, whatever else its info
    says."""
    removed = []
    for image_id in list_synthetic(ds):
        if not isinstance(ds.get_image_info(image_id).get(PROVENANCE_KEY), dict):
            continue
        ds.remove_image(image_id)
        removed.append(image_id)
    return removed


# ---- HC18-style folders: the output of multi-process generation, merged into a datastore afterwards ----------

def write_pair_to_folder(folder: str, image_id: str, image: np.ndarray, mask: np.ndarray, provenance: dict,
                         provenance_file: str = PROVENANCE_FILE) -> str:
    """images/<id>.png, masks/<id>_Mask.png (0/255, as HC18) and one JSON line of provenance."""
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    os.makedirs(os.path.join(folder, "masks"), exist_ok=True)
    image_path = os.path.join(folder, "images", f"{image_id}.png")
    if os.path.exists(image_path):
        raise FileExistsError(f"{image_path} exists")
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(image_path)
    Image.fromarray((np.asarray(mask) > 0).astype(np.uint8) * 255).save(os.path.join(folder, "masks", f"{image_id}_Mask.png"))
    with open(os.path.join(folder, provenance_file), "a") as f:
        f.write(json.dumps({"id": image_id, **provenance}) + "\n")
    return image_id


def read_folder_provenance(folder: str) -> Dict[str, dict]:
    """id -> provenance from every ``provenance*.jsonl`` in the folder (one file per process)."""
    out = {}
    for name in sorted(os.listdir(folder)):
        if name.startswith("provenance") and name.endswith(".jsonl"):
            with open(os.path.join(folder, name)) as f:
                for line in f:
                    if line.strip():
                        rec = json.loads(line)
                        out[rec.pop("id")] = rec
    return out


def import_folder(ds, folder: str) -> Tuple[List[str], List[str]]:
    """Add a folder written by :func:`write_pair_to_folder` to a datastore; returns (added, skipped existing)."""
    from ..io import read_image, read_mask

    added, skipped = [], []
    for image_id, provenance in read_folder_provenance(folder).items():
        if _taken(ds, image_id):
            skipped.append(image_id)
            continue
        image = read_image(os.path.join(folder, "images", f"{image_id}.png"))
        mask = read_mask(os.path.join(folder, "masks", f"{image_id}_Mask.png"))
        added.append(add_pair(ds, image_id, image, mask, provenance))
    return added, skipped


def file_hashes(paths: Iterable[str]) -> Dict[str, str]:
    """SHA-256 of files (to show real labels are byte-identical before and after)."""
    import hashlib

    out = {}
    for p in paths:
        with open(p, "rb") as f:
            out[p] = hashlib.sha256(f.read()).hexdigest()
    return out
