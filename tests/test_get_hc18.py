"""scripts/get_hc18.py: fails clearly offline; unpacks an HC18 archive (outlines filled into masks) into an
HC18-style folder that read_cases reads, with the project's subject-wise split."""

import csv
import subprocess
import sys
import zipfile

import pytest

from conftest import HC18_SUBSET, REPO

SCRIPT = REPO / "scripts" / "get_hc18.py"


def run(*args, timeout=60):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def test_offline_fails_with_a_clear_message(tmp_path):
    out = run("--base-url", "http://127.0.0.1:9/", "--timeout", "5", "--out", tmp_path / "hc18")
    assert out.returncode == 2, out
    assert "get_hc18: error: cannot reach http://127.0.0.1:9/api/records/1322001" in out.stderr
    assert "internet connection" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "hc18").exists()


def test_refuses_to_overwrite_a_folder(tmp_path):
    (tmp_path / "hc18").mkdir()
    (tmp_path / "hc18" / "keep.txt").write_text("mine")
    out = run("--base-url", "http://127.0.0.1:9/", "--timeout", "5", "--out", tmp_path / "hc18")
    assert out.returncode == 2 and "already exists and is not empty" in out.stderr
    assert (tmp_path / "hc18" / "keep.txt").read_text() == "mine"


def test_unpacks_an_hc18_archive_and_fills_outlines(tmp_path):
    from fetal_head.io.hc18 import read_cases

    # an archive laid out like Zenodo's training_set.zip, from the two annotated images of the shipped subset
    # (787_HC's outline is cut by the image's top border) plus one image that is not in the development set
    annotated = {c.image_id: c for c in read_cases(str(HC18_SUBSET)) if c.annotation_path}
    assert {"012_HC", "787_HC"} <= set(annotated)
    src = {k: annotated[k] for k in ("012_HC", "787_HC")}
    dl = tmp_path / "dl"
    dl.mkdir()
    with zipfile.ZipFile(dl / "training_set.zip", "w") as z:
        for stem, c in [*src.items(), ("998_HC", src["012_HC"])]:
            z.write(c.image_path, f"training_set/{stem}.png")
            z.write(c.annotation_path, f"training_set/{stem}_Annotation.png")
    with open(dl / "training_set_pixel_size_and_HC.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filename", "pixel size(mm)", "head circumference (mm)"])
        for stem, c in [*src.items(), ("998_HC", src["012_HC"])]:
            w.writerow([f"{stem}.png", c.pixel_size_mm, c.hc_mm])

    out = run("--from-dir", dl, "--skip-checksum", "--out", tmp_path / "dev")
    assert out.returncode == 0, out.stderr
    assert "checksum NOT verified" in out.stdout
    dev = {c.image_id: c for c in read_cases(str(tmp_path / "dev"))}
    assert set(dev) == {"012_HC", "787_HC"}  # 998_HC is not in the 595-image development set
    for stem, c in dev.items():
        assert (c.split, c.subject) == (src[stem].split, src[stem].subject)
        assert c.pixel_size_mm == src[stem].pixel_size_mm and c.hc_mm == src[stem].hc_mm
        filled, ref = c.load_mask(), src[stem].load_mask()
        assert 2 * (filled & ref).sum() / (filled.sum() + ref.sum()) > 0.99, stem
    assert "CC BY 4.0" in (tmp_path / "dev" / "README.md").read_text()

    out = run("--from-dir", dl, "--skip-checksum", "--all", "--out", tmp_path / "all")
    assert out.returncode == 0, out.stderr
    every = {c.image_id: c for c in read_cases(str(tmp_path / "all"))}
    assert set(every) == {"012_HC", "787_HC", "998_HC"}
    assert every["998_HC"].split in ("pool", "test") and every["998_HC"].subject == "998"


def test_checksum_mismatch_is_an_error(tmp_path):
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import get_hc18
    finally:
        sys.path.remove(str(REPO / "scripts"))
    f = tmp_path / "training_set.zip"
    f.write_bytes(b"not the archive")
    with pytest.raises(get_hc18.GetError, match="does not match Zenodo"):
        get_hc18.verify(f, "0" * 32)
    get_hc18.verify(f, __import__("hashlib").md5(b"not the archive").hexdigest())
