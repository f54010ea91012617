#!/usr/bin/env bash
# The main job on a fresh machine: install into ./.venv, then the offline demo: the shipped synthetic base learns
# the synthetic subject (about a minute on 2 CPU cores); demo-output/comparison.png shows base vs adapter.
# Pass a real base to train it on the bundled dog photos instead:
#   bash scripts/demo.sh --base stable-diffusion-v1-5/stable-diffusion-v1-5 --resolution 512
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=app bash scripts/install.sh
. .venv/bin/activate
exec lora-dreambooth demo --out demo-output "$@"
