"""Loading the frozen Stable Diffusion v1.x base: local folders, single-file checkpoints and hub ids, offline-friendly,
with clear errors."""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lora_dreambooth.errors import UserInputError
from lora_dreambooth.prefetch import WeightPrefetch
from lora_dreambooth.single_file import (
    check_base_file,
    file_identity,
    is_single_file,
    load_single_file_components,
    load_single_file_tokenizer,
)

log = logging.getLogger(__name__)

REQUIRED_SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class BaseModel:
    """The pieces of an SD v1.x pipeline that training and generation need."""

    base: str
    tokenizer: Any
    text_encoder: torch.nn.Module
    unet: torch.nn.Module
    vae: torch.nn.Module
    noise_scheduler: Any

    def pipeline(self, scheduler: Any | None = None):
        """A StableDiffusionPipeline over these very modules (no copy): adapters injected later show up in it."""
        from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

        if scheduler is None:
            scheduler = DPMSolverMultistepScheduler.from_config(self.noise_scheduler.config)
        pipe = StableDiffusionPipeline(
            vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer, unet=self.unet,
            scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe


def base_identity(base: str) -> dict[str, str]:
    """What an adapter's metadata records about its base: {"base_model": base}, plus "base_file" (name) and
    "base_sha256" for a single-file checkpoint (streamed, hashed once per file per process)."""
    return file_identity(base)


def quiet_library_progress() -> None:
    """Silence the per-shard progress bars of transformers/diffusers loaders (our own bar is enough)."""
    try:
        import diffusers.utils.logging as dlog
        import transformers.utils.logging as tlog

        tlog.disable_progress_bar()
        dlog.disable_progress_bar()
        tlog.set_verbosity_error()
        dlog.set_verbosity_error()
    except Exception:  # pragma: no cover - cosmetic only
        pass


def check_base_folder(folder: Path, *, allow_pickle: bool = False) -> None:
    """Raise a one-line error unless `folder` is a diffusers SD v1.x pipeline folder."""
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        if folder.is_file():
            raise UserInputError(f"base model '{folder}' is a file but not a .safetensors or .ckpt checkpoint; pass "
                                 f"an SD v1.x checkpoint file or a diffusers folder (model_index.json, unet/, ...)")
        raise UserInputError(f"base model folder '{folder}' has no model_index.json: not a diffusers pipeline folder")
    try:
        index = json.loads(index_file.read_text())
    except (OSError, ValueError) as exc:
        raise UserInputError(f"base model '{folder}': model_index.json is unreadable ({exc})") from None
    class_name = str(index.get("_class_name", ""))
    if "XL" in class_name or "text_encoder_2" in index:
        raise UserInputError(f"base model '{folder}' is SDXL ({class_name}): only Stable Diffusion v1.x is supported")
    missing = [name for name in REQUIRED_SUBFOLDERS if not (folder / name).is_dir()]
    if missing:
        raise UserInputError(f"base model '{folder}' is not an SD v1 pipeline: missing {', '.join(missing)}")
    unet_config = _read_json(folder / "unet" / "config.json")
    if unet_config.get("use_linear_projection") or unet_config.get("cross_attention_dim") == 1024:
        raise UserInputError(
            f"base model '{folder}' looks like Stable Diffusion 2.x (1024-wide text conditioning): only v1.x is supported"
        )
    if not allow_pickle:
        for sub in ("unet", "vae", "text_encoder"):
            files = [p for p in (folder / sub).iterdir() if p.is_file()]
            has_safe = any(p.suffix == ".safetensors" for p in files)
            if not has_safe and any(p.suffix in PICKLE_SUFFIXES for p in files):
                raise UserInputError(
                    f"base model '{folder}/{sub}' holds only pickle weights (.bin): pass --allow-pickle if you trust it"
                )
            if not has_safe:
                raise UserInputError(f"base model '{folder}/{sub}' holds no weights file")


def resolve_base(base: str, *, allow_pickle: bool = False) -> str:
    """Return a loadable location for `base` (a local folder, an SD v1.x checkpoint file or a hub id), with clear
    errors for bad paths."""
    path = Path(base).expanduser()
    if path.is_file() and is_single_file(path):
        check_base_file(path, allow_pickle=allow_pickle)
        return str(path)
    if path.exists():
        check_base_folder(path, allow_pickle=allow_pickle)
        return str(path)
    if is_single_file(path):
        raise UserInputError(f"base model file '{base}' does not exist")
    if not _HUB_ID.match(base):
        raise UserInputError(f"base model '{base}' does not exist (expected a diffusers folder, an SD v1.x "
                             f".safetensors checkpoint or a hub id like 'org/name')")
    return base


def prefer_flash_attention(device: torch.device | str) -> None:
    """On a GPU, leave cuDNN's attention out of `scaled_dot_product_attention`'s choice (flash attention then runs).

    cuDNN attention builds an execution plan for every new shape on first use: measured on an H200 (torch 2.11,
    SD v1.4 at 512 px), the first training step took 9.9 s with it and 1.2 s without, the CUDA-graph capture 2.4 s
    and 0.3 s, and 100 class images 21.4 s and 19.6 s. Its kernels are faster once planned (a training step 40.0 vs
    42.8 ms), which pays back those ~10 s only after ~3,500 steps: longer than a DreamBooth run. Process-wide, as
    torch's backend switches are; a no-op on a CPU. Training routes the one shape where cuDNN gains most, the
    full-resolution self-attention, back to it (`kernels.attention.route_attention`).
    """
    if torch.device(device).type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)


