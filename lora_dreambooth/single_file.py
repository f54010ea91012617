"""SD v1.x single-file checkpoints (A1111 / Civitai `.safetensors`, `.ckpt`) as a base: checks, hashing, loading.

Loading goes through diffusers' single-file loader with the SD v1 configs shipped in `assets/sd-v1/` (configs and
the CLIP tokenizer, no weights), so nothing is fetched from a hub. A checkpoint written by our own
``export --format checkpoint`` carries its base's diffusers configs in its header (`PIPELINE_CONFIG_KEY`); those
win over the shipped ones, so a merged checkpoint of any SD v1-layout base (the tiny test base included) reloads.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_dreambooth.errors import UserInputError

if TYPE_CHECKING:
    import torch

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
PIPELINE_CONFIG_KEY = "lora_dreambooth.pipeline_config"
SD1_CONFIG_DIR = Path(__file__).resolve().parent / "assets" / "sd-v1"
UNET_PREFIX, VAE_PREFIX, CLIP_PREFIX = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."
# diffusers' infer_diffusers_model_type names -> what we tell the user the file looks like
_MODEL_TYPE_NAMES = {
    "v2": "Stable Diffusion 2.x", "inpainting": "an SD v1.x inpainting model (9 input channels)",
    "inpainting_v2": "an SD 2.x inpainting model", "xl_base": "SDXL", "xl_refiner": "an SDXL refiner",
    "xl_inpaint": "an SDXL inpainting model", "playground-v2-5": "Playground v2.5 (SDXL)",
    "upscale": "the SD x4 upscaler", "controlnet": "a ControlNet", "sd3": "Stable Diffusion 3",
    "sd35_medium": "Stable Diffusion 3.5", "sd35_large": "Stable Diffusion 3.5 Large",
}
_ADAPTER_MARKERS = ("lora_unet_", "lora_te_", "lora_te1_", ".lora_down.", ".lora_A.", ".hada_w1", ".lokr_w1")


def is_single_file(base: str | Path) -> bool:
    """Whether `base` names a single-file checkpoint (by suffix; it need not exist)."""
    return Path(str(base)).suffix.lower() in SINGLE_FILE_SUFFIXES


class _HeaderShapes(Mapping):
    """A safetensors header seen as {key: object with .shape}: enough for diffusers' model-type inference."""

    def __init__(self, handle: Any):
        self._handle = handle
        self._keys = list(handle.keys())
        self._key_set = set(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._key_set

    def __getitem__(self, key: str) -> Any:
        if key not in self._key_set:
            raise KeyError(key)
        shape = tuple(self._handle.get_slice(key).get_shape())
        return type("Shape", (), {"shape": shape, "ndim": len(shape)})()

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def check_base_file(path: Path, *, allow_pickle: bool = False) -> None:
    """Raise a one-line error unless `path` is an SD v1.x single-file checkpoint we may load.

    `.safetensors` headers are checked without reading tensors; a `.ckpt` (pickle) needs ``allow_pickle`` and
    is checked after loading (see :func:`load_checkpoint`).
    """
    suffix = path.suffix.lower()
    if suffix == ".ckpt":
        if not allow_pickle:
            raise UserInputError(f"base model '{path}' is a pickle checkpoint (.ckpt), which can run code when "
                                 f"loaded; use its .safetensors version or pass --allow-pickle if you trust it")
        return
    if suffix != ".safetensors":
        raise UserInputError(f"base model '{path}': expected a diffusers folder, a .safetensors or a .ckpt file")
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            problem = describe_non_sd1(_HeaderShapes(handle), has_own_config=PIPELINE_CONFIG_KEY in metadata)
    except UserInputError:
        raise
    except Exception as exc:  # a damaged header, a file that is not safetensors at all
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
        raise UserInputError(f"base model '{path}' is not a readable .safetensors file ({reason})") from None
    if problem:
        raise UserInputError(f"base model '{path}' is not an SD v1.x checkpoint: it looks like {problem}")


def describe_non_sd1(checkpoint: Mapping[str, Any], *, has_own_config: bool = False) -> str | None:
    """What a state dict in the original layout looks like when it is not a whole SD v1.x model (else None)."""
    keys = list(checkpoint)
    if not keys:
        return "an empty file (no tensors)"
    if sum(any(m in k for m in _ADAPTER_MARKERS) for k in keys) > len(keys) // 2:
        return "a LoRA / LyCORIS adapter, not a model (load it with --adapter, or merge it with `export --format " \
               "checkpoint`)"
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    try:
        model_type = infer_diffusers_model_type(checkpoint)
    except Exception:  # a key layout that trips the inference: judge by the prefixes below
        model_type = "v1"
    if model_type != "v1":
        return _MODEL_TYPE_NAMES.get(model_type, f"a '{model_type}' model (diffusers' name for it)")
    parts = {"UNet (model.diffusion_model.*)": UNET_PREFIX, "VAE (first_stage_model.*)": VAE_PREFIX,
             "CLIP text encoder (cond_stage_model.transformer.*)": CLIP_PREFIX}
    missing = [name for name, prefix in parts.items() if not any(k.startswith(prefix) for k in keys)]
    if len(missing) == len(parts):
        return f"something else (no Stable Diffusion weights; first keys: {', '.join(sorted(keys)[:3])})"
    if missing:
        return f"an incomplete SD checkpoint (no {' and no '.join(missing)})"
    if not has_own_config:
        context = checkpoint.get(UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight")
        if context is None or context.shape[-1] != 768:
            return "an SD-layout model of another architecture (no 768-wide cross-attention in the UNet)"
    return None


# -- hashing -----------------------------------------------------------------------------------------------------
def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's content, streamed; cached per (path, size, mtime) so a multi-GB base is hashed once."""
    p = Path(path).expanduser().resolve()
    stat = p.stat()
    return _sha256_cached(str(p), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=32)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(8 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_identity(base: str) -> dict[str, str]:
    """What adapter metadata records about its base: the string given, plus file name and SHA-256 for a file."""
    info = {"base_model": str(base)}
    path = Path(str(base)).expanduser()
    if is_single_file(base) and path.is_file():
        info.update(base_file=path.name, base_sha256=file_sha256(path))
    return info


# -- configs and loading -------------------------------------------------------------------------------------------
def config_folder_for(path: Path, metadata: Mapping[str, str] | None = None) -> Path:
    """The diffusers config folder to load `path` with: its own embedded configs if any, else the shipped SD v1."""
    if metadata is None:
        metadata = read_header_metadata(path)
    raw = metadata.get(PIPELINE_CONFIG_KEY)
    if not raw:
        return SD1_CONFIG_DIR
    return materialize_config(raw)


def read_header_metadata(path: Path) -> dict[str, str]:
    """The safetensors header metadata of `path` ({} for a .ckpt)."""
    if path.suffix.lower() != ".safetensors":
        return {}
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


def materialize_config(raw: str) -> Path:
    """Write embedded configs ({relative file: text}) once to a cache folder keyed by their hash; return it."""
    from lora_dreambooth.files.atomic import write_text_atomic

    try:
        files = json.loads(raw)
    except ValueError:
        raise UserInputError(f"the checkpoint's embedded '{PIPELINE_CONFIG_KEY}' is not valid JSON") from None
    root = _cache_root() / "single-file-configs" / hashlib.sha256(raw.encode()).hexdigest()[:16]
    for relative, text in files.items():
        target = root / relative
        if ".." in Path(relative).parts or Path(relative).is_absolute():
            raise UserInputError(f"the checkpoint's embedded config names an unsafe path '{relative}'")
        if not target.is_file() or target.read_text(encoding="utf-8") != text:
            write_text_atomic(target, text)
    return root


def _cache_root() -> Path:
    env = os.environ.get("LORA_DREAMBOOTH_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "lora-dreambooth"


def load_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint's state dict, read by diffusers' single-file reader (pickles with torch's weights_only)."""
    from diffusers.loaders.single_file_utils import load_single_file_checkpoint

    try:
        checkpoint = load_single_file_checkpoint(str(path), local_files_only=True)
    except Exception as exc:
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
        raise UserInputError(f"base model '{path}' cannot be read: {reason}") from None
    return checkpoint


def load_single_file_components(path: Path, *, device: torch.device | str | None = None,
                                dtype: torch.dtype | None = None) -> dict[str, Any]:
    """tokenizer, noise_scheduler (DDPM), text_encoder, unet, vae of an SD v1.x checkpoint file: fp32 on the CPU, or
    with `device`/`dtype` as a diffusers folder loads (`models.load_base`): the UNet and text encoder cast once to
    `dtype` while converting, then on `device` with the fp32 VAE. A checkpoint saved in fp16, as most are, is then
    never widened to fp32 on the CPU (4.4 s of 5.4 for SD v1.4's shapes on a 2-core host)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from transformers import CLIPTextModel, CLIPTokenizer

    metadata = read_header_metadata(path)
    config = config_folder_for(path, metadata)
    checkpoint = load_checkpoint(path)
    problem = describe_non_sd1(checkpoint, has_own_config=PIPELINE_CONFIG_KEY in metadata)
    if problem:
        raise UserInputError(f"base model '{path}' is not an SD v1.x checkpoint: it looks like {problem}")
    options = {"config": str(config), "local_files_only": True}
    placed = {"device": device} if device is not None else {}
    try:
        unet = UNet2DConditionModel.from_single_file(checkpoint, subfolder="unet", torch_dtype=dtype, **placed,
                                                     **options)
        vae = AutoencoderKL.from_single_file(checkpoint, subfolder="vae", **placed, **options)
        text_encoder = create_diffusers_clip_model_from_ldm(CLIPTextModel, checkpoint, subfolder="text_encoder",
                                                            torch_dtype=dtype, **options).to(**placed)
        tokenizer = CLIPTokenizer.from_pretrained(str(_tokenizer_folder(config)), subfolder="tokenizer")
        noise_scheduler = DDPMScheduler.from_pretrained(str(config), subfolder="scheduler")
    except Exception as exc:  # shapes that do not fit the configs, a damaged tensor
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
        raise UserInputError(f"base model '{path}' does not load as SD v1.x: {reason}") from None
    if dtype is None:  # fp32 whatever the file holds: callers cast afterwards
        text_encoder, unet = text_encoder.float(), unet.float()
    return {"tokenizer": tokenizer, "noise_scheduler": noise_scheduler, "text_encoder": text_encoder, "unet": unet,
            "vae": vae.float()}


def load_single_file_tokenizer(path: Path) -> Any:
    """The CLIP tokenizer that goes with a checkpoint file (its embedded one, else SD v1's), reading no weights."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(_tokenizer_folder(config_folder_for(path))), subfolder="tokenizer")


def _tokenizer_folder(config: Path) -> Path:
    """Embedded configs leave out the tokenizer when it is SD v1's CLIP tokenizer: the shipped one then."""
    return config if (config / "tokenizer").is_dir() else SD1_CONFIG_DIR
