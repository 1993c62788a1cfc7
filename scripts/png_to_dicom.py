#!/usr/bin/env python
"""Convert a folder of PNG ultrasound frames into US DICOM files (one study per image), calibrated in mm.

    python scripts/png_to_dicom.py SRC DST [--split test] [--limit 20] [--names 003_HC.png ...]
                                   [--photometric MONOCHROME2|RGB|YBR_FULL_422] [--jpeg] [--seg]
    python scripts/png_to_dicom.py PNG_FOLDER DST --pixel-size-mm 0.12     # or --csv sizes.csv

SRC in the HC18 layout (images/, masks/, pixel_size_and_HC.csv, as ../shared/data/hc18 and
apps/fetal_head/sample_data) gives each image its CSV pixel size; ``--seg`` also writes each reference mask as a
DICOM SEG next to it. A plain folder of PNGs takes ``--pixel-size-mm`` for all or ``--csv`` (filename, pixel size
in mm per row); an image without a pixel size is written without calibration. DST gets ``<image id>.dcm`` (and
``<image id>_seg.dcm``), ready for e.g. ``storescu`` or Orthanc's upload.
"""

import argparse
import csv
import os
import sys

from tqdm import tqdm

from fetal_head.io.dicom_us import US_ENCODINGS, segmentation_from_mask, write_ultrasound
from fetal_head.io.hc18 import HC18Case, read_cases, select
from fetal_head.io import read_image


def plain_folder_cases(src, csv_path=None, pixel_size_mm=None):
    """Every PNG/JPG in ``src`` as a case, with its pixel size from the CSV or the one given for all."""
    sizes = {}
    if csv_path:
        with open(csv_path, newline="") as f:
            for row in csv.reader(f):
                try:
                    sizes[row[0].strip()] = float(row[1])
                except (IndexError, ValueError):
                    continue  # the header line
    return [
        HC18Case(name=n, image_path=os.path.join(src, n), mask_path=None, annotation_path=None,
                 pixel_size_mm=sizes.get(n, pixel_size_mm), hc_mm=None, split=None, subject=None)
        for n in sorted(os.listdir(src)) if n.lower().endswith((".png", ".jpg", ".jpeg"))
    ]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--pixel-size-mm", type=float, help="pixel size for every image (overrides the CSV)")
    ap.add_argument("--csv", help="filename,pixel size (mm) rows for a plain folder of PNGs")
    ap.add_argument("--split", help="only images of this split in splits.csv (pool or test)")
    ap.add_argument("--names", nargs="*", help="only these file names (or ids)")
    ap.add_argument("--limit", type=int, help="at most this many images (after the other filters)")
    ap.add_argument("--photometric", default="MONOCHROME2", choices=["MONOCHROME2", "RGB", "YBR_FULL_422"],
                    help="gray, or colour: RGB uncompressed, YBR_FULL_422 with --jpeg")
    ap.add_argument("--jpeg", action="store_true", help="JPEG Baseline (lossy, quality 95) instead of uncompressed")
    ap.add_argument("--seg", action="store_true", help="also write each reference mask as a DICOM SEG")
    args = ap.parse_args(argv)
    if (args.photometric, args.jpeg) not in US_ENCODINGS:
        ap.error("US images allow MONOCHROME2 (with or without --jpeg), RGB (uncompressed) or YBR_FULL_422 --jpeg")

    if os.path.isdir(os.path.join(args.src, "images")):
        cases = read_cases(args.src)
    else:
        cases = plain_folder_cases(args.src, args.csv, args.pixel_size_mm)
    cases = select(cases, split=args.split, names=args.names)[: args.limit]
    if not cases:
        sys.exit("no images matched")
    os.makedirs(args.dst, exist_ok=True)
    uncalibrated = 0
    for case in tqdm(cases, desc="png -> dicom", unit="image"):
        pixel_size = args.pixel_size_mm or case.pixel_size_mm
        uncalibrated += pixel_size is None
        ds = write_ultrasound(
            os.path.join(args.dst, f"{case.image_id}.dcm"), read_image(case.image_path), pixel_size,
            photometric=args.photometric, jpeg=args.jpeg, patient_id=case.subject or case.image_id,
            patient_name=f"Anonymous^{case.image_id}", study_description="Fetal head biometry",
            series_description=f"{case.image_id} ({args.photometric}{', JPEG' if args.jpeg else ''})",
        )
        if args.seg and (case.mask_path or case.annotation_path):
            segmentation_from_mask(case.load_mask(), ds).save_as(os.path.join(args.dst, f"{case.image_id}_seg.dcm"))
    missing = f" ({uncalibrated} without a pixel size: uncalibrated)" if uncalibrated else ""
    print(f"wrote {len(cases)} DICOM files to {args.dst}{missing}")


if __name__ == "__main__":
    main()