def load_base(base: str, *, allow_pickle: bool = False, device: torch.device | str | None = None,
              dtype: torch.dtype | None = None, unet_prefetch: WeightPrefetch | None = None) -> BaseModel:
    """Load tokenizer, text encoder, UNet, VAE and the DDPM noise scheduler of an SD v1.x base.

    `base` is a diffusers folder, a hub id, or a single-file checkpoint (A1111 / Civitai `.safetensors`; `.ckpt`
    with ``allow_pickle``) read by diffusers' single-file loader with the SD v1 configs shipped in the package.

    By default in fp32 on the CPU (callers move and cast afterwards). With `device`/`dtype` the weights go from
    the files straight to the device, the UNet and text encoder in `dtype` (cast once while loading), the VAE in
    fp32 (it encodes the training latents). A hub id that cannot be reached fails with one line instead of a long
    connection traceback.

    `unet_prefetch` (with `device` and `dtype`): the UNet's file, already read onto the device while the libraries
    imported (:mod:`lora_dreambooth.prefetch`). The UNet is built from it when its tensors match the model exactly;
    otherwise diffusers loads it from the file as usual.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    quiet_library_progress()
    location = resolve_base(base, allow_pickle=allow_pickle)
    if is_single_file(location) and Path(location).is_file():
        return _frozen(BaseModel(base=base, **load_single_file_components(Path(location), device=device, dtype=dtype)))
    use_safetensors = None if allow_pickle else True
    placed = {"device_map": {"": torch.device(device)}} if device is not None else {}
    te_cast = {"dtype": dtype} if dtype is not None else {}  # transformers' name for it
    unet_cast = {"torch_dtype": dtype} if dtype is not None else {}  # diffusers' name
    try:
        tokenizer = CLIPTokenizer.from_pretrained(location, subfolder="tokenizer")
        noise_scheduler = DDPMScheduler.from_pretrained(location, subfolder="scheduler")
        text_encoder = CLIPTextModel.from_pretrained(location, subfolder="text_encoder",
                                                     use_safetensors=use_safetensors, **te_cast, **placed)
        unet = _unet_from_prefetch(location, unet_prefetch, device, dtype) if unet_prefetch is not None else None
        if unet is None:
            unet = UNet2DConditionModel.from_pretrained(location, subfolder="unet", use_safetensors=use_safetensors,
                                                        **unet_cast, **placed)
        vae = AutoencoderKL.from_pretrained(location, subfolder="vae", use_safetensors=use_safetensors, **placed)
    except UserInputError:
        raise
    except Exception as exc:  # network, missing files, wrong layout: one line for the user
        raise UserInputError(_describe_load_failure(base, location, exc)) from None
    if getattr(unet.config, "cross_attention_dim", None) == 1024:
        raise UserInputError(f"base model '{base}' is Stable Diffusion 2.x: only v1.x is supported")
    return _frozen(BaseModel(base=base, tokenizer=tokenizer, text_encoder=text_encoder, unet=unet, vae=vae,
                             noise_scheduler=noise_scheduler))


def _unet_from_prefetch(location: str, prefetch: WeightPrefetch, device: torch.device | str | None,
                        dtype: torch.dtype | None) -> torch.nn.Module | None:
    """The UNet built on the meta device from its config and given the prefetched tensors as its own, as
    `from_pretrained(torch_dtype=dtype, device_map=device)` would have left it; None (the read's memory given back)
    unless it was read onto `device` and every parameter and buffer came from the file with the model's shape."""
    from diffusers import UNet2DConditionModel

    if dtype is None or device is None or not prefetch.reads_onto(device):
        prefetch.cancel()
        return None
    tensors = prefetch.state_dict(dtype)
    if tensors is None:
        return None
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(location, subfolder="unet"))
    try:
        unet.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as exc:  # other key names (an older diffusers layout) or shapes: diffusers converts those
        log.debug("prefetched UNet weights do not match the model (%s): loading with diffusers", str(exc)[:200])
        return None
    if any(t.is_meta for t in (*unet.parameters(), *unet.buffers())):
        return None
    unet.register_to_config(_name_or_path=location)
    unet.hf_device_map = {"": torch.device(device)}  # what accelerate's dispatch leaves on a placed model
    log.info("the UNet's weights were read onto %s while the libraries imported (%.2f GB in %.1f s)", prefetch.device,
             prefetch.nbytes / 1e9, prefetch.seconds)
    return unet.eval()


