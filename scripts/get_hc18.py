#!/usr/bin/env python
"""Download the HC18 training set from Zenodo (record 1322001) into an HC18-style folder for the full test suite.

    python scripts/get_hc18.py [--out .data/hc18] [--all]
    HC18_DIR=.data/hc18 make test        # (.data/hc18 is also found without HC18_DIR)

Downloads ``training_set.zip`` and ``training_set_pixel_size_and_HC.csv`` from
``<base-url>/records/1322001/files/<name>?download=1``, checks each file's MD5 against the checksum Zenodo lists
for it in ``<base-url>/api/records/1322001`` (and prints its SHA-256), then writes:

- ``images/NNN_HC.png`` and ``annotations/NNN_HC_Annotation.png`` as shipped (1-pixel ellipse outlines);
- ``masks/NNN_HC_Mask.png``: the outlines filled (0/255) with the repository's own
  :func:`fetal_head.io.hc18.fill_outline`; an outline cut by the image border (e.g. 787_HC) is closed along
  that border first;
- ``pixel_size_and_HC.csv``: the HC18 rows of the images written;
- ``splits.csv`` (``filename, subject, split``): subject-wise ``pool``/``test`` split. By default the 595
  images and the split of the project's development set (``scripts/hc18_splits.csv``, 438 pool / 157 test), so
  results compare with the figures in docs/; ``--all`` writes all 999 images, the other subjects split with the
  same test fraction by a seeded draw (one subject's images always on one side).

Needs the internet: offline it stops with a clear message and exit status 2. With the files already downloaded
by hand, ``--from-dir DIR`` uses them (still checked against Zenodo's MD5 unless ``--skip-checksum``).

Data: T.L.A. van den Heuvel, D. de Bruijn, C.L. de Korte, B. van Ginneken, "Automated measurement of fetal head
circumference using 2D ultrasound images", PLoS ONE 13(8): e0200412, 2018; Zenodo, DOI 10.5281/zenodo.1322001;
licence CC BY 4.0 (the script writes this attribution into the folder's README.md).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECORD = "1322001"
ZIP_NAME = "training_set.zip"
CSV_NAME = "training_set_pixel_size_and_HC.csv"
SPLITS = REPO / "scripts" / "hc18_splits.csv"
NAME_RE = re.compile(r"^(\d{3})_(\d*)HC(_Annotation)?\.png$")
SEED = 0

ATTRIBUTION = """# HC18 training set

Downloaded by `scripts/get_hc18.py` from Zenodo record {record} ({base}/records/{record}).

- T.L.A. van den Heuvel, D. de Bruijn, C.L. de Korte, B. van Ginneken, "Automated measurement of fetal head
  circumference using 2D ultrasound images", PLoS ONE 13(8): e0200412, 2018. doi:10.1371/journal.pone.0200412
- Data: Zenodo, DOI 10.5281/zenodo.1322001
- License: Creative Commons Attribution 4.0 International (CC BY 4.0), https://creativecommons.org/licenses/by/4.0/

Changes: `masks/` are the annotations' ellipse outlines filled (0/255); `splits.csv` is this project's
subject-wise pool/test split. {n} images ({n_pool} pool, {n_test} test).
"""


class GetError(Exception):
    """A failure to report in one line (network, checksum, archive)."""


def fetch(url: str, timeout: float) -> urllib.request.addinfourl:
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers={"User-Agent": "get_hc18"}), timeout=timeout)
    except urllib.error.HTTPError as e:
        raise GetError(f"{url} answered HTTP {e.code} {e.reason}") from e
    except (urllib.error.URLError, OSError) as e:  # offline, DNS, refused, timeout
        reason = getattr(e, "reason", e)
        raise GetError(f"cannot reach {url}: {reason}. HC18 is downloaded from Zenodo, which needs an internet "
                       f"connection (or download {ZIP_NAME} and {CSV_NAME} by hand from "
                       f"https://zenodo.org/records/{RECORD} and pass --from-dir)") from e


def zenodo_md5s(base: str, timeout: float) -> dict:
    """{file name: md5} from the record's JSON (``files[].checksum`` is "md5:<hex>")."""
    url = f"{base}/api/records/{RECORD}"
    with fetch(url, timeout) as resp:
        try:
            record = json.load(resp)
        except ValueError as e:
            raise GetError(f"{url} did not answer JSON: {e}") from e
    files = record.get("files") or []
    if isinstance(files, dict):  # InvenioRDM's {"entries": {...}} form
        files = list((files.get("entries") or {}).values())
    out = {}
    for f in files:
        name, checksum = f.get("key") or f.get("filename"), f.get("checksum", "")
        if name and checksum.startswith("md5:"):
            out[name] = checksum[4:].lower()
    missing = [n for n in (ZIP_NAME, CSV_NAME) if n not in out]
    if missing:
        raise GetError(f"{url} lists no md5 checksum for {', '.join(missing)}")
    return out


