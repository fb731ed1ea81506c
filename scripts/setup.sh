#!/usr/bin/env bash
# Installs everything autosplit needs on a fresh Debian machine: system packages, then Python
# packages. Safe to run again (already-installed packages are skipped quickly).
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
# dataset-fashion-mnist: the default dataset, offline. postgresql: the server the distributed
# search test starts on loopback.
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends dataset-fashion-mnist postgresql >/dev/null

PY="${PYTHON:-python3}"
# torch first and pinned: on this kind of machine these wheels are on local disk; a bare
# `torch` requirement would otherwise pull a multi-GB build from the index.
"$PY" -m pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
"$PY" -m pip install -q --disable-pip-version-check -e '.[test,postgres,dashboard,onnx]'
