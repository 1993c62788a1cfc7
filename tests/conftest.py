"""Shared fixtures: the real HC18 data beside the checkout, and a real `monailabel start_server` subprocess."""

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
import requests

REPO = Path(__file__).resolve().parents[1]
APP_DIR = REPO / "apps" / "fetal_head"
HC18 = Path(os.environ.get("HC18_DIR", REPO.parent / "shared" / "data" / "hc18"))

sys.path.insert(0, str(APP_DIR / "lib"))  # the domain package works without installation too


def dice(a, b) -> float:
    """Dice through MONAI's metric, on binary masks of the same shape."""
    import torch
    from monai.metrics import compute_dice

    ta = torch.as_tensor(np.asarray(a) > 0, dtype=torch.float32)[None, None]
    tb = torch.as_tensor(np.asarray(b) > 0, dtype=torch.float32)[None, None]
    return float(compute_dice(ta, tb, include_background=True, ignore_empty=False)[0, 0])


@pytest.fixture(scope="session")
def hc18():
    if not (HC18 / "images").is_dir():
        pytest.fail(f"HC18 data not found at {HC18} (set HC18_DIR)")
    from fetal_head.hc18 import read_cases

    return read_cases(str(HC18))


def test_split(cases, split, n, seed=0):
    """n cases of a split, drawn with a fixed seed (deterministic across runs)."""
    pool = [c for c in cases if c.split == split]
    rng = np.random.default_rng(seed)
    return [pool[i] for i in sorted(rng.choice(len(pool), size=n, replace=False))]


test_split.__test__ = False  # a helper, not a test


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
        for k, v in conf:
            cmd += ["--conf", k, v]
        self.log = log
        self._logf = open(log, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._logf, stderr=subprocess.STDOUT, env=env, start_new_session=True)
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
