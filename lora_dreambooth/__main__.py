"""`python -m lora_dreambooth ...` (also what `accelerate launch -m lora_dreambooth` runs)."""
from .cli import main

main()
