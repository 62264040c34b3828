#!/usr/bin/env bash
# Set up everything cag-node needs on a fresh Debian machine (idempotent):
# the DICOM peers (dcmtk, Orthanc, dicom3tools) and headless Chromium with CJK
# fonts (the web face's browser tests and screenshots), and the PostgreSQL server (the journal
# tests start a throw-away cluster of their own with it) from apt, and a virtual
# environment in .venv with the project and its pinned dependencies.
#   EXTRAS=dev (default) | train | vlm | ""  selects the pip extras.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${EXTRAS-dev}"

need_apt=0
for tool in storescu storescp echoscu dsrdump dsr2html dciodvfy Orthanc curl chromium; do
  command -v "$tool" >/dev/null 2>&1 || need_apt=1
done
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need_apt=1
if [ "$need_apt" = 1 ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  echo "== installing dcmtk, orthanc, dicom3tools, chromium, postgresql (apt)"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    dcmtk orthanc dicom3tools curl chromium fonts-noto-cjk postgresql >/dev/null
fi

PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv"
  "$PY" -m venv .venv
  .venv/bin/pip install -q -U pip
fi
spec="."
[ -n "$EXTRAS" ] && spec=".[${EXTRAS}]"
stamp=".venv/.cag-node-installed-${EXTRAS:-core}"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "== pip install -e '$spec' (first time: several minutes, torch is large)"
  .venv/bin/pip install -q -e "$spec"
  touch "$stamp"
fi
