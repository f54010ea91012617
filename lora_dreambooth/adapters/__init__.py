"""Adapter variants (strategy objects) and their injection into the frozen base."""
from .inject import InjectedAdapters, inject_adapters, trainable_parameters
from .variants import AdapterVariant, get_variant, register_variant

__all__ = ["AdapterVariant", "InjectedAdapters", "get_variant", "inject_adapters", "register_variant",
           "trainable_parameters"]
