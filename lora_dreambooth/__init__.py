"""lora-dreambooth: DreamBooth for Stable Diffusion v1.x with small PEFT adapters."""
__version__ = "0.1.0"

from .config import TrainConfig  # noqa: E402


def train(config: TrainConfig):
    """Run a training job; see :func:`lora_dreambooth.training.train`."""
    from .training import train as _train

    return _train(config)


__all__ = ["TrainConfig", "train", "__version__"]
