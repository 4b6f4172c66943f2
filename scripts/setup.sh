#!/usr/bin/env bash
# Sets a fresh Debian machine up for pyexec, as root: system tools, a venv, the native build.
# Idempotent: a second run only rebuilds the package.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}

need=()
command -v mkfs.xfs >/dev/null || need+=(xfsprogs)
command -v mkfs.btrfs >/dev/null || need+=(btrfs-progs)
command -v fsfreeze >/dev/null || need+=(util-linux)
command -v losetup >/dev/null || need+=(mount)
command -v gcc >/dev/null || need+=(gcc)
command -v make >/dev/null || need+=(make)
python3 -c 'import ensurepip, venv' 2>/dev/null || need+=(python3-venv)
if ((${#need[@]})); then
    echo "setup: installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${need[@]}" >/dev/null
fi

if [ ! -x "$VENV/bin/python" ]; then
    echo "setup: creating $VENV"
    python3 -m venv "$VENV"
fi
"$VENV/bin/pip" install -q --disable-pip-version-check -r requirements-dev.txt
# A clean build each time: setuptools does not notice every change to the static core.
rm -rf build
"$VENV/bin/pip" install -q --disable-pip-version-check --no-build-isolation --no-deps .
case $VENV in /*) PY=$VENV/bin/python ;; *) PY=$PWD/$VENV/bin/python ;; esac
echo "setup: pyexec built ($(cd / && "$PY" -c 'from pyexec import native; print(", ".join(native.available()))') backends)"
