#!/usr/bin/env python
"""Load our kohya/LyCORIS files through ComfyUI's own LoRA code onto an SD v1 model and list what it applied.

    python scripts/check_comfyui.py --comfyui PATH [ADAPTER ...] [--make-adapters lora,loha,lokr,dora]
                                    [--base SD1.safetensors] [--work DIR] [--json OUT] [--site DIR]

PATH is a ComfyUI source checkout (nothing of it is copied here; it is imported in a child process). ADAPTER is
an adapter of ours (folder or file, exported to kohya on the fly) or a kohya file, made for SD v1.x. Without
--base the model is the random SD v1.4 architecture (`scripts/make_random_sd.py`), written in the original
single-file layout by our `export --format checkpoint` writer, so ComfyUI's checkpoint loader checks that too.
--make-adapters puts random adapters of those variants on that model (every factor non-zero).

For each file ComfyUI's `comfy.lora.model_lora_keys_unet/clip` + `comfy.lora.load_lora` decide which keys apply
(the rest it logs as "lora key not loaded"); the weights it patches are compared with the deltas our own loader
gives (peft merge minus base weight). Exit code 1 when a key is ignored or a delta differs.
ComfyUI needs some of its requirements to import (einops, scipy, torchsde, trampoline, psutil, safetensors; e.g.
`pip install --target DIR scipy torchsde trampoline` and `--site DIR`); torchvision is only imported by model
families off the SD v1 LoRA path, so when no CPU build of it is installed a stub stands in (reported).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMFY_PREFIXES = (("diffusion_model.", "model.diffusion_model."),
                  ("clip_l.transformer.", "cond_stage_model.transformer."))


# -- our side (this package) ---------------------------------------------------------------------------------------
def random_sd14_checkpoint(work: Path) -> Path:
    """The random SD v1.4 architecture as an fp16 single-file checkpoint in the original layout (cached)."""
    out = work / "random-sd14.safetensors"
    if out.is_file():
        return out
    from transformers import CLIPTokenizer

    sys.path.insert(0, str(REPO / "scripts"))
    from make_random_sd import build_random_sd14

    from lora_dreambooth.files.checkpoint import save_checkpoint
    from lora_dreambooth.models import BaseModel
    from lora_dreambooth.single_file import SD1_CONFIG_DIR

    pipe = build_random_sd14(seed=0)
    tokenizer = CLIPTokenizer.from_pretrained(str(SD1_CONFIG_DIR), subfolder="tokenizer")
    model = BaseModel("random-sd14", tokenizer, pipe.text_encoder, pipe.unet, pipe.vae, pipe.scheduler)
    return save_checkpoint(model, out, save_dtype="fp16")


def make_random_adapter(base: Path, variant: str, out_dir: Path, seed: int = 0) -> Path:
    """A random adapter of `variant` (rank 4) on the base's UNet and text encoder, saved in our layout."""
    import torch

    from lora_dreambooth.adapters.inject import inject_adapters
    from lora_dreambooth.adapters.variants import get_variant
    from lora_dreambooth.config import TEXT_ENCODER_TARGETS, UNET_TARGETS
    from lora_dreambooth.files.payload import payload_from_models, write_diffusers_file
    from lora_dreambooth.models import load_base

    model = load_base(str(base))
    adapters = inject_adapters(model.unet, model.text_encoder, get_variant(variant), rank=4, alpha=4.0,
                               unet_targets=UNET_TARGETS, text_encoder_targets=TEXT_ENCODER_TARGETS)
    generator = torch.Generator().manual_seed(seed)
    for component in (adapters.unet, adapters.text_encoder):
        for name, param in component.named_parameters():
            if param.requires_grad:  # every factor non-zero, so each key's contribution is visible
                scale = 1.0 if "magnitude" in name else 0.05
                param.data = (1 + 0.1 * torch.randn(param.shape, generator=generator)) * param.data \
                    if "magnitude" in name else scale * torch.randn(param.shape, generator=generator)
    summary = {"variant": variant, "token": "sks", "class_noun": "dog", "base_model": str(base), "rank": 4,
               "alpha": 4.0}
    payload = payload_from_models(model.unet, model.text_encoder, summary=summary)
    return write_diffusers_file(out_dir / variant / "pytorch_lora_weights.safetensors", payload, save_dtype="fp32")


