"""Shared fixtures: HC18 data (the full set beside the checkout when present, else the subset in tests/data), and
a real `monailabel start_server` subprocess.

HC18 data:
- ``hc18``: the full 595-image set from ``HC18_DIR``, ``.data/hc18`` (scripts/get_hc18.py) or
  ``../shared/data/hc18`` when it is there, else the 136-image subset shipped in ``tests/data/hc18_subset``
  (73 test-split, 63 pool-split images). Most tests use this.
- ``full_hc18``: the full set, or the test is skipped with one line saying why (no traceback).
- ``hc18_subset``: always the shipped subset.
Only numpy and pytest are imported here at module level, so tests that need nothing else (tests/test_biometry.py)
also run in the small numpy-2 side environment of scripts/check_numpy2.sh.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
APP_DIR = REPO / "apps" / "fetal_head"
if os.environ.get("HC18_DIR"):
    HC18_FULL = Path(os.environ["HC18_DIR"])
elif (REPO / ".data" / "hc18" / "images").is_dir():  # where scripts/get_hc18.py writes by default
    HC18_FULL = REPO / ".data" / "hc18"
else:
    HC18_FULL = REPO.parent / "shared" / "data" / "hc18"
HC18_SUBSET = REPO / "tests" / "data" / "hc18_subset"
HAVE_FULL_HC18 = (HC18_FULL / "images").is_dir()
HC18 = HC18_FULL if HAVE_FULL_HC18 else HC18_SUBSET  # the folder the ``hc18`` fixture reads
FULL_HC18_MISSING = (f"needs the full HC18 set (595 images), not found at {HC18_FULL}: set HC18_DIR or run "
                     f"scripts/get_hc18.py")

sys.path.insert(0, str(APP_DIR / "lib"))  # the domain package works without installation too

# As the Makefile sets it for `make test`: torch's OpenMP threads sleep rather than spin between parallel regions,
# so two test workers, or a server and its training subprocess, do not steal each other's cores. Set before any
# test imports torch (OpenMP reads it then); the servers and training processes the tests start inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# Seconds each module took one after another (2-core CPU, 2026-11-27, `pytest --durations=0`). With test workers
# (`make test`: pytest-xdist, a file to a worker) the longest files start first, so that the last file to finish is
# a short one; a module not listed runs after these, in collection order.
MODULE_SECONDS = {"test_training.py": 361, "test_localiser.py": 480, "test_synthesis.py": 147,
                  "test_benchmark.py": 88, "test_slicer_protocol.py": 78, "test_ohif.py": 67,
                  "test_activelearning.py": 62, "test_server_e2e.py": 57, "test_sam.py": 43, "test_dicomweb.py": 40,
                  "test_security.py": 34, "test_robustness.py": 26, "test_biometry.py": 25}


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: -MODULE_SECONDS.get(item.path.name, 0))  # stable: a module's own order is kept


def dice(a, b) -> float:
    """Dice through MONAI's metric, on binary masks of the same shape."""
    import torch
    from monai.metrics import compute_dice

    ta = torch.as_tensor(np.asarray(a) > 0, dtype=torch.float32)[None, None]
    tb = torch.as_tensor(np.asarray(b) > 0, dtype=torch.float32)[None, None]
    return float(compute_dice(ta, tb, include_background=True, ignore_empty=False)[0, 0])


