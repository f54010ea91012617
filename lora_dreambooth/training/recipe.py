"""The DreamBooth LoRA training recipe: setup -> loop -> save, reading top to bottom.

Built from components that know nothing about this recipe (data, priors, models, adapters, batches, objective,
checkpoints, files). accelerate owns devices, mixed precision, DDP and checkpoint state; peft owns the adapters;
diffusers owns the file layout. Randomness is a pure function of (seed, step, rank), so a resumed run is
bit-identical.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lora_dreambooth.adapters import get_variant, inject_adapters
from lora_dreambooth.adapters.embeddings import add_identifier_token, attach_trained_row
from lora_dreambooth.adapters.precision import adapters_compute_in_autocast
from lora_dreambooth.config import TrainConfig
from lora_dreambooth.data.subjects import (class_image_sets, load_subject_examples, resolve_subjects,
                                           subject_run_configs, subjects_summary)
from lora_dreambooth.data.tokens import check_tokens
from lora_dreambooth.files.adapter_file import save_adapter
from lora_dreambooth.files.atomic import write_text_atomic
from lora_dreambooth.files.embeddings import EMBEDDINGS_FILENAME, pivotal_summary, write_embedding
from lora_dreambooth.files.export import finish_adapter_folder
from lora_dreambooth.files.metadata import ADAPTER_FILENAME, adapter_summary
from lora_dreambooth.models import base_identity, load_base, resolve_base
from lora_dreambooth.training.batches import MicroBatches, Placement
from lora_dreambooth.training.checkpoints import (install_adapter_hooks, latest_checkpoint, resume_from_latest,
                                                  save_checkpoint)
from lora_dreambooth.training.graph import GraphedTraining, compile_in_place, enable_checkpointing
from lora_dreambooth.training.lowmem import place_frozen_models, start_kernel_compiles
from lora_dreambooth.training.objective import DreamBoothObjective
from lora_dreambooth.training.optim import SkippedSteps, adapter_param_groups, build_lr_scheduler, build_optimizer
from lora_dreambooth.training.phases import PhaseClock, loop_phases
from lora_dreambooth.training.priors import prepare_class_images
from lora_dreambooth.training.progress import ProgressLog
from lora_dreambooth.training.prompts import PromptTable
from lora_dreambooth.training.runtime import (WEIGHT_DTYPES, StopOnSignals, apply_prediction_type, auto_mixed_precision,
                                              check_output_folder, check_resume_matches, divergence_error,
                                              make_accelerator, params_digest, progress_bar, warn_skipped_steps)
from lora_dreambooth.training.startup import (base_placement, encoding_precision, latent_batch_size, latent_store,
                                              plan_before_loading, start_before_imports)
from lora_dreambooth.training.validation import (grid_path, validation_due, validation_prompts, write_sample_images,
                                                 write_validation_grid)
from lora_dreambooth.version import __version__

log = logging.getLogger(__name__)
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
        self.trains_text = config.train_text_encoder or config.pivotal  # the text encoder runs in every step
        self.identifier = self.trained_row = None  # --pivotal: the identifier's token and its trained row
        self.out, self.start_step, self.stop_requested = Path(config.output_dir), 0, False

    # -- setup ------------------------------------------------------------------------------------------------
    def setup(self) -> None:
        """Check the output folder, load data and base, make class images, cache latents, inject adapters."""
        # Cheap checks first: a bad photo, base folder or resume mismatch fails before anything is loaded or written.
        check_output_folder(self.cfg, self.out)
        check_resume_matches(self.cfg, self.out)
        self.subjects = resolve_subjects(self.cfg)
        self.instance = load_subject_examples(self.cfg, self.subjects)
        self.location = resolve_base(self.cfg.base, allow_pickle=self.cfg.allow_pickle)  # a folder, file or hub id
        self.accelerator = make_accelerator(self.cfg, self.out)
        self.device = self.accelerator.device
        log.info("process %d/%d on %s", self.accelerator.process_index, self.accelerator.num_processes, self.device)
        self.weight_dtype = WEIGHT_DTYPES[self.cfg.mixed_precision]
        self.total_steps = self.cfg.total_steps(len(self.instance))
        self.clock = PhaseClock(self.device, announce=self.accelerator.is_main_process)
        self.plan = self.clock.run("imports + plan", self._choose_plan)  # where the weights go depends on it
        if self.accelerator.is_main_process:
            log.info(self.plan.describe())
        where = base_placement(self.cfg, self.plan, self.device, self.weight_dtype, self.early.unet_prefetch)
        self.base = self.clock.run("base load", lambda: load_base(self.cfg.base, **where))  # to the GPU, once
        self._adapt_to_base()
        self.use_prior = self.cfg.prior and self.cfg.prior_weight > 0
        self.model_prior = self.use_prior and self.cfg.prior_mode == "model"  # no class images: the base is the prior
        self.class_examples = (self.clock.run("class images", self._prepare_class_images)
                               if self.use_prior and not self.model_prior else [])
        self.clock.run("text + latent caching", self._prepare_text, self._cache_latents)
        self.clock.run("adapters + optimizer", self._inject_adapters, self._prepare_optimization, self._maybe_resume,
                       self._prepare_step_runner)

    def _choose_plan(self):  # the kernels' compile and the UNet's read may begin before the imports planning needs
        cfg, processes = self.cfg, self.accelerator.num_processes
        self.early = start_before_imports(cfg, self.location, self.device, self.weight_dtype, processes)
        plan = plan_before_loading(cfg, self.location, device=self.device, num_processes=processes, early=self.early)
        return start_kernel_compiles(plan, self.device, self.weight_dtype)  # they compile while the base loads

    def _adapt_to_base(self) -> None:
        """Warn about subject tokens the tokenizer splits or knows well; apply --prediction-type."""
        if self.accelerator.is_main_process:
            check_tokens(self.base.tokenizer, [s.token for s in self.subjects])
        if self.cfg.pivotal:  # before any prompt is tokenized: the identifier becomes one new token
            self.identifier = add_identifier_token(self.base.tokenizer, self.base.text_encoder, self.cfg.token)
        apply_prediction_type(self.base.noise_scheduler, self.cfg.prediction_type)

    def _prepare_class_images(self) -> list:
        """Class images of every class prompt (subjects of one class share them), generated where missing."""
        examples = []
        for prompt, class_dir, count in class_image_sets(self.subjects, self.cfg.num_class_images):
            cfg = self.cfg.replace(num_class_images=count)
            examples += prepare_class_images(self.base, self.accelerator, cfg, prompt=prompt,
                                             class_dir=class_dir, device=self.device, weight_dtype=self.weight_dtype,
                                             offload_after=bool(self.plan.quantize))
        return examples

    def _prepare_text(self) -> None:
        """Tokenize every prompt once; with a frozen text encoder also cache its hidden states (and for
        --prior-mode model, the base's states in any case)."""
        class_prompts = {p for s in self.subjects for p in (s.class_prompt, *s.class_prompts)} if self.use_prior \
            else set()
        self.prompts = PromptTable.build(
            self.base.tokenizer, {e.prompt for e in self.instance} | {s.instance_prompt for s in self.subjects}
            | class_prompts | {e.prompt for e in self.class_examples}, self.device)
        self.cached_text = self.base_text = None
        if not self.trains_text or self.model_prior:
            te = self.base.text_encoder.to(self.device, self.weight_dtype)
            self.base_text = self.prompts.encode(te, self.weight_dtype)
            if not self.trains_text:
                self.cached_text = self.base_text
                te.to("cpu")

    def _cache_latents(self) -> None:
        """Encode every image once with the fp32 VAE (fp16 GPUs: under fp16 autocast), then keep it off the device."""
        acc = self.accelerator
        place = Placement(self.device, acc.process_index, acc.num_processes, acc.gather)
        self.batches = MicroBatches(self.cfg, self.instance, self.class_examples, self.subjects, self.prompts, place,
                                    use_prior=self.use_prior, model_prior=self.model_prior,
                                    num_train_timesteps=self.base.noise_scheduler.config.num_train_timesteps)
        with encoding_precision(self.device, self.weight_dtype):  # the VAE moves to the device only if it encodes
            self.batches.cache_latents(self.base.vae.to(torch.float32), self.base.unet, store=latent_store(self.cfg),
                                       batch_size=latent_batch_size(self.cfg, self.plan, self.device, self.base.vae))
        self.base.vae.to("cpu")

    def _inject_adapters(self) -> None:
        cfg, plan = self.cfg, self.plan
        unet = self.base.unet
        text_encoder = self.base.text_encoder if self.trains_text else None
        place_frozen_models(unet, text_encoder, plan, device=self.device, dtype=self.weight_dtype)
        self.variant = get_variant(cfg.variant)
        self.adapters = inject_adapters(unet, text_encoder if cfg.train_text_encoder else None, self.variant,
                                        rank=cfg.rank, alpha=cfg.alpha, unet_targets=cfg.unet_target_modules,
                                        text_encoder_targets=cfg.text_encoder_target_modules, init=cfg.init,
                                        **plan.adapter_fusion())
        if self.identifier is not None:  # after injection: peft freezes every parameter it did not add
            self.trained_row = attach_trained_row(self.base.tokenizer, text_encoder, self.identifier,
                                                  cfg.effective_init_token)
        enable_checkpointing(unet, text_encoder if cfg.gradient_checkpointing else None, plan)

    def _prepare_optimization(self) -> None:
        cfg, acc = self.cfg, self.accelerator
        groups = adapter_param_groups(cfg, self.base.unet, self.base.text_encoder if self.trains_text else None,
                                      num_processes=acc.num_processes, with_prior=self.use_prior,
                                      log_it=acc.is_main_process)
        optimizer = build_optimizer(cfg.optimizer, groups, weight_decay=cfg.weight_decay, device=self.device)
        scheduler = build_lr_scheduler(cfg.lr_scheduler, optimizer, warmup_steps=cfg.warmup_steps,
                                       total_steps=self.total_steps, num_processes=acc.num_processes)
        install_adapter_hooks(acc)
        models = [self.base.unet] + ([self.base.text_encoder] if self.trains_text else [])
        ddp = not (self.plan.cuda_graph and acc.num_processes > 1)  # the graph all-reduces itself (GraphedTraining)
        models = [acc.prepare(m) if ddp else acc.prepare_model(m, evaluation_mode=True) for m in models]
        self.unet, self.text_encoder = models[0], models[1] if self.trains_text else None
        self.optimizer, self.lr_scheduler = acc.prepare(optimizer, scheduler)
        self.params = [p for group in groups for p in group["params"]]
        self.objective = DreamBoothObjective(
            self.base.noise_scheduler, acc.unwrap_model(self.unet), batch_size=cfg.batch_size,
            prior_weight=cfg.prior_weight, snr_gamma=cfg.snr_gamma, model_prior=self.model_prior,
            base_text=self.base_text, weight_dtype=self.weight_dtype, device=self.device, autocast=acc.autocast)

    def _maybe_resume(self) -> None:
        if self.cfg.resume:
            self.start_step = resume_from_latest(self.accelerator, self.out, self.cfg.to_dict(), self.optimizer)

    def _prepare_step_runner(self) -> None:
        """The step runs eagerly, or is replayed from CUDA graphs (fp16, accumulation, processes: graph.py)."""
        if self.plan.compile:
            compile_in_place(self.base.unet)
        self.step_runner, self.graph = self._train_step, None
        self.eager_skips = SkippedSteps(self.accelerator.scaler)
        if self.plan.cuda_graph:  # after resume: it takes over the restored optimizer and GradScaler state
            self.graph = GraphedTraining.build(
                self._forward_backward, self.optimizer, self.params, max_grad_norm=self.cfg.max_grad_norm,
                grad_scaler=self.accelerator.scaler if self.cfg.mixed_precision == "fp16" else None,
                world_size=self.accelerator.num_processes, accumulation=self.cfg.gradient_accumulation,
                warmup=GRAPH_WARMUP_STEPS)
            self.step_runner = self.graph.micro

    # -- loop -------------------------------------------------------------------------------------------------
    def train(self) -> TrainResult:
        """Run optimizer steps from `start_step` to `total_steps`, checkpointing and logging on the way."""
        cfg, acc = self.cfg, self.accelerator
        bar = progress_bar(self.total_steps, self.start_step, disabled=not acc.is_main_process)
        loss_sum, first_bad = torch.zeros((), device=self.device), torch.full((), -1, device=self.device)  # int64
        last_loss, window_start = None, time.perf_counter()
        self.progress = ProgressLog(cfg.progress_file, self.total_steps, self.start_step, enabled=acc.is_main_process)
        signals = StopOnSignals(lambda: setattr(self, "stop_requested", True), lambda: self.stop_requested)
        phases = loop_phases(self.clock, bar, self.plan, graph_warmup=GRAPH_WARMUP_STEPS,
                             accumulation=cfg.gradient_accumulation, steps=(self.start_step, self.total_steps),
                             on_steady=self.progress.restart_rate)  # the app's ETA skips the warm-up too
        with signals, bar:  # the bar closes (ends its line) before any error is printed
            for step in range(self.start_step, self.total_steps):
                for micro in range(cfg.gradient_accumulation):
                    loss = self._micro_step(step * cfg.gradient_accumulation + micro)
                    loss_sum += loss.detach()
                    first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss.detach()),
                                            torch.full((), step, device=self.device), first_bad)
                done = step + 1
                if done % cfg.log_every == 0 or done == self.total_steps or self.stop_requested:
                    last_loss = self._report(loss_sum, first_bad, done, bar, window_start)
                    loss_sum.zero_()
                    window_start = time.perf_counter()
                phases.step_done(done)  # paces the host, advances the bar
                if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < self.total_steps:
                    self._checkpoint(done, first_bad)
                if validation_due(cfg.validation_every, done) and acc.is_main_process:
                    self._validate(done)
                if self.stop_requested:
                    self._checkpoint(done, first_bad)
                    return self._result(bar, phases, done, last_loss, interrupted=True)
        return self._result(bar, phases, self.total_steps, last_loss)

    def _result(self, bar: Any, phases: Any, done: int, last_loss: float | None, interrupted: bool = False
                ) -> TrainResult:
        bar.close()  # before any warning, so that it starts on a line of its own
        phases.finish()
        self.progress.write(done, event="interrupted" if interrupted else "done", loss=last_loss)
        skipped = warn_skipped_steps(self._skipped_steps(), done - self.start_step)
        return TrainResult(None, done, self.total_steps, last_loss, interrupted=interrupted, skipped_steps=skipped)

    def _micro_step(self, micro_index: int) -> torch.Tensor:
        """One micro-batch: its data and noise, the training step (eager or graph-replayed), the schedule."""
        acc = self.accelerator
        with acc.accumulate(*[m for m in (self.unet, self.text_encoder) if m is not None]):
            latents, rows = self.batches.batch(micro_index)
            noise, timesteps = self.batches.noise(latents, micro_index)
            loss = self.step_runner(latents, noise, timesteps, rows, *self.batches.masks(micro_index))
            if self.graph is not None and acc.sync_gradients:
                self.graph.finish()  # all-reduce and optimizer update; fp16 skips are counted on the device
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=self.graph is None)  # the graph's gradients are static: in place
        return loss

    def _loss(self, unet, text_encoder, latents, noise, timesteps, rows, mask) -> torch.Tensor:
        noisy = self.base.noise_scheduler.add_noise(latents, noise, timesteps)
        with adapters_compute_in_autocast((unet, text_encoder), enabled=self.cfg.mixed_precision != "no"):
            hidden = text_encoder(self.prompts.ids[rows])[0] if text_encoder is not None else self.cached_text[rows]
            prediction = unet(noisy.to(self.weight_dtype), timesteps, hidden).sample
        return self.objective(prediction, latents, noise, noisy, timesteps, rows, mask)

    def _train_step(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, rows: torch.Tensor,
                    mask: torch.Tensor | None = None) -> torch.Tensor:
        """The eager step through accelerate: forward, loss, backward (DDP, GradScaler), clipping, optimizer."""
        acc = self.accelerator
        loss = self._loss(self.unet, self.text_encoder, latents, noise, timesteps, rows, mask)
        acc.backward(loss)
        if acc.sync_gradients and self.cfg.max_grad_norm > 0:
            acc.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        self.eager_skips.step(self.optimizer)  # fp16: counts GradScaler's skipped steps on the device
        return loss

    def _forward_backward(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                          rows: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The graph path's micro-batch: forward, loss, backward (fp16-scaled, 1/k) into the static gradients, on the
        unwrapped modules (DDP hooks cannot run in a capture: GraphedTraining all-reduces the flat gradients)."""
        acc = self.accelerator
        te = acc.unwrap_model(self.text_encoder) if self.text_encoder is not None else None
        loss = self._loss(acc.unwrap_model(self.unet), te, latents, noise, timesteps, rows, mask)
        self.graph.scale_loss(loss / self.cfg.gradient_accumulation).backward()
        return loss

    def _skipped_steps(self) -> int:
        return self.eager_skips.count() + (self.graph.skipped_steps() if self.graph is not None else 0)

    def _report(self, loss_sum: torch.Tensor, first_bad: torch.Tensor, done: int, bar: Any, since: float) -> float:
        """Sync once per logging window: mean loss, NaN guard, TensorBoard, progress bar postfix."""
        steps = (done - 1) % self.cfg.log_every + 1
        loss = float(self.accelerator.reduce(loss_sum.clone(), "mean")) / (steps * self.cfg.gradient_accumulation)
        self._raise_if_diverged(first_bad)
        lr = float(self.lr_scheduler.get_last_lr()[0])  # a device tensor when the optimizer is captured
        self.accelerator.log({"loss": loss, "lr": lr}, step=done)
        rate = self.progress.window_rate(done - steps, since, done)  # the warm-up's slow steps do not count
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", its=f"{rate:.2f}")
        self.progress.write(done, loss=loss, lr=lr)
        return loss

    def _checkpoint(self, done: int, first_bad: torch.Tensor) -> None:
        """Save a resumable checkpoint, but never one taken after the loss went NaN/inf."""
        self._raise_if_diverged(first_bad)
        if self.graph is not None:  # accelerate saves its GradScaler: the device scaler's state goes into it
            self.graph.store_scaler_state(self.accelerator.scaler)
        save_checkpoint(self.accelerator, self.out, done, self.cfg.to_dict(), self.cfg.checkpoints_total_limit)

    def _raise_if_diverged(self, first_bad: torch.Tensor) -> None:
        """NaN/inf guard (one sync): stop with the step, the likely cause and the fix."""
        bad = int(self.accelerator.reduce(first_bad.clone(), "max"))
        if bad >= 0:
            raise divergence_error(self.cfg, bad, latest_checkpoint(self.out))

    def _validate(self, done: int) -> None:
        cfg, first = self.cfg, self.subjects[0]
        write_validation_grid(self.base, validation_prompts(cfg.validation_prompts, first.token, first.class_noun),
                              self.out, done, seed=cfg.seed, size=cfg.resolution,
                              inference_steps=cfg.validation_inference_steps, device=self.device,
                              accelerator=self.accelerator)
        self.progress.validation(done, grid_path(self.out, done))

    # -- save -------------------------------------------------------------------------------------------------
    def save(self, result: TrainResult) -> TrainResult:
        """Write the adapter (diffusers layout + metadata), `train_config.toml`, and optional sample images."""
        acc = self.accelerator
        acc.wait_for_everyone()
        if log.isEnabledFor(logging.DEBUG):
            log.debug("rank %d adapter sha256 %s", acc.process_index, params_digest(self.params))
        self.clock.run("save", lambda: self._write_outputs(result))
        acc.end_training()
        self.clock.log_summary(acc.is_main_process)
        return result

    def _write_outputs(self, result: TrainResult) -> None:
        acc, cfg = self.accelerator, self.cfg
        if acc.is_main_process:
            unet = acc.unwrap_model(self.unet)
            te = acc.unwrap_model(self.text_encoder) if self.text_encoder is not None else None
            result.adapter_path = save_adapter(self.out, unet, te if cfg.train_text_encoder else None,
                                               summary=self.summary(result.steps_done), save_dtype=cfg.save_dtype)
            if self.trained_row is not None:  # the trained row joins the matrix: the in-memory model is the saved one
                write_embedding(self.out / EMBEDDINGS_FILENAME, cfg.token, self.trained_row.bake(),
                                init_token=cfg.effective_init_token)
            write_text_atomic(self.out / "train_config.toml", cfg.to_toml())
            if cfg.sample_prompts:
                write_sample_images(self.base, list(cfg.sample_prompts), self.out / "samples.png", device=self.device,
                                    seed=cfg.seed, size=cfg.resolution)
            finish_adapter_folder(result.adapter_path, self.summary(result.steps_done), export=cfg.export)

    def summary(self, steps_done: int) -> dict[str, Any]:
        """Our metadata block: what a user (or the app) needs to know about this adapter."""
        return {**adapter_summary(self.cfg, steps=steps_done, num_instance_images=len(self.instance),
                                  subjects=subjects_summary(self.subjects, self.instance), version=__version__,
                                  base=base_identity(self.cfg.base)), **pivotal_summary(self.cfg)}


def train(config: TrainConfig) -> TrainResult:
    """Run a whole training job (the Python API behind `lora-dreambooth train`)."""
    if config.separate_adapters:
        return train_each_subject(config)
    recipe = DreamBoothRecipe(config)
    recipe.setup()
    result = recipe.train()
    if result.interrupted:
        recipe.accelerator.end_training()
        return result
    return recipe.save(result)


def train_each_subject(config: TrainConfig) -> TrainResult:
    """--separate-adapters: one adapter per subject, each an ordinary run into `OUT/<name>/`; returns the last run's
    result with `adapter_paths` listing every subject's adapter. With --resume, finished subjects are skipped."""
    paths: list[Path] = []
    result = TrainResult(None, 0, 0, None)
    for sub in subject_run_configs(config):
        finished = Path(sub.output_dir) / ADAPTER_FILENAME
        if config.resume and finished.exists():
            log.info("subject '%s': adapter already finished in '%s'; skipping", sub.subjects[0].label, finished)
            paths.append(finished)
            continue
        log.info("subject '%s': training its own adapter into '%s'", sub.subjects[0].label, sub.output_dir)
        result = train(sub)
        if result.interrupted:
            return result
        if result.adapter_path is not None:
            paths.append(Path(result.adapter_path))
    write_text_atomic(Path(config.output_dir) / "train_config.toml", config.to_toml())
    return dataclasses.replace(result, adapter_path=paths[0] if paths else None, adapter_paths=paths)
