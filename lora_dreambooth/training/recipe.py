"""The DreamBooth LoRA training recipe: setup -> loop -> save, reading top to bottom.

Built from components that know nothing about this recipe (data, priors, models, adapters, losses, checkpoints,
formats). accelerate owns devices, mixed precision, DDP and checkpoint state; peft owns the adapters; diffusers
owns the file layout. Randomness is a pure function of (seed, step, rank), so a resumed run is bit-identical.
"""
from __future__ import annotations

import dataclasses
import logging
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from lora_dreambooth.adapters import get_variant, inject_adapters, trainable_parameters
from lora_dreambooth.config import TrainConfig
from lora_dreambooth.data.buckets import (BucketLatentCache, BucketSampler, MaskCache, assign_buckets, bucket_sizes,
                                          bucket_step, vae_factor)
from lora_dreambooth.data.captions import dropout_mask
from lora_dreambooth.data.examples import EpochSampler, LatentCache, Shard, load_examples
from lora_dreambooth.data.subjects import (class_image_sets, load_subject_examples, resolve_subjects,
                                           subject_run_configs, subjects_summary)
from lora_dreambooth.data.tokens import check_tokens
from lora_dreambooth.errors import TrainingDiverged, UserInputError
from lora_dreambooth.files.adapter_file import save_adapter
from lora_dreambooth.files.atomic import write_text_atomic
from lora_dreambooth.files.export import finish_adapter_folder
from lora_dreambooth.files.metadata import ADAPTER_FILENAME
from lora_dreambooth.models import load_base, resolve_base
from lora_dreambooth.training.checkpoints import (check_resume_compatible, install_adapter_hooks, latest_checkpoint,
                                               read_checkpoint_state, save_checkpoint)
from lora_dreambooth.training.graph import (CudaGraphStep, checkpoint_without_rng_state, compile_in_place,
                                         make_optimizer_capturable)
from lora_dreambooth.training.losses import add_noise_offset, denoising_target, dreambooth_loss, min_snr_weights, snr_table
from lora_dreambooth.training.lowmem import ExecutionPlan, choose_plan, device_free_bytes, footprint, quantize_frozen
from lora_dreambooth.training.optim import build_lr_scheduler, build_optimizer
from lora_dreambooth.training.priors import (check_manifest, default_class_dir, generate_class_images, plan_class_images,
                                          write_manifest)
from lora_dreambooth.training.validation import validation_due, validation_prompts, write_validation_grid
from lora_dreambooth.version import __version__

log = logging.getLogger(__name__)
WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
GRAPH_WARMUP_STEPS = 3  # eager steps before the training step is captured in a CUDA graph


@dataclass
class TrainResult:
    """What a finished (or interrupted) run produced."""

    adapter_path: Path | None
    steps_done: int
    total_steps: int
    last_loss: float | None
    interrupted: bool = False
    skipped_steps: int = 0  # optimizer steps fp16 loss scaling skipped (gradient overflow)
    adapter_paths: list[Path] = field(default_factory=list)  # --separate-adapters: every subject's adapter