def _frozen(model: BaseModel) -> BaseModel:
    for module in (model.text_encoder, model.unet, model.vae):
        module.requires_grad_(False)
        module.eval()
    return model


def _describe_load_failure(base: str, location: str, exc: Exception) -> str:
    text = f"{type(exc).__name__}: {exc}".splitlines()[0]
    if not Path(location).exists():
        if os.environ.get("HF_HUB_OFFLINE") or any(s in text for s in ("connect", "Connection", "offline", "resolve",
                                                                       "Max retries", "Temporary failure", "Network")):
            return (f"cannot load base model '{base}': it is not a local folder and the model hub is unreachable "
                    f"(offline?); pass a local diffusers folder with --base")
        return f"cannot load base model '{base}' from the model hub: {text[:200]}"
    return f"cannot load base model '{base}': {text[:200]}"


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def load_tokenizer(base: str) -> Any:
    """The CLIP tokenizer of an SD v1.x base (a local folder, a checkpoint file or a hub id), loading no model."""
    from transformers import CLIPTokenizer

    from lora_dreambooth.errors import UserInputError
    from lora_dreambooth.models import quiet_library_progress, resolve_base

    quiet_library_progress()
    location = resolve_base(base, allow_pickle=True)  # only the tokenizer is read: no weights, nothing to unpickle
    try:
        if is_single_file(location) and Path(location).is_file():
            return load_single_file_tokenizer(Path(location))
        return CLIPTokenizer.from_pretrained(location, subfolder="tokenizer")
    except Exception as exc:  # missing files, unreachable hub
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
        raise UserInputError(f"cannot load the tokenizer of base model '{base}': {reason}") from None
