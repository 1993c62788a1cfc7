#!/usr/bin/env python
"""Batch measurement: head circumference, BPD and OFD of every scan in a folder, in automatic mode, with the
served model (a CSV, an overlay per scan, and which answers to check).

    python scripts/measure.py SCANS/ --out measurements/                        # DICOM calibration when present
    python scripts/measure.py SCANS/*.png --pixel-sizes pixel_size_and_HC.csv   # HC18's CSV: filename, pixel size(mm)
    python scripts/measure.py SCANS/ --pixel-size 0.12 --model-dir apps/fetal_head/model

Inputs: files or folders (subfolders included, as in a PACS export) of PNG/JPEG/TIFF/BMP frames, DICOM (``*.dcm``
or 'DICM' files; the first frame of a cine loop) and 2D NRRD/NIfTI/MHA. Each scan is answered exactly as the
server's automatic request answers it (:func:`fetal_head.measurement.measure_frame`). The pixel size comes from
``--pixel-sizes`` or ``--pixel-size``, else from the file's own calibration, else the row is in pixels only. Written
to ``--out``:

- ``measurements.csv``: one row per scan: HC / BPD / OFD in mm (and HC in px), the pixel size and where it came
  from, the route that answered, ``head_probability`` and ``needs_review`` (with a model retrained on a few labels:
  the head verifier's flag, or the wide localiser's when it answers, README "Which automatic answers to check";
  empty for the zero-shot model), or the
  reason a scan was not measured;
- ``overlays/<scan>.png``: the scan with the segmented head (yellow) and its fitted ellipse (cyan); a flagged
  answer's title says CHECK.

A scan that cannot be read or measured is a row with its ``error``; the others are still measured, and the exit
status is 1 when any scan failed.
"""

import argparse
import csv
import logging
import os
import sys

import numpy as np
import torch
from tqdm import tqdm

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, os.path.join(REPO, "apps", "fetal_head", "lib"))

from fetal_head.biometry import ellipse_mask  # noqa: E402
from fetal_head.io.common import ImageReadError  # noqa: E402
from fetal_head.io.dicom_us import is_dicom_file  # noqa: E402
from fetal_head.io.images import ITK_LABEL_SUFFIXES  # noqa: E402
from fetal_head.measurement import measure_frame  # noqa: E402
from fetal_head.segmentation.model_store import ModelSource  # noqa: E402
from fetal_head.segmentation.prompts import PromptError, pixel_size_from_request  # noqa: E402

# what the readers of fetal_head.io take: bitmaps by name, NRRD/NIfTI/MHA by name, DICOM by content or *.dcm
SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp") + ITK_LABEL_SUFFIXES
COLUMNS = ("scan", "hc_mm", "bpd_mm", "ofd_mm", "hc_px", "pixel_size_x_mm", "pixel_size_y_mm", "pixel_size_from",
           "route", "head_probability", "needs_review", "decoder_score", "model_version", "note", "error")


def overlay_stem(name: str) -> str:
    """``name`` without its image suffix; only a known suffix goes, so a DICOM file named by its UID
    (1.2.840....5) keeps every digit group."""
    known = [x for x in SUFFIXES + (".dcm",) if name.lower().endswith(x)]
    return name[: -len(max(known, key=len))] if known else name


def is_scan(path: str) -> bool:
    name = os.path.basename(path)
    return (name.upper() != "DICOMDIR" and os.path.isfile(path)
            and (name.lower().endswith(SUFFIXES) or is_dicom_file(path)))


def scans(inputs, skip=None):
    """(path, overlay stem) of each scan: each file named, and the image files under each folder, subfolders
    included (a PACS export's study/series folders of extension-less DICOM files), sorted. Not scans: a DICOMDIR
    index, hidden folders, and ``skip`` (the output folder, when it lies inside an input folder)."""
    out = []
    skip = os.path.abspath(skip) if skip else None
    for p in inputs:
        if not os.path.isdir(p):
            out.append((p, overlay_stem(os.path.basename(p))))
            continue
        for root, dirs, names in os.walk(p):
            dirs[:] = sorted(d for d in dirs
                             if not d.startswith(".") and os.path.abspath(os.path.join(root, d)) != skip)
            for path in (os.path.join(root, n) for n in sorted(names)):
                if is_scan(path):
                    # the overlay's name keeps the subfolders, so two series' IM000001 do not overwrite each other
                    out.append((path, overlay_stem(os.path.relpath(path, p).replace(os.sep, "__"))))
    return out


def read_pixel_sizes(path: str) -> dict:
    """HC18's ``pixel_size_and_HC.csv`` layout (a header, then filename, pixel size in mm, ...): file name -> mm."""
    sizes = {}
    with open(path, newline="") as f:
        for row in csv.reader(f):
            if len(row) >= 2:
                try:
                    sizes[row[0].strip()] = float(row[1])
                except ValueError:  # the header
                    continue
    return sizes


