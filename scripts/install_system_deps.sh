#!/usr/bin/env bash
# System packages the tests need beyond the Python venv (Debian/Ubuntu, run as root or with sudo):
#   orthanc, orthanc-dicomweb   a real PACS with DICOMweb for the DICOMweb datastore tests and `make orthanc-demo`
#   chromium, chromium-driver   a headless browser for the OHIF viewer test
#   fonts-liberation            fonts for that browser's screenshots
#   dicom3tools                 dciodvfy, the DICOM validator the DICOM writer tests check our files with
# Idempotent: does nothing when all are installed. The tests start their own Orthanc on free loopback ports, so a
# system Orthanc service that the package may start is stopped to keep port 8042 free for the demo.
set -euo pipefail

PACKAGES=(orthanc orthanc-dicomweb chromium chromium-driver fonts-liberation dicom3tools)

missing=()
for p in "${PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$p")
    fi
done
if [ ${#missing[@]} -eq 0 ]; then
    echo "system packages already installed: ${PACKAGES[*]}"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi

echo "installing system packages: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
# another apt run (e.g. unattended upgrades) may hold the locks: wait for it rather than fail
APT_WAIT=(-o DPkg::Lock::Timeout=600)
for attempt in 1 2 3 4 5 6 7 8 9 10; do
    if $SUDO apt-get "${APT_WAIT[@]}" update -qq; then break; fi
    [ "$attempt" -eq 10 ] && exit 1
    sleep 30
done
# policy-rc.d exit 101: keep Debian from auto-starting the Orthanc service during install
policy=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
    $SUDO chmod +x "$policy"
    created_policy=1
    trap '$SUDO rm -f "$policy"' EXIT  # never leave services blocked, even if interrupted
fi
status=0
$SUDO apt-get "${APT_WAIT[@]}" install -y -qq "${missing[@]}" >/dev/null || status=$?
if [ "$status" -ne 0 ]; then
    echo "apt-get install failed (exit $status)" >&2
    exit "$status"
fi
# If a system Orthanc service runs anyway (e.g. installed earlier), stop it: tests and the demo run their own.
if command -v service >/dev/null 2>&1 && pgrep -x Orthanc >/dev/null 2>&1; then
    $SUDO service orthanc stop >/dev/null 2>&1 || true
fi
echo "installed: ${missing[*]}"
