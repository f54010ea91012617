"""Each adapter variant is a small strategy object, in the style of peft's `tuners/lora/variants.py`.

A variant knows how to build its peft config, how its weights are saved, and which consumers can load its files
natively. The training recipe only ever talks to the `AdapterVariant` interface.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class AdapterVariant:
    """Plain LoRA; subclasses change the peft config or the file layout."""

    name: str = "lora"
    #: `pipe.load_lora_weights` reproduces the trained model exactly (UNet, text encoder).
    diffusers_native_unet: bool = True
    diffusers_native_text_encoder: bool = True

    def peft_config(self, rank: int, alpha: float, target_modules: tuple[str, ...], init: str = "gaussian") -> Any:
        """The peft config for one model (UNet or text encoder)."""
        from peft import LoraConfig

        return LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(target_modules),
                          init_lora_weights=init if init != "default" else True, **self.lora_options())

    def lora_options(self) -> dict[str, Any]:
        """Extra `LoraConfig` keyword arguments of this variant."""
        return {}


@dataclass(frozen=True)
class DoraVariant(AdapterVariant):
    """Weight-decomposed LoRA (DoRA): LoRA direction plus a learned magnitude vector per output."""

    name: str = "dora"
    diffusers_native_text_encoder: bool = False  # transformers' loader drops lora_magnitude_vector keys

    def lora_options(self) -> dict[str, Any]:
        return {"use_dora": True}


@dataclass(frozen=True)
class RsLoraVariant(AdapterVariant):
    """Rank-stabilised LoRA: scale alpha / sqrt(rank) instead of alpha / rank (needs the metadata to load right)."""

    name: str = "rslora"

    def lora_options(self) -> dict[str, Any]:
        return {"use_rslora": True}


_VARIANTS: dict[str, Callable[[], AdapterVariant]] = {
    "lora": AdapterVariant,
    "dora": DoraVariant,
    "rslora": RsLoraVariant,
}


def register_variant(name: str, factory: Callable[[], AdapterVariant]) -> None:
    """Make a variant available to `--variant NAME`."""
    _VARIANTS[name] = factory


def get_variant(name: str) -> AdapterVariant:
    """The strategy object for `name`; unknown names are a user error."""
    from ..errors import UserInputError

    try:
        return _VARIANTS[name]()
    except KeyError:
        raise UserInputError(f"--variant '{name}' is not available; choose one of {', '.join(sorted(_VARIANTS))}") from None