def row_of(path, m, given_from) -> dict:
    bio, conf = m.result.get("biometry"), m.result.get("confidence") or {}
    row = {"scan": path, "route": conf.get("source", m.result["prompt_mode"]), "decoder_score": m.result["score"],
           "head_probability": conf.get("head_probability", ""), "needs_review": conf.get("needs_review", ""),
           "model_version": m.result["model_version"], "note": m.result.get("biometry_note", "")}
    if m.pixel_size is not None:
        row.update(pixel_size_x_mm=m.pixel_size[0], pixel_size_y_mm=m.pixel_size[1],
                   pixel_size_from=given_from or (m.result.get("calibration") or {}).get("source", "file"))
    if bio:
        row.update(hc_mm=bio["hc_mm"], bpd_mm=bio["bpd_mm"], ofd_mm=bio["ofd_mm"], hc_px=bio["hc_px"])
    return row


def overlay(path, m, row, out_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h, w = m.image.shape
    fig, ax = plt.subplots(figsize=(6, 6 * h / w))
    ax.imshow(m.image, cmap="gray")
    if m.mask.any():
        ax.contour(m.mask, levels=[0.5], colors="yellow", linewidths=1.0)
    if m.biometry is not None:
        ax.contour(ellipse_mask(m.mask.shape, m.biometry), levels=[0.5], colors="cyan", linewidths=1.0, linestyles="--")
    hc = f"HC {row['hc_mm']:.1f} mm" if row.get("hc_mm") not in (None, "") else (
        f"HC {row['hc_px']:.0f} px" if row.get("hc_px") not in (None, "") else "no head found")
    check = row.get("needs_review") is True or not m.mask.any()
    title = f"{os.path.basename(path)}: {hc}" + (
        "  CHECK" + (f" (head probability {row['head_probability']})" if row.get("head_probability") != "" else "")
        if row.get("needs_review") is True else "")
    ax.set_title(title, fontsize=9, color="red" if check else "black")
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[1:]))
    ap.add_argument("inputs", nargs="+", help="scan files and/or folders of scans")
    ap.add_argument("--out", default="measurements", help="folder for measurements.csv and overlays/")
    ap.add_argument("--model-dir", default=os.path.join(REPO, "apps", "fetal_head", "model"),
                    help="the app's model folder: its fine-tuned checkpoint when there is one, else zero-shot LiteMedSAM")
    ap.add_argument("--sam-checkpoint", default=None, help="a Meta SAM checkpoint instead of LiteMedSAM")
    ap.add_argument("--sam-model-type", default="vit_b")
    ap.add_argument("--pixel-size", default=None, help="one pixel size in mm for every scan (wins over the files')")
    ap.add_argument("--pixel-sizes", default=None, help="CSV of file name, pixel size in mm (HC18's layout)")
    ap.add_argument("--no-overlays", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        fixed = pixel_size_from_request(args.pixel_size)
    except PromptError as e:
        ap.error(str(e))
    sizes = read_pixel_sizes(args.pixel_sizes) if args.pixel_sizes else {}
    files = scans(args.inputs, skip=args.out)
    if not files:
        ap.error(f"no scans found in {args.inputs}")
    os.makedirs(os.path.join(args.out, "overlays"), exist_ok=True)
    predictor = ModelSource(model_dir=args.model_dir, sam_checkpoint=args.sam_checkpoint,
                            sam_model_type=args.sam_model_type).load()
    rows, failed = [], 0
    for path, stem in tqdm(files, desc="measuring", unit="scan"):
        name = os.path.basename(path)
        given = fixed if fixed is not None else (
            (sizes[name], sizes[name]) if name in sizes else None)
        given_from = "--pixel-size" if fixed is not None else ("--pixel-sizes" if given is not None else None)
        try:
            # the decoder's own outline, drawn beside the ellipse it measures (the overlay is for checking that fit)
            m = measure_frame(predictor, path, pixel_size=given, mask_shape="segmentation")
        except (ImageReadError, OSError) as e:  # an unreadable scan is a row, not the end of the batch
            rows.append({"scan": path, "error": f"{type(e).__name__}: {e}"})
            failed += 1
            continue
        row = row_of(path, m, given_from)
        rows.append(row)
        if not args.no_overlays:
            overlay(path, m, row, os.path.join(args.out, "overlays", f"{stem}.png"))
    csv_path = os.path.join(args.out, "measurements.csv")
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({k: r.get(k, "") for k in COLUMNS} for r in rows)
    measured = [r for r in rows if r.get("hc_mm") not in (None, "")]
    flagged = [r for r in rows if r.get("needs_review") is True]
    hcs = np.array([r["hc_mm"] for r in measured], float)
    print(f"{len(files)} scans: {len(measured)} measured in mm"
          + (f" (HC {hcs.min():.1f}-{hcs.max():.1f} mm)" if len(hcs) else "")
          + f", {len(flagged)} flagged needs_review, {failed} failed. {csv_path}")
    for r in flagged:
        print(f"  check: {r['scan']} (head probability {r['head_probability']})")
    for r in rows:
        if r.get("error"):
            print(f"  failed: {r['scan']}: {r['error']}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
