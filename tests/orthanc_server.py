"""A real Orthanc PACS with the DICOMweb plugin, started for a test on free loopback ports and stopped after it.

    with OrthancServer(tmp_path) as orthanc:
        orthanc.upload(["a.dcm", "b.dcm"])
        ... monailabel start_server --studies orthanc.dicomweb_url ...

Uses Debian's `orthanc` and `orthanc-dicomweb` packages (`scripts/install_system_deps.sh` installs them). Storage,
index and config live under the given folder; no authentication, remote access refused, so nothing here is
reachable from outside the machine.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional

import requests

INSTALL_HINT = "install it with `sudo scripts/install_system_deps.sh` (Debian packages orthanc, orthanc-dicomweb)"
# where Debian's orthanc-dicomweb package puts the plugin (`dpkg -L orthanc-dicomweb`)
DICOMWEB_PLUGIN_CANDIDATES = (
    "/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
    "/usr/lib/orthanc/libOrthancDicomWeb.so",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _find_dicomweb_plugin() -> str:
    for path in DICOMWEB_PLUGIN_CANDIDATES:
        if os.path.exists(path):
            return path
    for path in sorted(Path("/usr/lib/orthanc").glob("libOrthancDicomWeb.so*")):
        return str(path)
    raise RuntimeError(f"Orthanc's DICOMweb plugin (libOrthancDicomWeb.so) was not found: {INSTALL_HINT}")


class OrthancServer:
    """One Orthanc process; `.url` (REST API), `.dicomweb_url` (DICOMweb root for `--studies`)."""

    def __init__(self, tmp_dir, http_port: Optional[int] = None, dicom_port: Optional[int] = None,
                 start: bool = True, timeout: float = 60):
        self.binary = shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if os.path.exists("/usr/sbin/Orthanc") else None)
        if not self.binary:
            raise RuntimeError(f"the Orthanc binary was not found: {INSTALL_HINT}")
        self.dir = Path(tmp_dir).resolve() / "orthanc"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.http_port = http_port or _free_port()
        self.dicom_port = dicom_port or _free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.dicomweb_url = f"{self.url}/dicom-web"
        self.config_path = self.dir / "orthanc.json"
        self.log_path = self.dir / "orthanc.log"
        self.timeout = timeout
        self.proc: Optional[subprocess.Popen] = None
        self._logf = None
        self.write_config()
        if start:
            self.start()

    def write_config(self):
        storage = self.dir / "storage"
        storage.mkdir(exist_ok=True)
        config = {
            "Name": "fetal-head-test",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": "ORTHANC",
            "RemoteAccessAllowed": False,  # loopback clients only
            "AuthenticationEnabled": False,
            "Plugins": [_find_dicomweb_plugin()],
            "DicomWeb": {
                "Enable": True,
                "Root": "/dicom-web/",
                "EnableWado": True,
                "WadoRoot": "/wado",
                "Host": f"127.0.0.1:{self.http_port}",
                "Ssl": False,
                "StudiesMetadata": "Full",
                "SeriesMetadata": "Full",
            },
            "OverwriteInstances": False,  # a second upload of the same SOP instance never replaces the first
            "SaveJobs": False,
            "StableAge": 2,
            "ConcurrentJobs": 1,
            "HttpThreadsCount": 10,
        }
        self.config_path.write_text(json.dumps(config, indent=2))

    def start(self):
        self._logf = open(self.log_path, "ab")
        self.proc = subprocess.Popen([self.binary, str(self.config_path)], stdout=self._logf,
                                     stderr=subprocess.STDOUT, cwd=self.dir, start_new_session=True)
        deadline = time.time() + self.timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited ({self.proc.returncode}):\n{self.log_tail()}")
            try:
                if requests.get(f"{self.url}/system", timeout=2).ok:
                    plugins = requests.get(f"{self.url}/plugins", timeout=5).json()
                    if "dicom-web" not in plugins:
                        self.stop()
                        raise RuntimeError(f"Orthanc started without its DICOMweb plugin ({plugins}): {INSTALL_HINT}")
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer on {self.url}/system within {self.timeout} s:\n{self.log_tail()}")

    def log_tail(self, n: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-n:] if self.log_path.exists() else ""

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        if self._logf:
            self._logf.close()
            self._logf = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    # ---- REST helpers ----

    def upload(self, paths: Iterable) -> List[Dict]:
        """POST each DICOM file to /instances; returns Orthanc's answers (ID, ParentSeries, Status...)."""
        answers = []
        for path in paths:
            resp = requests.post(f"{self.url}/instances", data=Path(path).read_bytes(), timeout=60)
            if not resp.ok:
                raise RuntimeError(f"Orthanc refused {path}: {resp.status_code} {resp.text[:500]}")
            answers.append(resp.json())
        return answers

    def instances(self) -> List[str]:
        return requests.get(f"{self.url}/instances", timeout=30).json()

    def instance_file(self, orthanc_id: str) -> bytes:
        resp = requests.get(f"{self.url}/instances/{orthanc_id}/file", timeout=60)
        resp.raise_for_status()
        return resp.content

    def instance_tags(self, orthanc_id: str) -> Dict:
        return requests.get(f"{self.url}/instances/{orthanc_id}/simplified-tags", timeout=30).json()

    def snapshot(self) -> Dict[str, str]:
        """Orthanc ID -> MD5 of the stored file, for every instance: compare two snapshots to prove nothing changed."""
        return {i: hashlib.md5(self.instance_file(i)).hexdigest() for i in self.instances()}


@contextlib.contextmanager
def pacs_with_app_server(tmp: Path, files: Iterable):
    """Orthanc holding ``files``, and the app's real server reading it over DICOMweb: yields (orthanc, server)."""
    from conftest import Server, make_app_copy

    try:
        orthanc = OrthancServer(tmp)
    except RuntimeError as e:
        raise RuntimeError(f"cannot start Orthanc ({e}): {INSTALL_HINT}") from e
    server = None
    try:
        orthanc.upload(list(files))
        server = Server(orthanc.dicomweb_url, make_app_copy(tmp), tmp / "server.log",
                        env={"MONAI_LABEL_DICOMWEB_CACHE_PATH": str(tmp / "dicomweb_cache")})
        yield orthanc, server
    finally:
        if server is not None:
            server.stop()
        orthanc.stop()