def hashes(path: Path) -> tuple:
    md5, sha = hashlib.md5(), hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            md5.update(block)
            sha.update(block)
    return md5.hexdigest(), sha.hexdigest()


def download(base: str, name: str, dst: Path, timeout: float) -> None:
    url = f"{base}/records/{RECORD}/files/{name}?download=1"
    part = dst.with_suffix(dst.suffix + ".part")
    print(f"get_hc18: downloading {url}", flush=True)
    with fetch(url, timeout) as resp, open(part, "wb") as out:
        total = int(resp.headers.get("Content-Length") or 0)
        done = 0
        try:
            for block in iter(lambda: resp.read(1 << 20), b""):
                out.write(block)
                done += len(block)
                if total and sys.stdout.isatty():
                    print(f"\r  {done / 1e6:.0f} / {total / 1e6:.0f} MB", end="", flush=True)
        except OSError as e:
            raise GetError(f"download of {url} broke off after {done} bytes: {e}") from e
    if total and done != total:
        raise GetError(f"{url}: got {done} bytes of {total}")
    part.replace(dst)


def verify(path: Path, expected_md5) -> None:
    md5, sha = hashes(path)
    if expected_md5 is None:
        print(f"get_hc18: {path.name}: checksum NOT verified (--skip-checksum); md5 {md5}, sha256 {sha}")
        return
    if md5 != expected_md5:
        raise GetError(f"{path}: md5 {md5} does not match Zenodo's {expected_md5}: a damaged or different file "
                       f"(delete it and run again)")
    print(f"get_hc18: {path.name}: md5 {md5} matches Zenodo's; sha256 {sha}")


def fill_mask(annotation_png: Path):
    """The repository's fill (:func:`fetal_head.io.hc18.fill_outline`, which closes outlines cut by the border)."""
    from fetal_head.io.hc18 import fill_outline

    try:
        return fill_outline(str(annotation_png))
    except ValueError as e:
        raise GetError(str(e)) from None


def split_all(names: list, fixed: dict) -> dict:
    """{name: (subject, split)}: ``fixed``'s entries as they are; other subjects drawn to the same test fraction."""
    import numpy as np

    out = {n: fixed[n] for n in names if n in fixed}
    subject_split = {subj: split for subj, split in out.values()}
    new_subjects = sorted({str(int(NAME_RE.match(n).group(1))) for n in names if n not in fixed} - set(subject_split))
    test_fraction = sum(s == "test" for _, s in fixed.values()) / max(len(fixed), 1)
    rng = np.random.default_rng(SEED)
    order = rng.permutation(len(new_subjects))
    n_test = int(round(test_fraction * len(new_subjects)))
    for rank, i in enumerate(order):
        subject_split[new_subjects[i]] = "test" if rank < n_test else "pool"
    for n in names:
        if n not in out:
            subj = str(int(NAME_RE.match(n).group(1)))
            out[n] = (subj, subject_split[subj])
    return out


