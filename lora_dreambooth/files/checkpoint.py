"""Merged checkpoints: the base with an adapter fused in, as one SD v1 `.safetensors` in the original (CompVis /
A1111 / ComfyUI) key layout, which A1111, ComfyUI, diffusers' single-file loader and our `--base` load as a model.

diffusers ships only the original -> diffusers direction (`diffusers.loaders.single_file_utils`). The reverse here
follows that converter's own block arithmetic and renames, and every write is checked against it: the converter
run on what we are about to write must give back exactly the diffusers state dicts we started from.
"""
from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lora_dreambooth.errors import UserInputError
from lora_dreambooth.files.atomic import atomic_path
from lora_dreambooth.files.metadata import METADATA_KEY, SAVE_DTYPES
from lora_dreambooth.single_file import (
    CLIP_PREFIX,
    PIPELINE_CONFIG_KEY,
    SD1_CONFIG_DIR,
    UNET_PREFIX,
    VAE_PREFIX,
    file_identity,
    file_sha256,
    is_single_file,
)

MERGE_KEY = "lora_dreambooth.merged"
_UNET_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
                ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection"))
_VAE_ATTENTION = (("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."),
                  ("to_out.0.", "proj_out."))


# -- diffusers -> original layout ------------------------------------------------------------------------------------
def _resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return dict(_UNET_RESNET).get(head, head) + "." + tail


def unet_to_original(state: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    """UNet2DConditionModel keys -> `model.diffusion_model.*` (the inverse of `convert_ldm_unet_checkpoint`)."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    top = DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"]
    per_block = config["layers_per_block"] + 1  # input/output blocks per down/up block (resnets + sampler)
    with_attention = ["CrossAttn" in t for t in config["up_block_types"]]
    rules: list[tuple[str, Callable[..., str]]] = [
        (r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)",
         lambda b, i, r: f"input_blocks.{b * per_block + i + 1}.0.{_resnet(r)}"),
        (r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)",
         lambda b, i, r: f"input_blocks.{b * per_block + i + 1}.1.{r}"),
        (r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)",
         lambda b, r: f"input_blocks.{(b + 1) * per_block}.0.op.{r}"),
        (r"mid_block\.resnets\.(\d+)\.(.+)", lambda i, r: f"middle_block.{2 * i}.{_resnet(r)}"),
        (r"mid_block\.attentions\.0\.(.+)", lambda r: f"middle_block.1.{r}"),
        (r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)",
         lambda b, i, r: f"output_blocks.{b * per_block + i}.0.{_resnet(r)}"),
        (r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)",
         lambda b, i, r: f"output_blocks.{b * per_block + i}.1.{r}"),
        (r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)",
         lambda b, r: f"output_blocks.{b * per_block + per_block - 1}.{2 if with_attention[b] else 1}.conv.{r}"),
    ]
    return {UNET_PREFIX + _rename(key, top, rules): tensor for key, tensor in state.items()}


def vae_to_original(state: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    """AutoencoderKL keys -> `first_stage_model.*` (the inverse of `convert_ldm_vae_checkpoint`)."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    top = DIFFUSERS_TO_LDM_MAPPING["vae"]
    last = len(config["up_block_types"]) - 1
    shortcut = lambda r: r.replace("conv_shortcut", "nin_shortcut")
    rules: list[tuple[str, Callable[..., str]]] = [
        (r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)",
         lambda b, i, r: f"encoder.down.{b}.block.{i}.{shortcut(r)}"),
        (r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.+)", lambda b, r: f"encoder.down.{b}.downsample.{r}"),
        (r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)",
         lambda b, i, r: f"decoder.up.{last - int(b)}.block.{i}.{shortcut(r)}"),
        (r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)", lambda b, r: f"decoder.up.{last - int(b)}.upsample.{r}"),
        (r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)",
         lambda c, i, r: f"{c}.mid.block_{int(i) + 1}.{shortcut(r)}"),
        (r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", lambda c, r: f"{c}.mid.attn_1.{_vae_attention(r)}"),
    ]
    out = {}
    for key, tensor in state.items():
        name = _rename(key, top, rules)
        if ".mid.attn_1." in name and name.endswith(".weight") and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]  # the original VAE attention projections are 1x1 convolutions
        out[VAE_PREFIX + name] = tensor
    return out


