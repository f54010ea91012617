"""The kohya / A1111 / ComfyUI layout (LyCORIS naming for LoHa and LoKr): export and import.

One module per key prefix: ``lora_unet_<path with _>`` or ``lora_te_<path with _>``, then the tensor name
(``lora_down.weight`` / ``lora_up.weight`` / ``alpha``; DoRA adds ``dora_scale``; LoHa ``hada_w1_a`` ...;
LoKr ``lokr_w1`` ...). What each variant writes per module is its strategy's business
(`AdapterVariant.kohya_module_tensors`); this module does the naming, the `ss_*` / `modelspec.*` metadata those
tools display, and the files. Underscored names are mapped back to layers by matching the real module names
(those of the pipeline being loaded into, or of the SD v1 architecture), the way A1111 and ComfyUI do.
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from functools import lru_cache
from typing import Any, Iterable, Mapping

import torch

from lora_dreambooth.adapters.variants import get_variant, variant_for_kohya_module
from lora_dreambooth.errors import UserInputError
from lora_dreambooth.files.metadata import METADATA_KEY
from lora_dreambooth.files.payload import AdapterPayload, ComponentState

log = logging.getLogger(__name__)

KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
FORMATS = ("kohya",)
_SDXL_PREFIXES = ("lora_te1_", "lora_te2_")
_DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


# -- export -----------------------------------------------------------------------------------------------------
def payload_to_kohya(payload: AdapterPayload) -> dict[str, torch.Tensor]:
    """The kohya/LyCORIS tensors of an adapter (each module's tensors come from its variant strategy)."""
    out: dict[str, torch.Tensor] = {}
    for component, state in payload.components.items():
        for module, params in state.module_params().items():
            name = kohya_module_name(component, module)
            for suffix, tensor in payload.variant.kohya_module_tensors(params, state.config, module).items():
                out[f"{name}.{suffix}"] = tensor
    return out


def kohya_module_name(component: str, module: str) -> str:
    """'encoder.layers.0.self_attn.q_proj' -> 'lora_te_text_model_encoder_layers_0_self_attn_q_proj'.

    transformers 5 dropped CLIPTextModel's `text_model.` level; kohya, A1111 and ComfyUI names keep it.
    """
    if component == "text_encoder" and not module.startswith("text_model."):
        module = "text_model." + module
    return KOHYA_PREFIXES[component] + module.replace(".", "_")


def kohya_metadata(payload: AdapterPayload, tensors: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """`ss_*` (kohya sd-scripts) and `modelspec.*` (SAI model spec) fields, plus our own summary block."""
    summary = payload.summary
    config = summary.get("config", {})
    alphas = [float(t) for k, t in tensors.items() if k.endswith(".alpha")]
    ranks = [int(s.config.get("r", 0)) for s in payload.components.values()]
    resolution = int(summary.get("resolution") or config.get("resolution") or 512)
    token = summary.get("token")
    meta = {
        "ss_network_module": payload.variant.kohya_network_module,
        "ss_network_dim": str(max(ranks) if ranks else summary.get("rank", "")),
        "ss_network_alpha": f"{Counter(alphas).most_common(1)[0][0]:g}" if alphas else "",
        "ss_network_args": json.dumps(_network_args(payload)),
        "ss_base_model_version": "sd_v1",
        "ss_v2": "False",
        "ss_sd_model_name": str(summary.get("base_model", "")),
        "ss_resolution": f"({resolution}, {resolution})",
        "ss_max_train_steps": str(summary.get("steps", "")),
        "ss_num_train_images": str(summary.get("num_instance_images", "")),
        "ss_learning_rate": str(config.get("lr", "")),
        "ss_text_encoder_lr": str(config.get("text_encoder_lr") or config.get("lr", "")),
        "ss_unet_lr": str(config.get("lr", "")),
        "ss_output_name": str(summary.get("instance_prompt") or token or "adapter"),
        "ss_training_comment": _training_comment(summary),
        "ss_tag_frequency": json.dumps({"instance": {token: int(summary.get("num_instance_images") or 1)}}
                                       if token else {}),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-v1/" + ("lora" if payload.variant.kohya_network_module ==
                                                             "networks.lora" else "lycoris"),
        "modelspec.implementation": "diffusers",
        "modelspec.title": str(summary.get("instance_prompt") or token or "lora-dreambooth adapter"),
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.trigger_phrase": str(token or ""),
        "modelspec.description": _training_comment(summary),
        METADATA_KEY: json.dumps(summary, sort_keys=True),
    }
    return {k: v for k, v in meta.items() if v != ""}


def _network_args(payload: AdapterPayload) -> dict[str, str]:
    name = payload.variant.name
    if name in ("loha", "lokr"):
        return {"algo": name}
    if name == "dora":
        return {"algo": "lora", "dora_wd": "True", "wd_on_output": "True"}
    return {}


def _training_comment(summary: dict[str, Any]) -> str:
    if not summary:
        return ""
    return (f"lora-dreambooth {summary.get('version', '')}: trigger word '{summary.get('token', '')}', "
            f"instance prompt '{summary.get('instance_prompt', '')}', variant {summary.get('variant', 'lora')}, "
            f"rank {summary.get('rank', '')}, alpha {summary.get('alpha', '')}").strip()




# -- import -----------------------------------------------------------------------------------------------------
def is_kohya_state_dict(tensors: Iterable[str]) -> bool:
    """Whether the keys are in the kohya/LyCORIS layout (`lora_unet_*`, `lora_te_*`)."""
    keys = [k for k in tensors if not k.startswith("bundle_emb.")]  # bundled textual-inversion embeddings
    return bool(keys) and all(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for k in keys)


def payload_from_kohya(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], *,
                       module_names: Mapping[str, Iterable[str]] | None = None) -> AdapterPayload:
    """Read kohya/LyCORIS tensors into peft-layout components.

    `module_names` maps a component to its models' dotted module names (default: the SD v1 architecture).
    """
    groups = _group_modules(tensors)
    variants = {c: {m: variant_for_kohya_module(set(t)) for m, t in mods.items()} for c, mods in groups.items()}
    kinds = {v.name if v else None for per in variants.values() for v in per.values()}
    if None in kinds or len(kinds) != 1:
        unknown = sorted({k for mods in groups.values() for t in mods.values() for k in t})
        raise UserInputError(f"kohya file mixes or uses adapter types we cannot read (tensor names: "
                             f"{', '.join(unknown[:8])}); supported: LoRA, DoRA, LoHa, LoKr")
    variant = get_variant(kinds.pop())
    components = {}
    for component, modules in groups.items():
        index = _name_index(component, module_names)
        state: dict[str, torch.Tensor] = {}
        ranks: dict[str, int] = {}
        alphas: dict[str, float] = {}
        names: set[str] = set()
        for kohya_name, module_tensors in modules.items():
            module = index.get(kohya_name)
            if module is None:
                raise UserInputError(f"kohya module '{KOHYA_PREFIXES[component]}{kohya_name}' matches no layer of the "
                                     f"SD v1 {component} (a LoRA for another architecture?)")
            params, ranks[module], alphas[module] = variant.peft_module_tensors(module_tensors)
            names |= set(module_tensors)
            state.update({f"{module}.{param}": tensor for param, tensor in params.items()})
        components[component] = ComponentState(state, variant.config_from_modules(ranks, alphas, names))
    return AdapterPayload(variant, components, _summary_from_metadata(metadata), layout="kohya")


