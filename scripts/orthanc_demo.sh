#!/usr/bin/env bash
# Try the app on a PACS: a loopback Orthanc with DICOMweb on http://127.0.0.1:8042 holding the sample images as
# calibrated US DICOM, and the command that starts MONAI Label on it.
#   make orthanc-demo                 (or: bash scripts/orthanc_demo.sh)
# Orthanc runs in the foreground until Ctrl-C; its storage stays in .data/orthanc_demo (delete it to start over).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DIR=${ORTHANC_DEMO_DIR:-.data/orthanc_demo}
PORT=${ORTHANC_PORT:-8042}

if ! command -v Orthanc >/dev/null && [ ! -x /usr/sbin/Orthanc ]; then
    echo "Orthanc is not installed: run 'sudo scripts/install_system_deps.sh' first" >&2
    exit 1
fi
if [ ! -d "$DIR/dicom" ]; then  # once: new UIDs on every run would duplicate the studies
    "$PY" scripts/png_to_dicom.py apps/fetal_head/sample_data "$DIR/dicom"
fi

exec "$PY" - "$DIR" "$PORT" <<'PYEOF'
import signal, sys, time
from pathlib import Path

sys.path.insert(0, "tests")  # the same Orthanc launcher the tests use
from orthanc_server import OrthancServer

directory, port = Path(sys.argv[1]), int(sys.argv[2])
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
orthanc = OrthancServer(directory, http_port=port)
try:
    answers = orthanc.upload(sorted((directory / "dicom").glob("*.dcm")))
    print(f"Orthanc {orthanc.url} (DICOMweb {orthanc.dicomweb_url}) holds {len(orthanc.instances())} instances "
          f"({sum(a['Status'] == 'Success' for a in answers)} new); log: {orthanc.log_path}")
    print("\nIn another terminal:\n  source .venv/bin/activate\n"
          f"  OMP_WAIT_POLICY=PASSIVE monailabel start_server --app apps/fetal_head --studies {orthanc.dicomweb_url} --host 127.0.0.1 --port 8000\n"
          "then open http://127.0.0.1:8000/ohif/ or connect 3D Slicer. Ctrl-C here stops Orthanc.")
    while orthanc.proc.poll() is None:
        time.sleep(1)
    print(f"Orthanc exited:\n{orthanc.log_tail()}")
except KeyboardInterrupt:
    pass
finally:
    orthanc.stop()
PYEOF