def _vae_attention(rest: str) -> str:
    for new, old in _VAE_ATTENTION:
        if rest.startswith(new):
            return old + rest[len(new):]
    return rest


def text_encoder_to_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIPTextModel keys -> `cond_stage_model.transformer.text_model.*` (transformers 5 dropped `text_model.`)."""
    return {CLIP_PREFIX + (k if k.startswith("text_model.") else "text_model." + k): v for k, v in state.items()}


def _rename(key: str, top: dict[str, str], rules: list[tuple[str, Callable[..., str]]]) -> str:
    if key in top:
        return top[key]
    for pattern, build in rules:
        match = re.fullmatch(pattern, key)
        if match:
            groups = [int(g) if g.isdigit() else g for g in match.groups()]
            return build(*groups)
    raise UserInputError(f"cannot place '{key}' in the original SD layout (not an SD v1 architecture?)")


def original_state_dict(unet: torch.nn.Module, vae: torch.nn.Module, text_encoder: torch.nn.Module
                        ) -> dict[str, torch.Tensor]:
    """The three models' weights in the original single-file layout, checked against diffusers' own converter."""
    states = {"unet": unet.state_dict(), "vae": vae.state_dict(),
              "text_encoder": {k: v for k, v in text_encoder.state_dict().items() if not k.endswith("position_ids")}}
    out = {**unet_to_original(states["unet"], unet.config), **vae_to_original(states["vae"], vae.config),
           **text_encoder_to_original(states["text_encoder"])}
    check_round_trip(out, states, unet.config, vae.config)
    return out


def check_round_trip(checkpoint: dict[str, torch.Tensor], states: dict[str, dict[str, torch.Tensor]],
                     unet_config: Any, vae_config: Any) -> None:
    """Raise unless diffusers' single-file converters turn `checkpoint` back into exactly `states`."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )

    back = {"unet": convert_ldm_unet_checkpoint(checkpoint, dict(unet_config)),
            "vae": convert_ldm_vae_checkpoint(checkpoint, dict(vae_config)),
            "text_encoder": {k.removeprefix("text_model.") if not any(s.startswith("text_model.") for s in
                                                                       states["text_encoder"]) else k: v
                             for k, v in convert_ldm_clip_checkpoint(checkpoint).items()}}
    for component, state in states.items():
        got = back[component]
        if set(got) != set(state):
            odd = sorted(set(got) ^ set(state))[:4]
            raise RuntimeError(f"original-layout {component} does not convert back (keys differ: {odd})")
        bad = [k for k in state if got[k] is None or not torch.equal(got[k], state[k])]
        if bad:
            raise RuntimeError(f"original-layout {component} does not convert back (tensors differ: {bad[:4]})")


# -- embedded configs --------------------------------------------------------------------------------------------
def pipeline_config_files(model: Any) -> dict[str, str]:
    """The base's diffusers configs as {relative file: text} (tokenizer files only when not SD v1's CLIP one)."""
    from diffusers import PNDMScheduler

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model.unet.save_config(root / "unet")
        model.vae.save_config(root / "vae")
        model.text_encoder.config.save_pretrained(root / "text_encoder")
        PNDMScheduler.from_config(model.noise_scheduler.config).save_config(root / "scheduler")  # as SD v1 ships
        if not _is_sd1_tokenizer(model.tokenizer):
            model.tokenizer.save_pretrained(root / "tokenizer")
        (root / "model_index.json").write_text((SD1_CONFIG_DIR / "model_index.json").read_text())
        return {p.relative_to(root).as_posix(): p.read_text(encoding="utf-8")
                for p in sorted(root.rglob("*")) if p.is_file()}


