"""lora-dreambooth: DreamBooth for Stable Diffusion v1.x with small PEFT adapters."""
from lora_dreambooth.config import TrainConfig  # noqa: E402
from lora_dreambooth.version import __version__  # noqa: E402


def train(config: TrainConfig):
    """Run a training job; see :func:`lora_dreambooth.training.recipe.train`."""
    from lora_dreambooth.training.recipe import train as _train

    return _train(config)


def load_adapter(pipe, path, name=None, *, allow_pickle=False) -> str:
    """Load an adapter into a diffusers pipeline with checks; see :func:`lora_dreambooth.files.load_adapter.load_adapter`."""
    from lora_dreambooth.files.load_adapter import load_adapter as _load_adapter

    return _load_adapter(pipe, path, name, allow_pickle=allow_pickle)


__all__ = ["TrainConfig", "load_adapter", "train", "__version__"]