def unpack(zip_path: Path, csv_path: Path, out: Path, all_images: bool, base: str) -> int:
    import numpy as np
    from PIL import Image

    with open(SPLITS, newline="") as f:
        fixed = {r["filename"]: (r["subject"], r["split"]) for r in csv.DictReader(f)}
    with open(csv_path, newline="") as f:
        rows = [r for r in csv.reader(f) if r]
    header, sizes = rows[0], {r[0].strip(): r for r in rows[1:] if r[0].strip().lower().endswith(".png")}
    try:
        archive = zipfile.ZipFile(zip_path)
    except zipfile.BadZipFile as e:
        raise GetError(f"{zip_path} is not a zip archive: {e}") from e
    members = {}
    with archive:
        for info in archive.infolist():
            base_name = os.path.basename(info.filename)
            if NAME_RE.match(base_name) and not info.is_dir():
                members[base_name] = info
        images = sorted(n for n in members if not n.endswith("_Annotation.png"))
        if not all_images:
            images = [n for n in images if n in fixed]
        if not images:
            raise GetError(f"{zip_path} holds no HC18 images (NNN_HC.png)")
        splits = split_all(images, fixed)
        tmp = Path(tempfile.mkdtemp(prefix=".hc18-", dir=out.parent))
        try:
            for sub in ("images", "annotations", "masks"):
                (tmp / sub).mkdir()
            for i, name in enumerate(images):
                stem = name[:-4]
                (tmp / "images" / name).write_bytes(archive.read(members[name]))
                ann_name = f"{stem}_Annotation.png"
                if ann_name not in members:
                    raise GetError(f"{zip_path} has {name} but no {ann_name}")
                ann = tmp / "annotations" / ann_name
                ann.write_bytes(archive.read(members[ann_name]))
                Image.fromarray(fill_mask(ann).astype(np.uint8) * 255).save(tmp / "masks" / f"{stem}_Mask.png")
                if (i + 1) % 100 == 0:
                    print(f"get_hc18: {i + 1} / {len(images)} images", flush=True)
            missing = [n for n in images if n not in sizes]
            if missing:
                raise GetError(f"{csv_path} has no pixel size for {', '.join(missing[:5])}")
            with open(tmp / "pixel_size_and_HC.csv", "w", newline="") as f:
                w = csv.writer(f, lineterminator="\n")
                w.writerow(header)
                w.writerows(sizes[n] for n in images)
            with open(tmp / "splits.csv", "w", newline="") as f:
                w = csv.writer(f, lineterminator="\n")
                w.writerow(["filename", "subject", "split"])
                w.writerows([n, *splits[n]] for n in images)
            n_test = sum(splits[n][1] == "test" for n in images)
            (tmp / "README.md").write_text(ATTRIBUTION.format(record=RECORD, base=base, n=len(images),
                                                               n_pool=len(images) - n_test, n_test=n_test))
            tmp.replace(out)  # out is absent or empty (checked before downloading)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return len(images)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REPO / ".data" / "hc18", help="HC18-style folder to write (default .data/hc18)")
    p.add_argument("--all", action="store_true", help="all 999 images, not only the 595 of the development set")
    p.add_argument("--base-url", default="https://zenodo.org", help="Zenodo's address (default https://zenodo.org)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the server (default 30)")
    p.add_argument("--from-dir", type=Path, help=f"use {ZIP_NAME} and {CSV_NAME} already downloaded into this folder")
    p.add_argument("--skip-checksum", action="store_true", help="with --from-dir: don't ask Zenodo for the md5s")
    p.add_argument("--keep-downloads", action="store_true", help="keep the downloaded zip and CSV in OUT/../.hc18-download")
    args = p.parse_args(argv)
    base = args.base_url.rstrip("/")
    out = args.out.resolve()
    try:
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise GetError(f"{out} already exists and is not empty: delete it or choose another --out")
        out.parent.mkdir(parents=True, exist_ok=True)
        md5s = None if (args.skip_checksum and args.from_dir) else zenodo_md5s(base, args.timeout)
        if args.from_dir:
            downloads = args.from_dir
        else:
            downloads = out.parent / ".hc18-download"
            downloads.mkdir(exist_ok=True)
        for name in (ZIP_NAME, CSV_NAME):
            path = downloads / name
            if not path.is_file():
                if args.from_dir:
                    raise GetError(f"{path} not found")
                download(base, name, path, args.timeout)
            verify(path, None if md5s is None else md5s[name])
        if out.is_dir():
            out.rmdir()  # empty: replaced by the finished folder
        n = unpack(downloads / ZIP_NAME, downloads / CSV_NAME, out, args.all, base)
        if not (args.from_dir or args.keep_downloads):
            shutil.rmtree(downloads, ignore_errors=True)
    except GetError as e:
        print(f"get_hc18: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("get_hc18: interrupted", file=sys.stderr)
        return 130
    print(f"get_hc18: {n} images in {out}; run the tests on it with HC18_DIR={out}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "apps" / "fetal_head" / "lib"))  # fetal_head without installation too
    sys.exit(main())