class DreamBoothRecipe:
    """One training run. `setup()` builds everything, `train()` runs the loop, `save()` writes the adapter."""

    def __init__(self, config: TrainConfig):
        if config.mixed_precision == "auto":  # the effective choice is what gets saved and checked on resume
            config = config.replace(mixed_precision=auto_mixed_precision())
        self.cfg = config
        self.out = Path(config.output_dir)
        self.start_step = 0
        self.stop_requested = False
        self.skipped_steps = 0

    # -- setup ------------------------------------------------------------------------------------------------
    def setup(self) -> None:
        """Check the output folder, load data and base, make class images, cache latents, inject adapters."""
        # Cheap checks first: a bad photo, base folder or resume mismatch fails before anything is loaded or written.
        self._check_output_dir()
        self._check_resume_matches()
        self.subjects = resolve_subjects(self.cfg)
        self.instance = load_subject_examples(self.cfg, self.subjects)
        resolve_base(self.cfg.base, allow_pickle=self.cfg.allow_pickle)
        self.accelerator = self._make_accelerator()
        self.device = self.accelerator.device
        log.info("process %d/%d on %s", self.accelerator.process_index, self.accelerator.num_processes, self.device)
        self.weight_dtype = WEIGHT_DTYPES[self.cfg.mixed_precision]
        self.total_steps = self.cfg.total_steps(len(self.instance))
        self.base = load_base(self.cfg.base, allow_pickle=self.cfg.allow_pickle)
        self._adapt_to_base()
        self.plan = self._choose_plan()
        self.use_prior = self.cfg.prior and self.cfg.prior_weight > 0
        self.model_prior = self.use_prior and self.cfg.prior_mode == "model"  # no class images: the base is the prior
        self.class_examples = []
        if self.use_prior and not self.model_prior:
            self.class_examples = self._prepare_class_images()
        self._cache_latents()
        self._prepare_text()
        self._inject_adapters()
        self._prepare_optimization()
        self._maybe_resume()
        self._prepare_step_runner()

    def _check_output_dir(self) -> None:
        finished = self.out / ADAPTER_FILENAME
        if finished.exists() and not (self.cfg.overwrite or self.cfg.resume):
            raise UserInputError(f"output folder '{self.out}' already holds a finished adapter; "
                                 f"pass --overwrite to replace it or choose another --output")
        if self.out.exists() and not self.out.is_dir():
            raise UserInputError(f"--output '{self.out}' exists and is not a folder")
        if self.cfg.mixed_precision == "fp16" and not torch.cuda.is_available():
            raise UserInputError("--mixed-precision fp16 needs a CUDA GPU; on this machine use bf16 or no")

    def _check_resume_matches(self) -> None:
        """Refuse a mismatched --resume before any model loads; warn when checkpoints would be ignored."""
        checkpoint = latest_checkpoint(self.out) if self.out.is_dir() else None
        if checkpoint is None:
            return
        if not self.cfg.resume:
            log.warning("output folder '%s' holds checkpoints of an earlier run (latest: %s); this run starts "
                        "from step 0; pass --resume to continue that run instead", self.out, checkpoint.name)
            return
        check_resume_compatible(read_checkpoint_state(checkpoint)["config"], self.cfg.to_dict(), checkpoint)

    def _make_accelerator(self):
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration, set_seed

        log_with = "tensorboard" if _has_tensorboard() else None
        _reset_single_process_state()
        accelerator = Accelerator(
            mixed_precision=self.cfg.mixed_precision,
            gradient_accumulation_steps=self.cfg.gradient_accumulation,
            log_with=log_with,
            project_config=ProjectConfiguration(project_dir=str(self.out), logging_dir=str(self.out / "logs")),
        )
        set_seed(self.cfg.seed)
        if accelerator.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            if log_with:
                accelerator.init_trackers("lora-dreambooth", config=_flat_scalars(self.cfg.to_dict()))
        return accelerator

    def _adapt_to_base(self) -> None:
        """Warn about subject tokens the tokenizer splits or knows well; apply --prediction-type; SNR table."""
        if self.accelerator.is_main_process:
            check_tokens(self.base.tokenizer, [s.token for s in self.subjects])
        scheduler = self.base.noise_scheduler
        wanted, native = self.cfg.prediction_type, scheduler.config.prediction_type
        if wanted and wanted != native:
            log.warning("--prediction-type %s differs from the base scheduler's %s: generate with a scheduler "
                        "configured for %s", wanted, native, wanted)
            scheduler.register_to_config(prediction_type=wanted)
        self.snr = snr_table(scheduler, self.device) if self.cfg.snr_gamma else None

    def _prepare_class_images(self) -> list:
        """Class images of every class prompt (subjects of one class share them), generated where missing."""
        examples = []
        for prompt, class_dir in class_image_sets(self.subjects):
            examples += self._class_images(prompt, class_dir)
        return examples

    def _class_images(self, prompt: str, class_dir: str | None) -> list:
        """Generate the missing class images of `prompt` with the frozen base (split across ranks), then load them."""
        cfg, acc = self.cfg, self.accelerator
        folder = Path(class_dir) if class_dir else default_class_dir(cfg.base, prompt, cfg.resolution)
        check_manifest(folder, prompt=prompt)
        acc.wait_for_everyone()
        plan = plan_class_images(folder, cfg.num_class_images, rank=acc.process_index, world_size=acc.num_processes)
        acc.wait_for_everyone()  # all ranks have listed the folder before any of them writes into it
        if plan.missing_indices or plan.existing < cfg.num_class_images:
            log.info("class images: %d in '%s', generating %d on this process", plan.existing, folder,
                     len(plan.missing_indices))
        if plan.missing_indices:  # the frozen models reach the device only when there is something to generate
            self.base.unet.to(self.device, self.weight_dtype)
            self.base.text_encoder.to(self.device, self.weight_dtype)
            self.base.vae.to(self.device, torch.float32)  # never rounded: the same VAE then encodes the latents
            generate_class_images(self.base.pipeline, plan, prompt=prompt,
                                  resolution=cfg.resolution, steps=cfg.class_inference_steps, seed=cfg.seed * 7919 + 1)
            if self.plan.quantize:  # low-memory quantizes from the CPU copy, layer by layer
                for model in (self.base.unet, self.base.text_encoder, self.base.vae):
                    model.to("cpu")
        acc.wait_for_everyone()
        if acc.is_main_process:
            write_manifest(folder, base=cfg.base, prompt=prompt, resolution=cfg.resolution,
                           seed=cfg.seed, steps=cfg.class_inference_steps)
        examples = load_examples(folder, prompt, cfg.resolution, what="class image folder",
                                 skip_bad=True)
        return examples[: max(cfg.num_class_images, 1)]

    def _cache_latents(self) -> None:
        """Encode every image once with an fp32 VAE (per bucket with --buckets); the VAE then leaves the device."""
        cfg, acc = self.cfg, self.accelerator
        vae = self.base.vae.to(self.device, torch.float32)
        vae.use_slicing = self.plan.profile != "plain"  # one image at a time: same latents, a 512 px batch of 8
        #                                                  peaks at 6.3 GiB, one image at under 1 GiB
        self.class_latents = None
        if cfg.buckets:
            self._cache_bucket_latents(vae)
        else:
            shard = Shard(acc.process_index, acc.num_processes, acc.gather) if acc.num_processes > 1 else None
            self.instance_latents = LatentCache(vae, self.instance, cfg.resolution, flip=cfg.flip, seed=cfg.seed,
                                                device=self.device, shard=shard)
            if self.class_examples:
                self.class_latents = LatentCache(vae, self.class_examples, cfg.resolution, flip=cfg.flip,
                                                 seed=cfg.seed + 1, device=self.device, shard=shard)
            self.instance_sampler = EpochSampler(len(self.instance), cfg.batch_size, cfg.seed, cfg.flip,
                                                 acc.process_index, acc.num_processes)
        if self.class_examples:
            self.class_sampler = EpochSampler(len(self.class_examples), cfg.batch_size, cfg.seed + 1, cfg.flip,
                                              acc.process_index, acc.num_processes)
        self.instance_masks = None
        if cfg.masked_loss:
            sizes = self.instance_buckets if cfg.buckets else [(cfg.resolution, cfg.resolution)] * len(self.instance)
            self.instance_masks = MaskCache(self.instance, sizes, vae_factor(vae), self.device)
        self.base.vae.to("cpu")

    def _cache_bucket_latents(self, vae: torch.nn.Module) -> None:
        """--buckets: each photo at its aspect-ratio bucket, class images at every bucket in use; bucket batches."""
        cfg, acc = self.cfg, self.accelerator
        sizes = bucket_sizes(cfg.resolution, bucket_step(vae, self.base.unet))
        self.instance_buckets = assign_buckets(self.instance, sizes)
        used = sorted(set(self.instance_buckets))
        log.info("buckets (width x height: photos): %s",
                 ", ".join(f"{w}x{h}: {self.instance_buckets.count((w, h))}" for w, h in used))
        self.instance_latents = BucketLatentCache(vae, self.instance, [[b] for b in self.instance_buckets],
                                                  flip=cfg.flip, seed=cfg.seed, device=self.device)
        if self.class_examples:
            self.class_latents = BucketLatentCache(vae, self.class_examples, [used] * len(self.class_examples),
                                                   flip=cfg.flip, seed=cfg.seed + 1, device=self.device)
        self.instance_sampler = BucketSampler(self.instance_buckets, cfg.batch_size, cfg.seed, cfg.flip,
                                              acc.process_index, acc.num_processes)


    def _prepare_text(self) -> None:
        """Tokenize every prompt (captions, instance and class prompts) once, as rows of one table; with a frozen
        text encoder also cache its hidden states (and for --prior-mode model, the base's states in any case)."""
        tokenizer = self.base.tokenizer
        class_prompts = [s.class_prompt for s in self.subjects] if self.use_prior else []
        prompts = sorted({e.prompt for e in self.instance} | {s.instance_prompt for s in self.subjects}
                         | set(class_prompts))
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(self.device)
        self.prompts, self.prompt_ids = prompts, ids
        self.prompt_row = {p: i for i, p in enumerate(prompts)}

        def rows(texts: list[str]) -> torch.Tensor:
            return torch.tensor([self.prompt_row[t] for t in texts], dtype=torch.long, device=self.device)

        self.instance_rows = rows([e.prompt for e in self.instance])
        self.fallback_rows = rows([self.subjects[e.subject].instance_prompt for e in self.instance])  # caption dropout
        self.instance_subjects = torch.tensor([e.subject for e in self.instance], device=self.device)
        self.class_rows = rows([e.prompt for e in self.class_examples])
        self.subject_class_rows = rows(class_prompts)
        self.class_row = self.prompt_row.get(self.subjects[0].class_prompt, 0)
        self.cached_text = self.base_text = None
        if not self.cfg.train_text_encoder or self.model_prior:
            te = self.base.text_encoder.to(self.device, self.weight_dtype)
            with torch.no_grad():
                self.base_text = te(ids)[0].to(self.weight_dtype)
            if not self.cfg.train_text_encoder:
                self.cached_text = self.base_text
                te.to("cpu")


    def _choose_plan(self) -> ExecutionPlan:
        """Resolve --profile / --max-vram into what runs (CUDA graph, NF4 base, checkpointing) and say why."""
        cfg = self.cfg
        unet = footprint(self.base.unet, cfg.unet_target_modules, cfg.rank)
        te = (footprint(self.base.text_encoder, cfg.text_encoder_target_modules, cfg.rank)
              if cfg.train_text_encoder else None)
        plan = choose_plan(cfg, device=self.device, num_processes=self.accelerator.num_processes, unet=unet,
                           text_encoder=te, free_bytes=device_free_bytes(self.device))
        if self.accelerator.is_main_process:
            log.info(plan.describe())
        return plan

    def _inject_adapters(self) -> None:
        cfg, plan = self.cfg, self.plan
        unet = self.base.unet
        text_encoder = self.base.text_encoder if cfg.train_text_encoder else None
        for model in (unet, text_encoder):
            if model is not None and plan.quantize:  # never the full-precision model on the device
                quantize_frozen(model, compute_dtype=self.weight_dtype, device=self.device)
            elif model is not None:
                model.to(self.device, self.weight_dtype)
        if plan.channels_last:  # NHWC convolutions: measured ~8% faster on an H100 (BENCHMARKS.md)
            unet.to(memory_format=torch.channels_last)
        self.variant = get_variant(cfg.variant)
        self.adapters = inject_adapters(unet, text_encoder, self.variant, rank=cfg.rank, alpha=cfg.alpha,
                                        unet_targets=cfg.unet_target_modules,
                                        text_encoder_targets=cfg.text_encoder_target_modules, init=cfg.init)
        if plan.gradient_checkpointing:  # a CUDA graph cannot read RNG state; SD's blocks have no dropout anyway
            unet.enable_gradient_checkpointing(checkpoint_without_rng_state if plan.cuda_graph else None)
        if cfg.gradient_checkpointing and text_encoder is not None:
            text_encoder.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False, "preserve_rng_state": not plan.cuda_graph})

    def _prepare_optimization(self) -> None:
        cfg, acc = self.cfg, self.accelerator
        effective_batch = acc.num_processes * cfg.batch_size * cfg.gradient_accumulation
        lr_factor = effective_batch if cfg.scale_lr else 1
        if acc.is_main_process:
            log.info("effective batch: %d process(es) x %d image(s) x %d accumulation = %d instance images per step%s; "
                     "lr %g%s", acc.num_processes, cfg.batch_size, cfg.gradient_accumulation, effective_batch,
                     " (+ as many class images)" if self.use_prior else "", cfg.lr * lr_factor,
                     f" (= {cfg.lr:g} x {effective_batch}, --scale-lr)" if cfg.scale_lr else " (not scaled; --scale-lr)")
        groups = [{"params": trainable_parameters(self.base.unet), "lr": cfg.lr * lr_factor}]
        if cfg.train_text_encoder:
            groups.append({"params": trainable_parameters(self.base.text_encoder),
                           "lr": (cfg.text_encoder_lr or cfg.lr) * lr_factor})
        optimizer = build_optimizer(cfg.optimizer, groups, weight_decay=cfg.weight_decay, device=self.device)
        scheduler = build_lr_scheduler(cfg.lr_scheduler, optimizer, warmup_steps=cfg.warmup_steps,
                                       total_steps=self.total_steps, num_processes=acc.num_processes)
        install_adapter_hooks(acc)
        models = [self.base.unet] + ([self.base.text_encoder] if cfg.train_text_encoder else [])
        prepared = acc.prepare(*models, optimizer, scheduler)
        self.unet = prepared[0]
        self.text_encoder = prepared[1] if cfg.train_text_encoder else None
        self.optimizer, self.lr_scheduler = prepared[-2], prepared[-1]
        self.params = [p for group in groups for p in group["params"]]

    def _maybe_resume(self) -> None:
        if not self.cfg.resume:
            return
        checkpoint = latest_checkpoint(self.out)
        if checkpoint is None:
            log.warning("--resume: no checkpoint in '%s'; starting from step 0", self.out)
            return
        state = read_checkpoint_state(checkpoint)
        check_resume_compatible(state["config"], self.cfg.to_dict(), checkpoint)
        self.accelerator.load_state(str(checkpoint))
        self.start_step = int(state["step"])
        log.info("resumed from '%s' at step %d", checkpoint, self.start_step)

    def _prepare_step_runner(self) -> None:
        """The training step runs eagerly, or (fast and low-memory profiles) is replayed from a CUDA graph."""
        if self.plan.compile:
            compile_in_place(self.base.unet)
        self.step_runner = self._train_step
        if self.plan.cuda_graph:
            make_optimizer_capturable(self.optimizer)  # after resume: it must see the final optimizer state
            self.step_runner = CudaGraphStep(self._train_step, warmup=GRAPH_WARMUP_STEPS,
                                             after_failed_capture=lambda: self.optimizer.zero_grad(set_to_none=True))

    # -- loop -------------------------------------------------------------------------------------------------
    def train(self) -> TrainResult:
        """Run optimizer steps from `start_step` to `total_steps`, checkpointing and logging on the way."""
        cfg, acc = self.cfg, self.accelerator
        bar = _progress(self.total_steps, self.start_step, disabled=not acc.is_main_process)
        loss_sum = torch.zeros((), device=self.device)
        first_bad = torch.full((), -1, device=self.device, dtype=torch.long)
        last_loss, window_start, step = None, time.perf_counter(), self.start_step
        with _stop_on_signals(self), bar:  # the bar closes (ends its line) before any error is printed
            for step in range(self.start_step, self.total_steps):
                for micro in range(cfg.gradient_accumulation):
                    loss = self._micro_step(step * cfg.gradient_accumulation + micro)
                    loss_sum += loss.detach()
                    first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss.detach()),
                                            torch.tensor(step, device=self.device), first_bad)
                done = step + 1
                if done % cfg.log_every == 0 or done == self.total_steps or self.stop_requested:
                    last_loss = self._report(loss_sum, first_bad, done, bar, window_start)
                    loss_sum.zero_()
                    window_start = time.perf_counter()
                bar.update(1)
                if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < self.total_steps:
                    self._checkpoint(done, first_bad)
                if validation_due(cfg.validation_every, done) and acc.is_main_process:
                    self._validate(done)
                if self.stop_requested:
                    self._checkpoint(done, first_bad)
                    bar.close()
                    return TrainResult(None, done, self.total_steps, last_loss, interrupted=True,
                                       skipped_steps=self._report_skipped(done))
        bar.close()
        return TrainResult(None, self.total_steps, self.total_steps, last_loss,
                           skipped_steps=self._report_skipped(self.total_steps))

    def _checkpoint(self, done: int, first_bad: torch.Tensor) -> None:
        """Save a resumable checkpoint, but never one taken after the loss went NaN/inf."""
        self._raise_if_diverged(first_bad)
        save_checkpoint(self.accelerator, self.out, done, self.cfg.to_dict(), self.cfg.checkpoints_total_limit)

    def _raise_if_diverged(self, first_bad: torch.Tensor) -> None:
        """NaN/inf guard (one sync): stop with the step, the likely cause and the fix."""
        bad = int(self.accelerator.reduce(first_bad.clone(), "max"))
        if bad < 0:
            return
        cfg = self.cfg
        kept = latest_checkpoint(self.out)
        advice = (f"use --mixed-precision bf16 (fp16 overflows) or no, or a lower --lr (now {cfg.lr:g})"
                  if cfg.mixed_precision == "fp16" else f"lower --lr (now {cfg.lr:g}; 1e-4 is the usual value)")
        if cfg.max_grad_norm <= 0:
            advice += ", and keep --max-grad-norm 1.0"
        raise TrainingDiverged(
            f"loss became NaN/inf at step {bad + 1}; no adapter was written"
            + (f" (last good checkpoint kept: {kept})" if kept else "") + f". To fix: {advice}, and run again")

    def _report_skipped(self, steps: int) -> int:
        if self.skipped_steps:
            log.warning("fp16 loss scaling skipped %d of %d optimizer steps (gradients overflowed); a few at the "
                        "start are normal, many mean the run is unstable: try --mixed-precision bf16",
                        self.skipped_steps, steps - self.start_step)
        return self.skipped_steps

    def _micro_step(self, micro_index: int) -> torch.Tensor:
        """One micro-batch: its data and noise, the training step (eager or graph-replayed), the schedule."""
        acc = self.accelerator
        with acc.accumulate(*[m for m in (self.unet, self.text_encoder) if m is not None]):
            latents, rows = self._batch(micro_index)
            noise, timesteps = self._noise(latents, micro_index)
            loss = self.step_runner(latents, noise, timesteps, rows, *self._loss_masks(micro_index))
            if acc.sync_gradients and acc.optimizer_step_was_skipped:  # only ever true with fp16 loss scaling
                self.skipped_steps += 1
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        return loss

    def _train_step(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, rows: torch.Tensor,
                    mask: torch.Tensor | None = None) -> torch.Tensor:
        """Forward, loss, backward and optimizer step of one micro-batch.

        A function of its tensor arguments and the modules' state only (no Python values that change between
        steps), so the fast profiles can capture it once in a CUDA graph and replay it with new arguments.
        """
        acc = self.accelerator
        noisy = self.base.noise_scheduler.add_noise(latents, noise, timesteps)
        if self.text_encoder is not None:
            hidden = self.text_encoder(self.prompt_ids[rows])[0]
        else:
            hidden = self.cached_text[rows]
        prediction = self.unet(noisy.to(self.weight_dtype), timesteps, hidden).sample
        loss = self._loss(prediction, latents, noise, noisy, timesteps, rows, mask)
        acc.backward(loss)
        if acc.sync_gradients and self.cfg.max_grad_norm > 0:
            acc.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        self.optimizer.step()
        return loss

    def _batch(self, micro_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents and prompt rows of this rank's micro-batch: instance images first, then class images."""
        idx, flips = self.instance_sampler.indices(micro_index)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("rank %d micro-batch %d instance images %s", self.accelerator.process_index, micro_index,
                      idx.tolist())
        latents = self.instance_latents.batch(idx, flips)
        rows = self.instance_rows[idx.to(self.device)]
        if self.cfg.caption_dropout > 0:
            acc = self.accelerator
            drop = dropout_mask(self.cfg.seed, micro_index, len(idx), self.cfg.caption_dropout,
                                rank=acc.process_index, world_size=acc.num_processes)
            rows = torch.where(drop.to(self.device), self.fallback_rows[idx.to(self.device)], rows)
        if self.use_prior:
            prior_latents, prior_rows = self._prior_batch(micro_index, idx, latents)
            latents, rows = torch.cat([latents, prior_latents]), torch.cat([rows, prior_rows])
        if log.isEnabledFor(logging.DEBUG):
            log.debug("micro-batch %d prompts %s", micro_index, [self.prompts[int(r)] for r in rows])
        return latents, rows

    def _prior_batch(self, micro_index: int, idx: torch.Tensor, latents: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """The prior's rows: class images with their class prompt, or (--prior-mode model) the instance latents
        again with their subject's class prompt, for which the frozen base predicts the target."""
        if self.model_prior:
            return latents, self.subject_class_rows[self.instance_subjects[idx.to(self.device)]]
        cidx, cflips = self.class_sampler.indices(micro_index)
        if self.cfg.buckets:
            class_latents = self.class_latents.batch(cidx, cflips, self.instance_latents.size_of(int(idx[0])))
        else:
            class_latents = self.class_latents.batch(cidx, cflips)
        return class_latents, self.class_rows[cidx.to(self.device)]

    def _loss_masks(self, micro_index: int) -> tuple[torch.Tensor, ...]:
        """(mask,) of the micro-batch with --masked-loss (prior rows count everywhere), else ()."""
        if self.instance_masks is None:
            return ()
        mask = self.instance_masks.batch(*self.instance_sampler.indices(micro_index))
        return (torch.cat([mask, torch.ones_like(mask)]) if self.use_prior else mask,)

    def _loss(self, prediction: torch.Tensor, latents: torch.Tensor, noise: torch.Tensor, noisy: torch.Tensor,
              timesteps: torch.Tensor, rows: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """The DreamBooth loss, with the base's own prediction as the prior target (--prior-mode model), loss
        masks (--masked-loss) and min-SNR weights (--snr-gamma)."""
        cfg, scheduler, n = self.cfg, self.base.noise_scheduler, self.cfg.batch_size
        target = denoising_target(scheduler, latents, noise, timesteps)
        if self.model_prior:
            prior_target = self._base_prediction(noisy[n:], timesteps[n:], rows[n:])
            target = torch.cat([target[:n], prior_target.to(target.dtype)])
        weights = None
        if self.snr is not None:
            weights = min_snr_weights(self.snr[timesteps], cfg.snr_gamma, scheduler.config.prediction_type)
        loss, _, _ = dreambooth_loss(prediction, target, n, cfg.prior_weight, weights=weights, mask=mask)
        return loss

    @torch.no_grad()
    def _base_prediction(self, noisy: torch.Tensor, timesteps: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The frozen base's prediction (adapters off, adapter-free text states) on the prior rows."""
        unet = self.accelerator.unwrap_model(self.unet)
        unet.disable_adapters()
        try:
            with self.accelerator.autocast():
                return unet(noisy.to(self.weight_dtype), timesteps, self.base_text[rows]).sample
        finally:
            unet.enable_adapters()  # also restores requires_grad on the adapter weights

    def _noise(self, latents: torch.Tensor, micro_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise and timesteps of this rank's rows, cut from draws for the whole global batch.

        The generator is seeded by (seed, micro-batch) only, so N processes with batch B see exactly the noise of
        one process with batch N*B, and a resumed run sees the noise of an uninterrupted one.
        """
        acc, rows = self.accelerator, latents.shape[0]
        groups = 2 if self.use_prior else 1
        per_group, world, rank = rows // groups, acc.num_processes, acc.process_index
        g = torch.Generator(device=latents.device)
        g.manual_seed(self.cfg.seed * 1_000_003 + micro_index)
        shape = (groups, world, per_group, *latents.shape[1:])
        noise = torch.randn(shape, generator=g, device=latents.device, dtype=latents.dtype)[:, rank].flatten(0, 1)
        num_train = self.base.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, num_train, (groups, world, per_group), generator=g, device=latents.device)
        if self.cfg.noise_offset:  # drawn after the timesteps: runs without an offset keep their noise
            offset = torch.randn((*shape[:4], 1, 1), generator=g, device=latents.device, dtype=latents.dtype)
            noise = add_noise_offset(noise, offset[:, rank].flatten(0, 1), self.cfg.noise_offset)
        return noise, timesteps[:, rank].flatten()

    def _report(self, loss_sum: torch.Tensor, first_bad: torch.Tensor, done: int, bar: Any, since: float) -> float:
        """Sync once per logging window: mean loss, NaN guard, TensorBoard, progress bar postfix."""
        steps = (done - 1) % self.cfg.log_every + 1
        loss = float(self.accelerator.reduce(loss_sum.clone(), "mean")) / (steps * self.cfg.gradient_accumulation)
        self._raise_if_diverged(first_bad)
        lr = float(self.lr_scheduler.get_last_lr()[0])  # a device tensor when the optimizer is captured
        self.accelerator.log({"loss": loss, "lr": lr}, step=done)
        rate = steps / max(time.perf_counter() - since, 1e-9)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", its=f"{rate:.2f}")
        return loss

    # -- save -------------------------------------------------------------------------------------------------
    def save(self, result: TrainResult) -> TrainResult:
        """Write the adapter (diffusers layout + metadata), `train_config.toml`, and optional sample images."""
        acc, cfg = self.accelerator, self.cfg
        acc.wait_for_everyone()
        if log.isEnabledFor(logging.DEBUG):
            log.debug("rank %d adapter sha256 %s", acc.process_index, _params_digest(self.params))
        if acc.is_main_process:
            unet = acc.unwrap_model(self.unet)
            te = acc.unwrap_model(self.text_encoder) if self.text_encoder is not None else None
            result.adapter_path = save_adapter(self.out, unet, te, summary=self.summary(result.steps_done),
                                               save_dtype=cfg.save_dtype)
            write_text_atomic(self.out / "train_config.toml", cfg.to_toml())
            if cfg.sample_prompts:
                self._write_samples()
            finish_adapter_folder(result.adapter_path, self.summary(result.steps_done), export=cfg.export)
        acc.end_training()
        return result

    def summary(self, steps_done: int) -> dict[str, Any]:
        """Our metadata block: what a user (or the app) needs to know about this adapter."""
        cfg = self.cfg
        return {
            "token": cfg.token, "class_noun": cfg.class_noun, "instance_prompt": cfg.effective_instance_prompt,
            "class_prompt": cfg.effective_class_prompt, "base_model": cfg.base, "variant": cfg.variant,
            "rank": cfg.rank, "alpha": cfg.alpha, "steps": steps_done, "resolution": cfg.resolution,
            "train_text_encoder": cfg.train_text_encoder, "num_instance_images": len(self.instance),
            "subjects": subjects_summary(self.subjects, self.instance),
            "package": "lora-dreambooth", "version": __version__, "config": cfg.to_dict(),
        }

    def _validate(self, done: int) -> None:
        cfg, first = self.cfg, self.subjects[0]
        write_validation_grid(self.base, validation_prompts(cfg.validation_prompts, first.token, first.class_noun),
                              self.out, done, seed=cfg.seed, size=cfg.resolution,
                              inference_steps=cfg.validation_inference_steps, device=self.device,
                              accelerator=self.accelerator)

    def _write_samples(self) -> None:
        from lora_dreambooth.files.grids import save_sample_grid

        pipe = self.base.pipeline()
        pipe.vae.to(self.device, torch.float32)
        save_sample_grid(pipe, list(self.cfg.sample_prompts), self.out / "samples.png", seed=self.cfg.seed,
                         size=self.cfg.resolution)
        pipe.vae.to("cpu")


def train(config: TrainConfig) -> TrainResult:
    """Run a whole training job (the Python API behind `lora-dreambooth train`)."""
    if config.separate_adapters:
        return train_each_subject(config, train)
    recipe = DreamBoothRecipe(config)
    recipe.setup()
    result = recipe.train()
    if result.interrupted:
        recipe.accelerator.end_training()
        return result
    return recipe.save(result)


# -- small helpers the recipe uses -------------------------------------------------------------------------------
def _has_tensorboard() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


def auto_mixed_precision() -> str:
    """bf16 where the GPU supports it, fp16 on older GPUs (e.g. T4), no (fp32) on CPU."""
    import os

    if not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def _params_digest(params: list[torch.Tensor]) -> str:
    """A checksum of the adapter weights (lets a multi-process test see that ranks hold identical adapters)."""
    import hashlib

    digest = hashlib.sha256()
    for p in params:
        digest.update(p.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def _reset_single_process_state() -> None:
    """Let one Python process run several trainings (tests, the synthetic benchmark, notebooks).

    accelerate keeps a process-wide singleton that refuses a second, different `mixed_precision`; outside a
    multi-process launch nothing else shares it, so it is safe to start afresh.
    """
    import os

    from accelerate.state import AcceleratorState

    if int(os.environ.get("WORLD_SIZE", "1")) == 1 and AcceleratorState._shared_state:
        AcceleratorState._reset_state(reset_partial_state=True)


def _flat_scalars(values: dict[str, Any]) -> dict[str, Any]:
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in values.items()}


def _progress(total: int, initial: int, *, disabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", disable=disabled, dynamic_ncols=True)


class _stop_on_signals:
    """SIGINT/SIGTERM set `recipe.stop_requested`: the loop checkpoints and returns instead of dying mid-write."""

    def __init__(self, recipe: DreamBoothRecipe):
        self.recipe = recipe
        self.previous: dict[int, Any] = {}

    def __enter__(self):
        def handler(signum, frame):
            if self.recipe.stop_requested:  # second Ctrl-C: give up immediately
                raise KeyboardInterrupt
            self.recipe.stop_requested = True

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


def train_each_subject(config: TrainConfig, run_one: Callable[[TrainConfig], Any]) -> Any:
    """Train one adapter per subject with `run_one` (the ordinary `train`); returns the last run's result with
    `adapter_paths` listing every subject's adapter. With --resume, finished subjects are skipped."""

    paths: list[Path] = []
    result: Any = None
    for sub in subject_run_configs(config):
        finished = Path(sub.output_dir) / ADAPTER_FILENAME
        if config.resume and finished.exists():
            log.info("subject '%s': adapter already finished in '%s'; skipping", sub.subjects[0].label, finished)
            paths.append(finished)
            continue
        log.info("subject '%s': training its own adapter into '%s'", sub.subjects[0].label, sub.output_dir)
        result = run_one(sub)
        if result.interrupted:
            return result
        if result.adapter_path is not None:
            paths.append(Path(result.adapter_path))
    write_text_atomic(Path(config.output_dir) / "train_config.toml", config.to_toml())
    if result is None:
        result = TrainResult(None, 0, 0, None)
    return dataclasses.replace(result, adapter_path=paths[0] if paths else None, adapter_paths=paths)