def kohya_and_deltas(base: Path, adapter: str, work: Path) -> tuple[Path, Path]:
    """The adapter as a kohya file, and the weight deltas our own loader gives it (original-layout keys)."""
    from safetensors.torch import load_file, save_file

    from lora_dreambooth.adapters.fusing import adapter_weight_deltas
    from lora_dreambooth.files.checkpoint import text_encoder_to_original, unet_to_original
    from lora_dreambooth.files.export import export_kohya
    from lora_dreambooth.files.kohya import is_kohya_state_dict
    from lora_dreambooth.files.load_adapter import load_adapter
    from lora_dreambooth.files.metadata import resolve_adapter_file
    from lora_dreambooth.models import load_base

    source = resolve_adapter_file(adapter)
    stem = source.parent.name if source.name == "pytorch_lora_weights.safetensors" else source.stem
    kohya = source if is_kohya_state_dict(load_file(str(source)).keys()) else \
        export_kohya(source, work / f"{stem}.kohya.safetensors", save_dtype="fp32")
    model = load_base(str(base))
    pipe = model.pipeline()
    name = load_adapter(pipe, source)
    deltas = {}
    for component, to_original in (("unet", lambda s: unet_to_original(s, model.unet.config)),
                                   ("text_encoder", text_encoder_to_original)):
        found = adapter_weight_deltas(getattr(pipe, component), name)
        deltas.update(to_original({f"{module}.weight": delta for module, delta in found.items()}))
    delta_file = work / f"{stem}.deltas.safetensors"
    save_file({k: v.contiguous() for k, v in deltas.items()}, str(delta_file))
    return kohya, delta_file


# -- ComfyUI's side (child process with the ComfyUI checkout on sys.path) ----------------------------------------------
def _stub_missing(names: list[str]) -> list[str]:
    """Stand-ins for modules that cannot be imported here and that the SD v1 LoRA path never calls."""
    import importlib.abc
    import importlib.machinery
    import importlib.util
    import types

    missing = []
    for name in names:
        try:
            __import__(name)
        except Exception:
            sys.modules.pop(name, None)
            missing.append(name)
    if not missing:
        return []

    class Stub(types.ModuleType):
        def __getattr__(self, attr):
            if attr.startswith("__"):
                raise AttributeError(attr)
            return Stub(f"{self.__name__}.{attr}")

        def __call__(self, *args, **kwargs):
            raise RuntimeError(f"{self.__name__} is a stub in check_comfyui.py")

        def __mro_entries__(self, bases):
            return (object,)

    class Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, fullname, path, target=None):
            if fullname.split(".")[0] in missing:
                return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
            return None

        def create_module(self, spec):
            return Stub(spec.name)

        def exec_module(self, module):
            module.__path__ = []

    sys.meta_path.insert(0, Finder())
    return missing


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def comfy_worker(comfyui: str, base: str, pairs: list[tuple[str, str]]) -> dict:
    """Run inside the child: ComfyUI loads the base and each kohya file; returns what it applied and ignored."""
    sys.path.insert(0, comfyui)
    os.chdir(comfyui)
    stubbed = _stub_missing(["torchvision"])
    sys.argv = [sys.argv[0], "--cpu"]
    import comfy.options

    comfy.options.enable_args_parsing()
    import comfy.lora
    import comfy.lora_convert
    import comfy.sd
    import comfy.utils
    import torch
    from safetensors.torch import load_file

    capture = _Capture()
    for handler in logging.getLogger().handlers:  # ComfyUI's console output stays at its usual level
        handler.setLevel(max(handler.level, logging.INFO))
    logging.getLogger().addHandler(capture)
    logging.getLogger().setLevel(logging.DEBUG)
    model, clip, _vae = comfy.sd.load_checkpoint_guess_config(base, output_vae=True, output_clip=True)[:3]
    load_log = [m for m in capture.messages if m.startswith(("unet missing", "clip missing", "left over keys",
                                                             "model_type", "Missing", "Unexpected"))]
    report = {"base": base, "model_class": type(model.model).__name__,
              "model_config": type(model.model.model_config).__name__, "checkpoint_log": load_log,
              "stubbed_modules": stubbed, "files": []}
    for kohya, deltas in pairs:
        report["files"].append(_check_one(comfy, model, clip, kohya, load_file(deltas), capture, torch))
    return report


