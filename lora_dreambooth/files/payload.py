"""An adapter in memory, independent of its file layout, and our diffusers-layout file format.

`AdapterPayload` is what every reader produces and every writer consumes: per component (``unet``,
``text_encoder``) a peft-layout state dict and the JSON-able peft config that built it, plus the variant strategy
and our metadata summary. Our diffusers-layout file is what diffusers' `save_lora_weights` writes (keys
``unet.*`` / ``text_encoder.*``, a `lora_adapter_metadata` header so loaders use the right alpha) plus our own
`lora_dreambooth` JSON block; the kohya/LyCORIS layout lives in `lora_dreambooth.files.kohya`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lora_dreambooth.adapters.variants import AdapterVariant, get_variant, jsonable, variant_for_config

COMPONENTS = ("unet", "text_encoder")


@dataclass
class ComponentState:
    """One model's adapter: peft-layout tensors (no adapter name in the keys) and its peft config as a dict."""

    state_dict: dict[str, torch.Tensor]
    config: dict[str, Any]

    def module_params(self) -> dict[str, dict[str, torch.Tensor]]:
        """Tensors grouped by module path: {'...attn1.to_q': {'lora_A.weight': A, 'lora_B.weight': B}}."""
        grouped: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in self.state_dict.items():
            module, param = split_param_key(key)
            grouped.setdefault(module, {})[param] = tensor
        return grouped


@dataclass
class AdapterPayload:
    """A whole adapter: its variant, its components and our metadata summary ({} for other tools' files)."""

    variant: AdapterVariant
    components: dict[str, ComponentState]
    summary: dict[str, Any] = field(default_factory=dict)
    layout: str = "diffusers"  # the layout it was read from: "diffusers" or "kohya"

    def native_consumers(self) -> dict[str, str]:
        """Consumer -> 'yes' / 'partly: ...' / 'no: ...' for the file this payload came from."""
        return self.variant.native_consumers(tuple(self.components), self.layout)


_PARAM_SUFFIXES = ("lora_A.weight", "lora_B.weight", "lora_A.bias", "lora_B.bias", "lora_magnitude_vector")


def split_param_key(key: str) -> tuple[str, str]:
    """'a.b.to_q.lora_A.weight' -> ('a.b.to_q', 'lora_A.weight'); LyCORIS params are one segment ('hada_w1_a')."""
    for suffix in _PARAM_SUFFIXES:
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], suffix
    module, _, param = key.rpartition(".")
    return module, param


def payload_from_models(unet: torch.nn.Module, text_encoder: torch.nn.Module | None, *,
                        summary: dict[str, Any], adapter_name: str = "default") -> AdapterPayload:
    """The trained adapters of `unet` (and `text_encoder`), exported by their variant (PiSSA/OLoRA -> plain delta)."""
    variant = variant_for_config(jsonable(unet.peft_config[adapter_name].to_dict()))
    components = {}
    for component, model in (("unet", unet), ("text_encoder", text_encoder)):
        if model is not None:
            state, config = variant.export_state(model, adapter_name)
            components[component] = ComponentState(state, config)
    return AdapterPayload(variant, components, summary)


def write_diffusers_file(path: str | Path, payload: AdapterPayload, *, save_dtype: str = "fp16") -> Path:
    """Write `payload` in our diffusers layout through diffusers' `save_lora_weights`, atomically."""
    from diffusers import StableDiffusionPipeline
    from diffusers.loaders.lora_base import _pack_dict_with_prefix

    from lora_dreambooth.files.atomic import atomic_path
    from lora_dreambooth.files.metadata import DIFFUSERS_METADATA_KEY, METADATA_KEY, SAVE_DTYPES

    dtype = SAVE_DTYPES[save_dtype]
    layers: dict[str, dict[str, torch.Tensor] | None] = {c: None for c in COMPONENTS}
    packed: dict[str, Any] = {}
    for component, state in payload.components.items():
        file_keys = payload.variant.to_file_layout(state.state_dict, component)
        layers[component] = {k: v.detach().to("cpu", dtype).contiguous() for k, v in file_keys.items()}
        packed.update(_pack_dict_with_prefix(state.config, component))
    header = {"format": "pt", DIFFUSERS_METADATA_KEY: json.dumps(packed, indent=2, sort_keys=True),
              METADATA_KEY: json.dumps(jsonable(payload.summary), sort_keys=True)}

    def save_function(weights: dict[str, torch.Tensor], target: str) -> None:
        import safetensors.torch

        with atomic_path(target) as tmp:
            safetensors.torch.save_file(weights, str(tmp), metadata=header)

    path = Path(path)
    StableDiffusionPipeline.save_lora_weights(
        save_directory=str(path.parent), unet_lora_layers=layers["unet"], text_encoder_lora_layers=layers["text_encoder"],
        weight_name=path.name, save_function=save_function, safe_serialization=True,
    )
    return path




def payload_from_diffusers_layout(tensors: dict[str, torch.Tensor], metadata: dict[str, str],
                                  summary: dict[str, Any]) -> AdapterPayload:
    """Split `unet.*` / `text_encoder.*` keys, take configs from `lora_adapter_metadata` (or infer LoRA ones)."""
    from lora_dreambooth.files.metadata import DIFFUSERS_METADATA_KEY

    configs = unpack_component_configs(metadata.get(DIFFUSERS_METADATA_KEY))
    by_component: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        component, _, rest = key.partition(".")
        if component not in COMPONENTS:
            raise ValueError(f"key '{key}' belongs to no SD v1 component (unet, text_encoder)")
        by_component.setdefault(component, {})[rest] = tensor
    variant = _variant_of(configs, summary, by_component)
    components = {}
    for component, file_state in by_component.items():
        state = variant.from_file_layout(file_state)
        config = configs.get(component) or _inferred_lora_config(variant, state)
        components[component] = ComponentState(state, config)
    return AdapterPayload(variant, components, summary, layout="diffusers")


def unpack_component_configs(raw: str | None) -> dict[str, dict[str, Any]]:
    """`lora_adapter_metadata` JSON ({'unet.r': 4, ...}) -> {'unet': {'r': 4, ...}, ...}."""
    if not raw:
        return {}
    flat = json.loads(raw)
    configs: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        component, _, name = key.partition(".")
        configs.setdefault(component, {})[name] = value
    return configs


def _variant_of(configs: dict[str, dict], summary: dict[str, Any], state: dict[str, dict]) -> AdapterVariant:
    if configs:
        return variant_for_config(next(iter(configs.values())))
    if summary.get("variant"):
        return get_variant(str(summary["variant"]))
    has_magnitude = any("lora_magnitude_vector" in k for part in state.values() for k in part)
    return get_variant("dora" if has_magnitude else "lora")


def _inferred_lora_config(variant: AdapterVariant, state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """No metadata: what diffusers assumes too (alpha = rank), ranks read from the lora_A shapes."""
    ranks = {split_param_key(k)[0]: int(v.shape[0]) for k, v in state.items() if k.endswith("lora_A.weight")}
    if not ranks:
        raise ValueError("no lora_A weights and no lora_adapter_metadata: cannot tell how to load this file")
    return variant.config_from_modules(ranks, {m: float(r) for m, r in ranks.items()})
