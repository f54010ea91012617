"""A Hugging Face model card (`README.md`) beside each adapter: front matter, trigger word, usage, settings.

The front matter follows the Hub's model-card metadata (base_model, license, library_name, pipeline_tag, tags,
instance_prompt), so the folder can be uploaded as is. Strings are written as JSON strings, which YAML reads
unchanged whatever they contain. The card is written atomically.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from lora_dreambooth.adapters.variants import DIFFUSERS, AdapterVariant, get_variant
from lora_dreambooth.files.atomic import write_text_atomic
from lora_dreambooth.files.metadata import ADAPTER_FILENAME

CARD_FILENAME = "README.md"
#: SD v1.x weights are released under CreativeML Open RAIL-M; an adapter trained on them inherits its terms.
DEFAULT_LICENSE = "creativeml-openrail-m"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def write_model_card(out_dir: str | Path, summary: dict[str, Any], *, variant: AdapterVariant | None = None,
                     sample_image: str | None = None, kohya_file: str | None = None,
                     license: str = DEFAULT_LICENSE) -> Path:
    """Write `out_dir/README.md` for the adapter described by `summary` (our metadata block); return its path."""
    out = Path(out_dir)
    variant = variant or get_variant(str(summary.get("variant") or "lora"))
    if sample_image is None and (out / "samples.png").is_file():
        sample_image = "samples.png"
    text = model_card_text(summary, variant=variant, sample_image=sample_image, kohya_file=kohya_file,
                           license=license)
    path = out / CARD_FILENAME
    write_text_atomic(path, text)
    return path


def model_card_text(summary: dict[str, Any], *, variant: AdapterVariant, sample_image: str | None = None,
                    kohya_file: str | None = None, license: str = DEFAULT_LICENSE) -> str:
    """The card as text (front matter + Markdown body)."""
    return _front_matter(summary, variant, license) + "\n" + _body(summary, variant, sample_image, kohya_file)


def _front_matter(summary: dict[str, Any], variant: AdapterVariant, license: str) -> str:
    base = str(summary.get("base_model") or "")
    lines = ["---"]
    if _HUB_ID.match(base) and not Path(base).expanduser().exists():
        lines.append(f"base_model: {json.dumps(base)}")
    lines += [f"license: {json.dumps(license)}", "library_name: diffusers", "pipeline_tag: text-to-image"]
    if summary.get("instance_prompt"):
        lines.append(f"instance_prompt: {json.dumps(summary['instance_prompt'])}")
    tags = ["lora", "dreambooth", "diffusers", "stable-diffusion", "stable-diffusion-diffusers", "text-to-image",
            "lora-dreambooth", variant.name]
    lines.append("tags:")
    lines += [f"- {json.dumps(tag)}" for tag in dict.fromkeys(tags)]
    lines.append("---")
    return "\n".join(lines) + "\n"


def _body(summary: dict[str, Any], variant: AdapterVariant, sample_image: str | None, kohya_file: str | None) -> str:
    token, noun = summary.get("token"), summary.get("class_noun")
    base = summary.get("base_model") or "a Stable Diffusion v1.x base"
    title = f"{token} {noun}" if token and noun else (token or "Adapter")
    parts = [f"# {title}: DreamBooth {variant.name} adapter for {base}", ""]
    if token:
        parts.append(f"Trigger word: `{token}`" + (f" (class: {noun})." if noun else "."))
    if summary.get("instance_prompt"):
        parts.append(f"Trained with the prompt `{summary['instance_prompt']}`.")
    if summary.get("imported_from"):
        parts.append(f"Imported from `{Path(str(summary['imported_from'])).name}`.")
    parts.append("")
    if sample_image:
        parts += [f"![samples]({sample_image})", ""]
    parts += _usage(summary, variant, base)
    parts += _files(summary, variant, kohya_file)
    parts += _settings(summary)
    parts += ["## License", "",
              "The adapter is derived from its base model and inherits the base model's license terms "
              f"(`{DEFAULT_LICENSE}` for the Stable Diffusion v1.x weights).", ""]
    return "\n".join(parts)


def _usage(summary: dict[str, Any], variant: AdapterVariant, base: str) -> list[str]:
    components = ("unet", "text_encoder") if summary.get("train_text_encoder", True) else ("unet",)
    native = variant.native_consumers(components, "diffusers")[DIFFUSERS] == "yes"
    prompt = f"{summary.get('instance_prompt') or summary.get('token') or 'a photo'} on the beach"
    if native:
        load = ['pipe.load_lora_weights("path/to/this/folder")']
    else:
        load = ["# diffusers' own loader does not reproduce this variant exactly; lora-dreambooth's does",
                "from lora_dreambooth import load_adapter",
                'load_adapter(pipe, "path/to/this/folder")']
    pivotal = summary.get("pivotal") or {}
    if native and pivotal:  # --pivotal: the identifier's trained embedding first
        load = [f'pipe.load_textual_inversion("path/to/this/folder/{pivotal.get("file", "embeddings.safetensors")}", '
                f'token={json.dumps(pivotal.get("token", ""))})', *load]
    return ["## Use it with diffusers", "", "```python", "import torch",
            "from diffusers import StableDiffusionPipeline", "",
            f"pipe = StableDiffusionPipeline.from_pretrained({json.dumps(str(base))}, torch_dtype=torch.float16).to(\"cuda\")",
            *load, f"image = pipe({json.dumps(prompt)}).images[0]", "```", ""]


def _files(summary: dict[str, Any], variant: AdapterVariant, kohya_file: str | None) -> list[str]:
    lines = ["## Files", "", f"- `{ADAPTER_FILENAME}`: diffusers layout, {variant.name}, with `lora_adapter_metadata`"
             " (alpha, rank) and lora-dreambooth metadata (token, prompts, settings)."]
    pivotal = summary.get("pivotal") or {}
    if pivotal:
        lines.append(f"- `{pivotal.get('file', 'embeddings.safetensors')}`: the trained embedding of the token "
                     f"`{pivotal.get('token')}` (--pivotal; A1111 textual-inversion layout).")
    if kohya_file:
        lines.append(f"- `{kohya_file}`: kohya/A1111/ComfyUI layout (`lora_unet_*`, `lora_te_*`"
                     + (", LyCORIS names" if variant.kohya_network_module != "networks.lora" else "") + ").")
    else:
        lines.append("- For A1111/ComfyUI: `lora-dreambooth export . --format kohya --out subject.safetensors`.")
    return lines + [""]


def _settings(summary: dict[str, Any]) -> list[str]:
    config = summary.get("config") or {}
    rows = [("variant", summary.get("variant")), ("init", config.get("init")), ("rank", summary.get("rank")),
            ("alpha", summary.get("alpha")), ("steps", summary.get("steps")),
            ("resolution", summary.get("resolution")), ("instance images", summary.get("num_instance_images")),
            ("text encoder trained", summary.get("train_text_encoder")), ("learning rate", config.get("lr")),
            ("optimizer", config.get("optimizer")), ("mixed precision", config.get("mixed_precision")),
            ("prior preservation", config.get("prior")), ("class prompt", summary.get("class_prompt")),
            ("seed", config.get("seed")), ("lora-dreambooth", summary.get("version"))]
    rows = [(k, v) for k, v in rows if v is not None and v != ""]
    if not rows:
        return []
    return ["## Training settings", "", "| setting | value |", "|---|---|",
            *[f"| {k} | {str(v).replace('|', '/')} |" for k, v in rows], ""]


def kohya_filename(summary: dict[str, Any]) -> str:
    """`<token>_<class>_kohya.safetensors` (A1111 and ComfyUI show the file's stem as the LoRA's name)."""
    stem = "_".join(re.sub(r"\W+", "-", str(summary[k])).strip("-") for k in ("token", "class_noun") if summary.get(k))
    return f"{stem or 'adapter'}_kohya.safetensors"


