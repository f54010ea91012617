#!/usr/bin/env bash
# The main job on a fresh machine: install, then the offline demo (tiny built-in base, bundled dog photos).
# Pass a real base to train on it instead:  bash scripts/demo.sh --base runwayml/stable-diffusion-v1-5 --resolution 512
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=app bash scripts/install.sh
. .venv/bin/activate
exec lora-dreambooth demo --out demo-output "$@"
