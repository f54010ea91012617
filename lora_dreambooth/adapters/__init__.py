"""Adapter variants (strategy objects) and their injection into the frozen base."""
from lora_dreambooth.adapters.inject import InjectedAdapters, inject_adapters, trainable_parameters
from lora_dreambooth.adapters.variants import AdapterVariant, get_variant, register_variant

__all__ = ["AdapterVariant", "InjectedAdapters", "get_variant", "inject_adapters", "register_variant",
           "trainable_parameters"]