def png_bytes(array) -> bytes:
    """An 8-bit array as PNG bytes (labels and images to upload)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def read_hc18(folder: Path):
    from fetal_head.io.hc18 import read_cases

    return read_cases(str(folder))


def pytest_report_header(config):
    if HAVE_FULL_HC18:
        return f"HC18: full set at {HC18_FULL}"
    return f"HC18: full set not found at {HC18_FULL}; using the subset {HC18_SUBSET} (full-set tests skip)"


@pytest.fixture(scope="session")
def hc18_subset():
    """The 36-image HC18 subset shipped in tests/data (always there)."""
    return read_hc18(HC18_SUBSET)


@pytest.fixture(scope="session")
def hc18(hc18_subset):
    """The full HC18 set when it is beside the checkout (or at HC18_DIR), else the shipped subset."""
    return read_hc18(HC18_FULL) if HAVE_FULL_HC18 else hc18_subset


@pytest.fixture(scope="session")
def full_hc18():
    """The full HC18 set (the 595-image development set; 999 images after ``get_hc18.py --all``); skips the
    test (one line, with the reason) when it is absent."""
    if not HAVE_FULL_HC18:
        pytest.skip(FULL_HC18_MISSING)
    return read_hc18(HC18_FULL)


SPLITS_CSV = REPO / "scripts" / "hc18_splits.csv"  # the full set's subject-wise split (595 images)

# Every (split, n, seed) draw the tests make; tests/data/make_hc18_subset.py puts each drawn image into the subset,
# so a clone without the full set draws the very same images as CI does with it.
TEST_DRAWS = [("pool", 1, 11), ("pool", 2, 5), ("pool", 2, 11), ("pool", 3, 4), ("pool", 4, 8), ("pool", 5, 4),
              ("pool", 5, 9), ("pool", 6, 8), ("pool", 8, 3), ("pool", 9, 5), ("pool", 10, 2),
              ("test", 2, 7), ("test", 2, 12), ("test", 2, 13), ("test", 3, 3), ("test", 3, 5), ("test", 3, 11),
              ("test", 4, 3), ("test", 5, 3), ("test", 6, 0), ("test", 12, 1), ("test", 16, 2), ("test", 20, 3)]


def drawn_names(split, n, seed=0):
    """The file names of n images of a split, drawn with a fixed seed over the FULL set's split (scripts/
    hc18_splits.csv, sorted by name, as read_cases orders them): the same names whichever set is loaded."""
    import csv

    with open(SPLITS_CSV, newline="") as f:
        names = sorted(r["filename"] for r in csv.DictReader(f) if r["split"] == split)
    rng = np.random.default_rng(seed)
    return [names[i] for i in sorted(rng.choice(len(names), size=min(n, len(names)), replace=False))]


def test_split(cases, split, n, seed=0):
    """n cases of a split, drawn with a fixed seed (deterministic across runs, identical on the full set and on
    the in-repo subset, which holds every image the tests draw: ``TEST_DRAWS``)."""
    by_name = {c.name: c for c in cases if c.split == split}
    names = drawn_names(split, n, seed)
    missing = [m for m in names if m not in by_name]
    if missing:
        pytest.skip(f"needs {split}-split HC18 images {missing[:3]}... not in the loaded set: {FULL_HC18_MISSING}")
    return [by_name[m] for m in names]


test_split.__test__ = False  # a helper, not a test


def run_script(script: Path, *args) -> int:
    """A script of scripts/ as a program (its own argument parsing and exit status), in this process; its exit
    status. A subprocess would spend ~10 s of CI importing torch and monai again."""
    import runpy

    argv, sys.argv = sys.argv, [str(script), *map(str, args)]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as e:
        return 0 if e.code is None else e.code
    finally:
        sys.argv = argv
    return 0


# One folder of image embeddings for every server of a test run, both pytest-xdist workers included (the first
# process to configure names it; workers inherit it). Embeddings are keyed by the encoder's weights and the pixels
# (fetal_head.segmentation.embedding_cache), so sharing is safe, and it is what a user's server does across restarts;
# a test that counts encoder runs passes its own folder. Removed when the run ends.
SHARED_EMBEDDINGS_ENV = "FETAL_HEAD_TEST_EMBEDDINGS"


def pytest_configure(config):
    if not os.environ.get(SHARED_EMBEDDINGS_ENV):
        import tempfile

        os.environ[SHARED_EMBEDDINGS_ENV] = tempfile.mkdtemp(prefix="fetal_head_embeddings_")
        config._fetal_head_embeddings = os.environ[SHARED_EMBEDDINGS_ENV]


def pytest_unconfigure(config):
    folder = getattr(config, "_fetal_head_embeddings", None)
    if folder:
        shutil.rmtree(folder, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, studies: Path, model_dir_app: Path, log: Path, conf=(), env=None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, **(env or {})}  # e.g. MONAI_LABEL_DICOMWEB_CACHE_PATH for a DICOMweb datastore
        venv_bin = Path(sys.executable).parent
        env["PATH"] = f"{venv_bin}{os.pathsep}{env.get('PATH', '')}"  # the monailabel script runs `python`
        env["MONAI_LABEL_DATASTORE_AUTO_RELOAD"] = "false"
        cmd = [str(venv_bin / "monailabel"), "start_server", "--app", str(model_dir_app), "--studies", str(studies),
               "--host", "127.0.0.1", "--port", str(self.port)]
        for k, v in {"embedding_cache_dir": os.environ[SHARED_EMBEDDINGS_ENV], **dict(conf)}.items():
            cmd += ["--conf", k, v]
        self.log = log
        self._logf = open(log, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._logf, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        import requests

        deadline = time.time() + 180
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}):\n{log.read_text()[-4000:]}")
            try:
                if requests.get(f"{self.url}/info/", timeout=5).ok:
                    return
            except requests.RequestException:
                pass
            time.sleep(1)
        self.stop()
        raise RuntimeError(f"server did not start:\n{log.read_text()[-4000:]}")

    def alive(self) -> bool:
        import requests

        return self.proc.poll() is None and requests.get(f"{self.url}/info/", timeout=30).ok

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        self._logf.close()


def make_app_copy(tmp: Path) -> Path:
    """A copy of the app folder, so a test's model/ and logs/ never touch the checkout's."""
    dst = tmp / "fetal_head_app"
    shutil.copytree(APP_DIR, dst, ignore=shutil.ignore_patterns("model", "logs", "__pycache__", "*.egg-info"))
    return dst
