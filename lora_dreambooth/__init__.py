"""lora-dreambooth: DreamBooth for Stable Diffusion v1.x with small PEFT adapters."""
__version__ = "0.1.0"

from .config import TrainConfig  # noqa: E402


def train(config: TrainConfig):
    """Run a training job; see :func:`lora_dreambooth.training.train`."""
    from .training import train as _train

    return _train(config)


def load_adapter(pipe, path, name=None, *, allow_pickle=False) -> str:
    """Load an adapter into a diffusers pipeline with checks; see :func:`lora_dreambooth.inference.load_adapter`."""
    from .inference import load_adapter as _load_adapter

    return _load_adapter(pipe, path, name, allow_pickle=allow_pickle)


__all__ = ["TrainConfig", "load_adapter", "train", "__version__"]
