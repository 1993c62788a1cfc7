#!/usr/bin/env python
"""Import an HC18-style folder into a MONAI Label datastore folder.

    python scripts/import_hc18.py SRC DST [--split test] [--limit 20] [--names 003_HC.png ...] [--no-labels]

SRC holds images/, masks/ (filled) or annotations/ (1-pixel outlines, filled here) and pixel_size_and_HC.csv;
DST gets the images, final labels and each image's pixel size in the datastore's image info.
"""

import argparse
import sys

from fetal_head.io.hc18 import import_cases, read_cases, select


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--split", help="only images of this split in splits.csv (pool or test)")
    ap.add_argument("--names", nargs="*", help="only these file names (or ids)")
    ap.add_argument("--limit", type=int, help="at most this many images (after the other filters)")
    ap.add_argument("--no-labels", action="store_true", help="import images only (an unlabelled datastore)")
    args = ap.parse_args(argv)
    cases = select(read_cases(args.src), split=args.split, names=args.names)
    if args.limit:
        cases = cases[: args.limit]
    if not cases:
        sys.exit("no images matched")
    n = import_cases(cases, args.dst, with_labels=not args.no_labels, progress=True)
    print(f"imported {n} images into {args.dst}")


if __name__ == "__main__":
    main()
