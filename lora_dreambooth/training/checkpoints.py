"""Resumable checkpoints through accelerate's `save_state`/`load_state`, holding only the adapter weights.

accelerate saves the optimizer, LR scheduler, grad scaler and RNG states; our hooks replace its full-model
weights with the adapters alone (a few MB instead of 3.4 GB for SD v1.4). A checkpoint folder is written under a
`.partial` name and renamed when complete, so `checkpoint-N` always means a finished checkpoint; old ones are
pruned only after the new one exists.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from lora_dreambooth.errors import UserInputError

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "trainer_state.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")
#: Options that may change between a checkpoint and its resumption without changing the maths.
RESUMABLE_CHANGES = frozenset({"resume", "overwrite", "checkpoint_every", "checkpoints_total_limit", "log_every",
                               "sample_prompts", "output_dir", "skip_bad_images", "instance_dir", "class_dir",
                               "allow_pickle", "compile", "export", "validation_prompts", "validation_every",
                               "validation_inference_steps", "progress_file", "latent_cache"})


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Finished checkpoints, oldest first."""
    root = Path(output_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _NAME.match(p.name))
             and (p / STATE_FILE).is_file()]
    return sorted(found)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest finished checkpoint, or None."""
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def install_adapter_hooks(accelerator: Any) -> None:
    """Make accelerate checkpoint the adapters of its prepared models instead of the full models."""
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    from lora_dreambooth.adapters.embeddings import ROW_MODULE, row_state

    def save_hook(models: list, weights: list, output_dir: str) -> None:
        for i, model in enumerate(models):
            model = accelerator.unwrap_model(model)
            state = get_peft_model_state_dict(model, save_embedding_layers=False) if _has_peft(model) else {}
            state = {**state, **row_state(model)}  # --pivotal: the identifier's embedding row
            save_file({k: v.detach().cpu().contiguous() for k, v in state.items()},
                      str(Path(output_dir) / f"adapter_{i}.safetensors"))
        weights.clear()  # accelerate must not write the full models

    def load_hook(models: list, input_dir: str) -> None:
        for i, model in enumerate(list(models)):
            model = accelerator.unwrap_model(model)
            state = load_file(str(Path(input_dir) / f"adapter_{i}.safetensors"))
            rows = row_state(model)
            for name in [k for k in state if ROW_MODULE in k]:
                if name not in rows:
                    raise UserInputError(f"checkpoint '{input_dir}' does not match the model: unexpected {name}")
                rows[name].data.copy_(state.pop(name))
            if not _has_peft(model):
                continue
            result = set_peft_model_state_dict(model, state)
            unexpected = getattr(result, "unexpected_keys", None)
            if unexpected:
                raise UserInputError(f"checkpoint '{input_dir}' does not match the model: unexpected {unexpected[:3]}")
        models.clear()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def _has_peft(model: Any) -> bool:
    return bool(getattr(model, "peft_config", None))


def save_checkpoint(accelerator: Any, output_dir: str | Path, step: int, config: dict[str, Any],
                    total_limit: int | None) -> Path:
    """Write `checkpoints/checkpoint-<step>` atomically, then prune beyond `total_limit`."""
    root = Path(output_dir) / CHECKPOINT_DIR
    final = root / f"checkpoint-{step}"
    partial = root / f".checkpoint-{step}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()  # every rank has written its RNG state into `partial` before it is renamed
    if accelerator.is_main_process:
        (partial / STATE_FILE).write_text(json.dumps({"step": step, "config": config}, indent=2, sort_keys=True))
        if final.exists():
            shutil.rmtree(final)
        partial.rename(final)
        if total_limit is not None:
            for _, old in list_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def read_checkpoint_state(checkpoint: Path) -> dict[str, Any]:
    """The step and config stored with a checkpoint."""
    return json.loads((checkpoint / STATE_FILE).read_text())


def check_resume_compatible(saved: dict[str, Any], current: dict[str, Any], checkpoint: Path) -> None:
    """Refuse to resume when an option that changes the maths differs from the checkpoint's."""
    from lora_dreambooth.config import TrainConfig

    # An option absent from an older checkpoint had its default then (fields added later default to old behaviour).
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}
    defaults = {k: list(v) if isinstance(v, tuple) else v for k, v in defaults.items()}
    saved = {**defaults, **saved}
    current = {**defaults, **current}
    keys = (set(saved) | set(current)) - RESUMABLE_CHANGES
    changed = sorted(k for k in keys if saved.get(k) != current.get(k))
    if changed:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in changed[:4])
        raise UserInputError(f"cannot resume from '{checkpoint}': options differ from the checkpoint ({details}); "
                             f"use the original options or start over with --overwrite")


def resume_from_latest(accelerator: Any, output_dir: str | Path, config: dict[str, Any],
                       optimizer: torch.optim.Optimizer | None = None) -> int:
    """--resume: load the latest checkpoint of `output_dir` into `accelerator` (after checking that `config` may
    continue it) and return its step; 0 (with a warning) when there is none. How `optimizer` runs stays as this
    run built it (see :func:`keep_execution_flags`)."""
    checkpoint = latest_checkpoint(output_dir)
    if checkpoint is None:
        log.warning("--resume: no checkpoint in '%s'; starting from step 0", output_dir)
        return 0
    state = read_checkpoint_state(checkpoint)
    check_resume_compatible(state["config"], config, checkpoint)
    with keep_execution_flags(optimizer):
        accelerator.load_state(str(checkpoint))
    log.info("resumed from '%s' at step %d", checkpoint, int(state["step"]))
    return int(state["step"])


#: Optimizer options that say how a step runs, not what it computes.
EXECUTION_FLAGS = ("fused", "foreach", "capturable")


@contextmanager
def keep_execution_flags(optimizer: torch.optim.Optimizer | None) -> Iterator[None]:
    """Keep `optimizer`'s execution flags (fused, foreach, capturable) through a `load_state_dict` inside the block.

    torch saves them in the param groups, so a checkpoint written on a CPU (plain AdamW) would turn a GPU run's
    fused AdamW back into a plain one, which the CUDA graph cannot capture. The state is loaded again with this
    run's flags, so torch also places it as they require (`step` on the device for fused/capturable).
    """
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it
    built = [{k: g[k] for k in EXECUTION_FLAGS if k in g} for g in inner.param_groups] if inner is not None else []
    yield
    if inner is None:
        return
    state = inner.state_dict()
    if any(group.get(k) != v for group, flags in zip(state["param_groups"], built) for k, v in flags.items()):
        for group, flags in zip(state["param_groups"], built):
            group.update(flags)
        inner.load_state_dict(state)
