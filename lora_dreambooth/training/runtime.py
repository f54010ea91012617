"""The run's surroundings: the accelerator, the effective precision, progress bar, signals, divergence advice.

Nothing here knows the recipe: each piece takes the values it needs.
"""
from __future__ import annotations

import hashlib
import logging
import os
import signal
from pathlib import Path
from typing import Any, Callable

import torch

from lora_dreambooth.config import TrainConfig
from lora_dreambooth.errors import TrainingDiverged, UserInputError
from lora_dreambooth.files.metadata import ADAPTER_FILENAME
from lora_dreambooth.models import prefer_flash_attention
from lora_dreambooth.training.checkpoints import check_resume_compatible, latest_checkpoint, read_checkpoint_state

log = logging.getLogger(__name__)
WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def auto_mixed_precision() -> str:
    """bf16 where the GPU supports it, fp16 on older GPUs (e.g. T4), no (fp32) on CPU."""
    if not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def make_accelerator(cfg: TrainConfig, out: Path):
    """An accelerate `Accelerator` for this run (precision, accumulation, TensorBoard in `out/logs` when installed);
    seeds every RNG, creates the output folder on the main process and picks the attention kernels that start
    fastest on its device (`models.prefer_flash_attention`)."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed

    log_with = "tensorboard" if has_tensorboard() else None
    reset_single_process_state()
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.gradient_accumulation,
        log_with=log_with,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
    )
    set_seed(cfg.seed)
    prefer_flash_attention(accelerator.device)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        if log_with:
            accelerator.init_trackers("lora-dreambooth", config=flat_scalars(cfg.to_dict()))
    return accelerator


def has_tensorboard() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


def reset_single_process_state() -> None:
    """Let one Python process run several trainings (tests, the synthetic benchmark, notebooks).

    accelerate keeps a process-wide singleton that refuses a second, different `mixed_precision`; outside a
    multi-process launch nothing else shares it, so it is safe to start afresh.
    """
    from accelerate.state import AcceleratorState

    if int(os.environ.get("WORLD_SIZE", "1")) == 1 and AcceleratorState._shared_state:
        AcceleratorState._reset_state(reset_partial_state=True)


def flat_scalars(values: dict[str, Any]) -> dict[str, Any]:
    """TensorBoard's hparams take scalars and strings only."""
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in values.items()}


def progress_bar(total: int, initial: int, *, disabled: bool):
    """The training progress bar (steps, rate, ETA)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", disable=disabled, dynamic_ncols=True)


def params_digest(params: list[torch.Tensor]) -> str:
    """A checksum of the adapter weights (lets a multi-process test see that ranks hold identical adapters)."""
    digest = hashlib.sha256()
    for p in params:
        digest.update(p.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def divergence_error(cfg: TrainConfig, bad_step: int, kept_checkpoint: Path | None) -> TrainingDiverged:
    """The NaN/inf error: the step, the checkpoint kept, the likely cause and the fix."""
    advice = (f"use --mixed-precision bf16 (fp16 overflows) or no, or a lower --lr (now {cfg.lr:g})"
              if cfg.mixed_precision == "fp16" else f"lower --lr (now {cfg.lr:g}; 1e-4 is the usual value)")
    if cfg.max_grad_norm <= 0:
        advice += ", and keep --max-grad-norm 1.0"
    return TrainingDiverged(
        f"loss became NaN/inf at step {bad_step + 1}; no adapter was written"
        + (f" (last good checkpoint kept: {kept_checkpoint})" if kept_checkpoint else "")
        + f". To fix: {advice}, and run again")


class StopOnSignals:
    """SIGINT/SIGTERM call `request_stop` (the loop then checkpoints and returns instead of dying mid-write);
    a second signal while a stop is pending raises KeyboardInterrupt at once."""

    def __init__(self, request_stop: Callable[[], None], stop_pending: Callable[[], bool]):
        self.request_stop, self.stop_pending = request_stop, stop_pending
        self.previous: dict[int, Any] = {}

    def __enter__(self):
        def handler(signum, frame):
            if self.stop_pending():
                raise KeyboardInterrupt
            self.request_stop()

        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self.previous[sig] = signal.signal(sig, handler)
            except ValueError:  # not in the main thread
                pass
        return self

    def __exit__(self, *exc):
        for sig, old in self.previous.items():
            signal.signal(sig, old)
        return False


def check_output_folder(cfg: TrainConfig, out: Path) -> None:
    """Refuse to overwrite a finished adapter (unless --overwrite/--resume), a file in place of the folder, and fp16
    without a GPU, before anything loads."""
    if (out / ADAPTER_FILENAME).exists() and not (cfg.overwrite or cfg.resume):
        raise UserInputError(f"output folder '{out}' already holds a finished adapter; "
                             f"pass --overwrite to replace it or choose another --output")
    if out.exists() and not out.is_dir():
        raise UserInputError(f"--output '{out}' exists and is not a folder")
    if cfg.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise UserInputError("--mixed-precision fp16 needs a CUDA GPU; on this machine use bf16 or no")


def check_resume_matches(cfg: TrainConfig, out: Path) -> None:
    """Refuse a mismatched --resume before any model loads; warn when checkpoints would be ignored."""
    checkpoint = latest_checkpoint(out) if out.is_dir() else None
    if checkpoint is None:
        return
    if not cfg.resume:
        log.warning("output folder '%s' holds checkpoints of an earlier run (latest: %s); this run starts "
                    "from step 0; pass --resume to continue that run instead", out, checkpoint.name)
        return
    check_resume_compatible(read_checkpoint_state(checkpoint)["config"], cfg.to_dict(), checkpoint)


def warn_skipped_steps(skipped: int, steps: int) -> int:
    """Say how many optimizer steps fp16 loss scaling skipped (when any); returns `skipped`."""
    if skipped:
        log.warning("fp16 loss scaling skipped %d of %d optimizer steps (gradients overflowed); a few at the "
                    "start are normal, many mean the run is unstable: try --mixed-precision bf16", skipped, steps)
    return skipped


def apply_prediction_type(scheduler, wanted: str | None) -> None:
    """--prediction-type: train for `wanted` (epsilon / v_prediction) even where the base's scheduler says otherwise."""
    native = scheduler.config.prediction_type
    if wanted and wanted != native:
        log.warning("--prediction-type %s differs from the base scheduler's %s: generate with a scheduler "
                    "configured for %s", wanted, native, wanted)
        scheduler.register_to_config(prediction_type=wanted)
