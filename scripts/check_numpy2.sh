#!/usr/bin/env bash
# Runs the biometry tests under numpy 2.x in a small side environment (numpy, scipy, scikit-image, pillow,
# pytest, and pydicom < 3 because the HC18 reader's package `fetal_head.io` imports it; no torch, no monailabel,
# which today pin numpy < 2).
#
# The app's own venv keeps numpy 1.x because monailabel 0.8.5 requires it; the next monailabel will not, and
# scikit-image's EllipseModel broke on numpy 2 (TypeError, complex phi) — this is the check that biometry.py
# does not depend on that path. The side venv lives in .data/np2venv (gitignored) and is created when missing.
#
# Usage: scripts/check_numpy2.sh [pytest args...]      (default: tests/test_biometry.py -q)
# HC18_DIR / ../shared/data/hc18 are used when present, as in the main suite; without them the 595-image
# check skips and the rest runs on tests/data/hc18_subset.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
VENV=${NP2_VENV:-.data/np2venv}
STAMP="$VENV/.setup-done"
if [ ! -f "$STAMP" ]; then
  echo "check_numpy2: creating $VENV (numpy>=2, scipy, scikit-image, pillow, pydicom<3, pytest, pytest-timeout)"
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q "numpy>=2" scipy scikit-image pillow "pydicom<3" pytest pytest-timeout \
    2> >(grep -v "WARNING: Location" >&2)
  touch "$STAMP"
fi
"$VENV/bin/python" - <<'EOF'
import numpy, scipy, skimage, sys
print(f"check_numpy2: python {sys.version.split()[0]}, numpy {numpy.__version__}, scipy {scipy.__version__}, "
      f"scikit-image {skimage.__version__}")
if int(numpy.__version__.split(".")[0]) < 2:
    sys.exit("check_numpy2: the side venv has numpy < 2; remove it and rerun")
EOF
if [ $# -eq 0 ]; then
  set -- tests/test_biometry.py -q
fi
# -p no:cacheprovider: don't share .pytest_cache with the main venv's runs
PYTHONPATH=apps/fetal_head/lib exec "$VENV/bin/python" -m pytest -p no:cacheprovider "$@"
