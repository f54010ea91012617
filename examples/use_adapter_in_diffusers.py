"""Use a lora-dreambooth adapter from plain diffusers code.

    python examples/use_adapter_in_diffusers.py --base CompVis/stable-diffusion-v1-4 --adapter ./sks-dog \
        --prompt "a photo of sks dog on the beach"

Offline, after `lora-dreambooth demo` (a tiny random base, so the picture is noise):

    python examples/use_adapter_in_diffusers.py --base demo-output/tiny-base --adapter demo-output/adapter --size 64
"""
from __future__ import annotations

import argparse

import torch
from diffusers import StableDiffusionPipeline

from lora_dreambooth import load_adapter
from lora_dreambooth.files.metadata import read_summary, resolve_adapter_file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="SD v1.x diffusers folder or hub id")
    parser.add_argument("--adapter", required=True, help="folder holding pytorch_lora_weights.safetensors")
    parser.add_argument("--prompt", default=None, help="default: the adapter's own instance prompt")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--out", default="example.png")
    parser.add_argument("--checked", action="store_true", help="load through lora_dreambooth.load_adapter")
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    pipe = StableDiffusionPipeline.from_pretrained(args.base, torch_dtype=dtype, safety_checker=None,
                                                   requires_safety_checker=False).to(device)

    # What the adapter is: our metadata sits in the safetensors header (no weights are read for this).
    summary = read_summary(resolve_adapter_file(args.adapter))
    prompt = args.prompt or summary.get("instance_prompt") or "a photo"
    print(f"subject: {summary.get('token')} {summary.get('class_noun')}, trained on {summary.get('base_model')}")

    if args.checked:
        # lora-dreambooth's loader: the same call underneath, plus checks (base mismatch, another architecture,
        # pickles) and every adapter variant we train.
        name = load_adapter(pipe, args.adapter)
    else:
        # Plain diffusers: nothing from lora-dreambooth is needed to load the file.
        name = "subject"
        pipe.load_lora_weights(args.adapter, adapter_name=name)

    generator = torch.Generator("cpu").manual_seed(0)
    pipe.set_adapters([name], adapter_weights=[0.9])  # strength; pipe.disable_lora() for the base model alone
    image = pipe(prompt, num_inference_steps=25, guidance_scale=7.5, height=args.size, width=args.size,
                 generator=generator).images[0]
    image.save(args.out)
    print(f"wrote {args.out} ({prompt!r})")


if __name__ == "__main__":
    main()
