"""`python -m lora_dreambooth ...` (also what `accelerate launch -m lora_dreambooth` runs)."""
from lora_dreambooth.cli import run

run()
