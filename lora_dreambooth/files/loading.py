"""Loading any adapter file we write or import (every variant, diffusers or kohya/LyCORIS layout) into a pipeline.

diffusers' `load_lora_weights` reproduces plain LoRA, rsLoRA (with metadata) and DoRA on the UNet exactly, but
drops DoRA's text-encoder magnitudes and rejects LoHa and LoKr (measured with diffusers 0.42.1 / peft 0.21.2).
Here every component goes through its variant strategy's `load_component` (peft's own injection and state-dict
loader), which is exact for all of them, and the models are marked the way diffusers marks them, so
`set_adapters`, `disable_lora`, `delete_adapters` and `unload_lora_weights` work on the result.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from lora_dreambooth.errors import UserInputError
from lora_dreambooth.files.payload import AdapterPayload, payload_from_diffusers_layout


def load_into_pipeline(pipe: Any, file: str | Path, adapter_name: str | None = None) -> str:
    """Load the adapter `file` into `pipe` (UNet and text encoder) under `adapter_name`; return the name.

    The new adapter becomes the active one at strength 1. A component the file has no weights for is left alone.
    """
    module_names = {c: [n for n, _ in getattr(pipe, c).named_modules()] for c in ("unet", "text_encoder")
                    if getattr(pipe, c, None) is not None}
    payload = read_payload_for(file, module_names)
    name = adapter_name or _free_name(pipe)
    for component in payload.components:
        model = getattr(pipe, component, None)
        if model is None:
            raise UserInputError(f"adapter '{file}' has weights for '{component}', which this pipeline lacks")
        if name in getattr(model, "peft_config", {}):
            raise UserInputError(f"adapter name '{name}' is already used in this pipeline's {component}")
    loaded: list[str] = []
    try:
        for component, state in payload.components.items():
            payload.variant.load_component(getattr(pipe, component), state.state_dict, state.config, name)
            loaded.append(component)
    except Exception as exc:
        _remove(pipe, loaded + [c for c in payload.components if c not in loaded], name)
        if isinstance(exc, UserInputError):
            raise
        raise UserInputError(f"adapter '{file}' does not fit this pipeline: {type(exc).__name__}: "
                             f"{str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}") from None
    _activate(pipe, loaded, name)
    return name


def read_payload_for(file: str | Path, module_names: dict[str, list[str]] | None = None) -> AdapterPayload:
    """Read `file` (kohya names resolved against `module_names` when given); unreadable files are user errors."""
    from safetensors.torch import load_file

    from lora_dreambooth.files.kohya import is_kohya_state_dict, payload_from_kohya
    from lora_dreambooth.files.metadata import read_file_metadata

    try:
        tensors = load_file(str(file))
        if is_kohya_state_dict(tensors):
            return payload_from_kohya(tensors, read_file_metadata(file), module_names=module_names)
        return read_payload(file)
    except UserInputError:
        raise
    except Exception as exc:
        raise UserInputError(f"adapter '{file}' cannot be read: {type(exc).__name__}: {str(exc)[:200]}") from None


def needs_exact_loader(file: str | Path) -> bool:
    """Whether diffusers' `load_lora_weights` would NOT reproduce `file` exactly (so `load_into_pipeline` must).

    Reads the safetensors header only.
    """
    from safetensors import safe_open

    from lora_dreambooth.adapters.variants import variant_for_config
    from lora_dreambooth.files.metadata import DIFFUSERS_METADATA_KEY
    from lora_dreambooth.files.payload import unpack_component_configs

    with safe_open(str(file), framework="pt") as fh:
        keys = list(fh.keys())
        metadata = fh.metadata() or {}
    if any(marker in k for k in keys for marker in ("hada_", "lokr_", "dora_scale")):
        return True
    if _diffusers_drops_layers(keys):
        return True
    try:
        configs = unpack_component_configs(metadata.get(DIFFUSERS_METADATA_KEY))
    except (ValueError, AttributeError):  # malformed metadata: diffusers' loader gives its own error
        return False
    for component, config in configs.items():
        try:
            variant = variant_for_config(config)
        except ValueError:
            return True
        if not getattr(variant, f"diffusers_native_{component}", False):
            return True
    return False


_PEFT_STYLE = re.compile(r"\.lora_[AB]\.")
_ATTENTION_STYLE = re.compile(r"\.lora\.(down|up)\.")
_TEXT_ENCODER_RENAMED = re.compile(r"\.(q_proj|k_proj|v_proj|out_proj)\.lora_[AB]\.")


def _diffusers_drops_layers(keys: list[str]) -> bool:
    """Whether diffusers 0.42.1 would skip layers of (or fail on) these diffusers-layout keys.

    Files written before one key style per component (see `AdapterVariant.to_file_layout`) mixed
    ``to_q.lora.down`` with ``conv_in.lora_A`` in the UNet (diffusers then silently drops one style), and a text
    encoder adapted on fc1/fc2 only had peft keys that diffusers cannot classify ("Could not automatically infer
    state dict type").
    """
    unet = [k for k in keys if k.startswith("unet.")]
    text_encoder = [k for k in keys if k.startswith("text_encoder.")]
    unet_mixed = any(_PEFT_STYLE.search(k) for k in unet) and any(_ATTENTION_STYLE.search(k) for k in unet)
    te_peft = [k for k in text_encoder if _PEFT_STYLE.search(k)]
    te_unclassified = bool(te_peft) and not any("lora_linear_layer" in k for k in text_encoder) \
        and not any(_TEXT_ENCODER_RENAMED.search(k) for k in te_peft)
    return unet_mixed or te_unclassified


def _free_name(pipe: Any) -> str:
    taken = {n for c in ("unet", "text_encoder") for n in getattr(getattr(pipe, c, None), "peft_config", {})}
    index = 0
    while f"default_{index}" in taken:
        index += 1
    return f"default_{index}"


def _activate(pipe: Any, components: list[str], name: str) -> None:
    """Make `name` the active adapter, at strength 1, of the components it was loaded into (as diffusers does)."""
    from diffusers.utils.peft_utils import set_weights_and_activate_adapters

    for component in components:
        set_weights_and_activate_adapters(getattr(pipe, component), [name], [1.0])


def _remove(pipe: Any, components: list[str], name: str) -> None:
    """Undo a half-finished load (e.g. the UNet part loaded, the text encoder failed)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for component in components:
        model = getattr(pipe, component)
        for module in model.modules():
            if isinstance(module, BaseTunerLayer) and name in module._get_available_adapters():
                module.delete_adapter(name)
        getattr(model, "peft_config", {}).pop(name, None)


def read_payload(file: str | Path) -> AdapterPayload:
    """Read any adapter file we understand (our diffusers layout, other diffusers-layout LoRAs, kohya/LyCORIS)."""
    from safetensors.torch import load_file

    from lora_dreambooth.files.kohya import is_kohya_state_dict, payload_from_kohya
    from lora_dreambooth.files.metadata import read_file_metadata, read_summary

    tensors = load_file(str(file))
    metadata = read_file_metadata(file)
    if is_kohya_state_dict(tensors):
        return payload_from_kohya(tensors, metadata)
    return payload_from_diffusers_layout(tensors, metadata, read_summary(file))