def _check_one(comfy, model, clip, kohya: str, expected: dict, capture: _Capture, torch) -> dict:
    lora = comfy.utils.load_torch_file(kohya)
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
    capture.messages.clear()
    patches = comfy.lora.load_lora(comfy.lora_convert.convert_lora(lora), key_map)
    ignored = sorted(m.split(": ", 1)[1] for m in capture.messages if m.startswith("lora key not loaded"))
    patched_model = set(model.clone().add_patches(patches, 1.0))
    patched_clip = set(clip.clone().add_patches(patches, 1.0))
    sds = {"model": model.model.state_dict(), "clip": clip.cond_stage_model.state_dict()}
    errors, compared, missing_expected = [], 0, []
    for key, patch in patches.items():
        name = key if isinstance(key, str) else key[0]
        sd = sds["model"] if name in sds["model"] else sds["clip"]
        original_key = _original_key(name)
        if original_key not in expected:
            missing_expected.append(name)
            continue
        weight = sd[name].float()
        got = comfy.lora.calculate_weight([(1.0, patch, 1.0, None, None)], weight.clone(), name) - weight
        want = expected[original_key].float()
        errors.append(float((got - want).abs().max() / (want.abs().max() + 1e-12)))
        compared += 1
    unpatched = sorted(set(expected) - {_original_key(k if isinstance(k, str) else k[0]) for k in patches})
    return {"file": kohya, "lora_keys": len(lora), "applied_keys": len(lora) - len(ignored),
            "ignored_keys": ignored, "weights_patched": {"unet": len(patched_model), "clip": len(patched_clip)},
            "weights_compared": compared, "max_relative_delta_error": max(errors) if errors else None,
            "our_deltas_comfyui_did_not_patch": unpatched[:20], "patched_without_our_delta": missing_expected[:20]}


def _original_key(comfy_key: str) -> str:
    for comfy_prefix, original in COMFY_PREFIXES:
        if comfy_key.startswith(comfy_prefix):
            return original + comfy_key[len(comfy_prefix):]
    return comfy_key


# -- driver ----------------------------------------------------------------------------------------------------------
def _print(report: dict) -> bool:
    print(f"ComfyUI loaded {report['base']} as {report['model_config']} ({report['model_class']}); "
          f"checkpoint log: {report['checkpoint_log'] or 'no missing or left-over keys'}; "
          f"stubbed: {report['stubbed_modules'] or 'nothing'}")
    ok = True
    for entry in report["files"]:
        print(f"{Path(entry['file']).name}: {entry['applied_keys']}/{entry['lora_keys']} keys applied, "
              f"{len(entry['ignored_keys'])} ignored {entry['ignored_keys'][:10]}; weights patched "
              f"{entry['weights_patched']}; {entry['weights_compared']} compared with our deltas, max relative error "
              f"{entry['max_relative_delta_error']:.2e}; ours not patched: {entry['our_deltas_comfyui_did_not_patch']}")
        error = entry["max_relative_delta_error"]
        ok &= not entry["ignored_keys"] and not entry["our_deltas_comfyui_did_not_patch"] and error is not None \
            and error < 1e-3
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comfyui", required=True, help="ComfyUI source checkout")
    parser.add_argument("adapters", nargs="*", help="adapters of ours or kohya files, for SD v1.x")
    parser.add_argument("--make-adapters", default="", help="comma-separated variants to create at random")
    parser.add_argument("--base", help="SD v1.x single-file checkpoint [the random SD v1.4 architecture]")
    parser.add_argument("--work", help="working folder (kept) [a temporary one]")
    parser.add_argument("--json", help="write the full report here")
    parser.add_argument("--site", default="", help="extra import path for ComfyUI's requirements (pip --target)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        job = json.loads(Path(args.worker).read_text())
        Path(job["out"]).write_text(json.dumps(comfy_worker(args.comfyui, job["base"], job["pairs"]), indent=1))
        return 0
    sys.path.insert(0, str(REPO))
    work = Path(args.work or tempfile.mkdtemp(prefix="check-comfyui-"))
    work.mkdir(parents=True, exist_ok=True)
    base = Path(args.base) if args.base else random_sd14_checkpoint(work)
    adapters = list(args.adapters)
    variants = [v for v in args.make_adapters.split(",") if v]
    adapters += [str(make_random_adapter(base, v, work / "adapters")) for v in variants]
    if not adapters:
        parser.error("give ADAPTER files or --make-adapters")
    pairs = [tuple(map(str, kohya_and_deltas(base, a, work))) for a in adapters]
    job = work / "job.json"
    job.write_text(json.dumps({"base": str(base), "pairs": pairs, "out": str(work / "comfyui-report.json")}))
    env = {**os.environ, "PYTHONPATH": args.site}
    subprocess.run([sys.executable, str(Path(__file__).resolve()), "--comfyui", str(Path(args.comfyui).resolve()),
                    "--worker", str(job)], check=True, env=env)
    report = json.loads((work / "comfyui-report.json").read_text())
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0 if _print(report) else 1


if __name__ == "__main__":
    raise SystemExit(main())