def _is_sd1_tokenizer(tokenizer: Any) -> bool:
    if len(tokenizer) != 49408:
        return False
    shipped = json.loads((SD1_CONFIG_DIR / "tokenizer" / "vocab.json").read_text(encoding="utf-8"))
    return tokenizer.get_vocab() == shipped


# -- writing -------------------------------------------------------------------------------------------------------
def save_checkpoint(model: Any, out_file: str | Path, *, save_dtype: str = "fp16",
                    extra_metadata: dict[str, str] | None = None) -> Path:
    """Write a loaded base (`models.BaseModel`, adapters already fused or none) as one SD v1 `.safetensors`."""
    from safetensors.torch import save_file

    out = Path(out_file)
    if out.suffix.lower() != ".safetensors":
        raise UserInputError(f"--out '{out}' must end in .safetensors")
    dtype = SAVE_DTYPES[save_dtype]
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in
               original_state_dict(model.unet, model.vae, model.text_encoder).items()}
    metadata = {"modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": "stable-diffusion-v1",
                "modelspec.implementation": "https://github.com/CompVis/stable-diffusion",
                "format": "pt", PIPELINE_CONFIG_KEY: json.dumps(pipeline_config_files(model), sort_keys=True),
                **(extra_metadata or {})}
    with atomic_path(out) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return out


def export_checkpoint(adapter: str | Path, base: str, out_file: str | Path, *, strength: float = 1.0,
                      save_dtype: str = "fp16", allow_pickle: bool = False) -> Path:
    """Fuse `adapter` at `strength` into `base` and write the result as a single-file SD v1 checkpoint."""
    from lora_dreambooth.files.metadata import read_summary, resolve_adapter_file
    from lora_dreambooth.models import load_base

    source = resolve_adapter_file(adapter, allow_pickle=allow_pickle)
    out = Path(out_file)
    if out.suffix.lower() != ".safetensors":
        raise UserInputError(f"--out '{out}' must end in .safetensors")
    if is_single_file(base) and Path(base).expanduser().exists() and out.resolve() == Path(base).expanduser().resolve():
        raise UserInputError(f"--out '{out}' is the base checkpoint itself; choose another name")
    if not -4.0 <= strength <= 4.0:
        raise UserInputError(f"--strength must be between -4 and 4; got {strength}")
    model = load_base(base, allow_pickle=allow_pickle)
    fuse_adapter(model, source, strength, allow_pickle=allow_pickle)
    summary = read_summary(source) if source.suffix.lower() == ".safetensors" else {}
    merged = {"adapter": source.name, "adapter_sha256": file_sha256(source), "strength": strength,
              **file_identity(base), "token": summary.get("token"), "instance_prompt": summary.get("instance_prompt")}
    extra = {MERGE_KEY: json.dumps(merged, sort_keys=True),
             "modelspec.title": f"{Path(str(base)).stem} + {summary.get('token') or source.stem}",
             "modelspec.trigger_phrase": str(summary.get("token") or "")}
    if summary:
        extra[METADATA_KEY] = json.dumps(summary, sort_keys=True)
    return save_checkpoint(model, out, save_dtype=save_dtype, extra_metadata={k: v for k, v in extra.items() if v})


def fuse_adapter(model: Any, adapter_file: Path, strength: float, *, allow_pickle: bool = False) -> None:
    """Load the adapter into the base's modules, fuse it at `strength` and drop the adapter layers (weights stay)."""
    from lora_dreambooth.files.load_adapter import LORA_COMPONENTS, load_adapter

    pipe = model.pipeline()
    name = load_adapter(pipe, adapter_file, allow_pickle=allow_pickle)
    components = [c for c in LORA_COMPONENTS if name in getattr(getattr(pipe, c), "peft_config", {})]
    pipe.set_adapters([name], adapter_weights=[strength])
    pipe.fuse_lora(components=components, adapter_names=[name])
    pipe.unload_lora_weights()
    leftovers = [k for c in components for k in getattr(pipe, c).state_dict() if "base_layer" in k or "lora_" in k]
    if leftovers:
        raise RuntimeError(f"adapter layers left after fusing: {leftovers[:3]}")
