"""Rebuilds tests/data/hc18_subset/ from a full HC18-style folder (``../shared/data/hc18`` or ``HC18_DIR``).

The subset is what the test suite runs on when the full 595-image set is not beside the checkout: 24 test-split
and 12 pool-split images, chosen deterministically (seed 0) so that each split's pixel-size range is covered
(its smallest and largest pixel size, then one seeded pick per equal-count pixel-size bin), plus two images that
also carry HC18's original outline annotation (012_HC, and 787_HC, whose outline is cut by the image's top
border). Images, masks and annotations are the original pixels, re-encoded losslessly with PNG optimisation (the
script checks that).

    python tests/data/make_hc18_subset.py [SRC] [DST]
"""

import csv
import os
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
SEED = 0
N_TEST, N_POOL = 24, 12
WITH_ANNOTATION = {"test": ["012_HC.png"], "pool": ["787_HC.png"]}


def pick(names, sizes, n, required, rng):
    """``required`` plus the split's smallest and largest pixel size, then one seeded pick per pixel-size bin."""
    by_size = sorted(names, key=lambda m: (sizes[m], m))
    chosen = list(dict.fromkeys(required + [by_size[0], by_size[-1]]))
    rest = [m for m in by_size if m not in chosen]
    for b in np.array_split(np.arange(len(rest)), n - len(chosen)):
        chosen.append(rest[int(rng.choice(b))])
    return chosen


def save_png(src: Path, dst: Path):
    with Image.open(src) as im:
        im.load()
        Image.Image.save(im, dst, optimize=True)
    with Image.open(src) as a, Image.open(dst) as b:
        assert a.mode == b.mode and np.array_equal(np.array(a), np.array(b)), f"{dst}: pixels changed"


def main(src: Path, dst: Path):
    with open(src / "splits.csv", newline="") as f:
        splits = {r["filename"]: r for r in csv.DictReader(f)}
    with open(src / "pixel_size_and_HC.csv", newline="") as f:
        rows = list(csv.reader(f))
    header, size_rows = rows[0], {r[0]: r for r in rows[1:]}
    sizes = {m: float(r[1]) for m, r in size_rows.items()}
    rng = np.random.default_rng(SEED)
    chosen = []
    for split, n in (("test", N_TEST), ("pool", N_POOL)):
        names = sorted(m for m, r in splits.items() if r["split"] == split)
        chosen += pick(names, sizes, n, WITH_ANNOTATION[split], rng)
    # every image the tests draw (conftest.TEST_DRAWS), so a clone without the full set tests the same images
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from conftest import TEST_DRAWS, drawn_names

    for split, n, seed in TEST_DRAWS:
        chosen += drawn_names(split, n, seed)
    chosen = sorted(set(chosen))
    if dst.exists():
        shutil.rmtree(dst / "images", ignore_errors=True)
        shutil.rmtree(dst / "masks", ignore_errors=True)
        shutil.rmtree(dst / "annotations", ignore_errors=True)
    for sub in ("images", "masks", "annotations"):
        (dst / sub).mkdir(parents=True, exist_ok=True)
    for name in chosen:
        stem = name[:-4]
        save_png(src / "images" / name, dst / "images" / name)
        save_png(src / "masks" / f"{stem}_Mask.png", dst / "masks" / f"{stem}_Mask.png")
        ann = src / "annotations" / f"{stem}_Annotation.png"
        if ann.exists():
            save_png(ann, dst / "annotations" / ann.name)
    with open(dst / "pixel_size_and_HC.csv", "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        w.writerows(size_rows[m] for m in chosen)
    with open(dst / "splits.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["filename", "subject", "split"], lineterminator="\n")
        w.writeheader()
        w.writerows({k: splits[m][k] for k in ("filename", "subject", "split")} for m in chosen)
    total = sum(p.stat().st_size for p in dst.rglob("*") if p.is_file())
    print(f"{len(chosen)} images into {dst} ({total / 1e6:.1f} MB)")


if __name__ == "__main__":
    default_src = Path(os.environ.get("HC18_DIR", REPO.parent / "shared" / "data" / "hc18"))
    src = Path(sys.argv[1]) if len(sys.argv) > 1 else default_src
    dst = Path(sys.argv[2]) if len(sys.argv) > 2 else Path(__file__).resolve().parent / "hc18_subset"
    main(src, dst)
