#!/usr/bin/env bash
# Creates ./.venv with the exact CI versions (constraints-ci.txt) and installs lora-dreambooth into it.
# torch goes first, pinned: on these machines `torch==2.13.0` is a local CPU build, while a bare `torch`
# requirement would pull a multi-GB CUDA build. On your own GPU box, install your CUDA torch first instead.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
EXTRAS="${EXTRAS:-test}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -c constraints-ci.txt -e ".[${EXTRAS}]"
