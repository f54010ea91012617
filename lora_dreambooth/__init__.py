"""lora-dreambooth: DreamBooth for Stable Diffusion v1.x with small PEFT adapters."""
__version__ = "0.1.0"