def _group_modules(tensors: Mapping[str, torch.Tensor]) -> dict[str, dict[str, dict[str, torch.Tensor]]]:
    """{'unet': {'down_blocks_0_..._to_q': {'lora_down.weight': t, 'alpha': t}}, 'text_encoder': {...}}."""
    groups: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    for key, tensor in tensors.items():
        if key.startswith(_SDXL_PREFIXES):
            raise UserInputError(f"kohya key '{key}' is from an SDXL LoRA (two text encoders); only SD v1.x is supported")
        head, _, suffix = key.partition(".")
        for component, prefix in KOHYA_PREFIXES.items():
            if head.startswith(prefix):
                groups.setdefault(component, {}).setdefault(head[len(prefix):], {})[suffix] = tensor
                break
    return groups


def _name_index(component: str, module_names: Mapping[str, Iterable[str]] | None) -> dict[str, str]:
    names = module_names.get(component) if module_names else None
    if names is None:
        names = sd1_module_names(component)
    index = {name.replace(".", "_"): name for name in names if name}
    if component == "text_encoder":  # kohya names keep transformers 4's `text_model.` level
        index.update({"text_model_" + k: v for k, v in list(index.items()) if not k.startswith("text_model_")})
    return index


@lru_cache(maxsize=None)
def sd1_module_names(component: str) -> tuple[str, ...]:
    """Module names of the SD v1.x UNet or CLIP text encoder, built on the meta device (no weights, offline)."""
    with torch.device("meta"):
        if component == "unet":
            from diffusers import UNet2DConditionModel

            model = UNet2DConditionModel()  # the default config is SD v1's architecture
        else:
            from transformers import CLIPTextConfig, CLIPTextModel

            model = CLIPTextModel(CLIPTextConfig())  # 12 layers, as in SD v1
    return tuple(name for name, _ in model.named_modules())


def _summary_from_metadata(metadata: Mapping[str, str]) -> dict[str, Any]:
    """Our own summary when the file carries it; otherwise what kohya's `ss_*` / `modelspec.*` fields tell."""
    raw = metadata.get(METADATA_KEY)
    if raw:
        try:
            return json.loads(raw)
        except ValueError:
            pass
    summary: dict[str, Any] = {}
    trigger = metadata.get("modelspec.trigger_phrase")
    if trigger:
        summary["token"] = trigger
    if metadata.get("ss_sd_model_name"):
        summary["base_model"] = metadata["ss_sd_model_name"]
    if metadata.get("ss_max_train_steps", "").isdigit():
        summary["steps"] = int(metadata["ss_max_train_steps"])
    return summary






