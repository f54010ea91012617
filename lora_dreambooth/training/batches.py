"""This rank's micro-batches: a pure function of (seed, micro-batch index), so N processes with batch B see the
data and noise of one process with batch N*B, and a resumed run sees those of an uninterrupted one.

A micro-batch is the instance latents first, then the prior's rows: class-image latents with their class prompt,
or (--prior-mode model) the instance latents again with their subject's class prompt.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch

from lora_dreambooth.config import TrainConfig
from lora_dreambooth.data.buckets import (BucketLatentCache, BucketSampler, MaskCache, assign_buckets, bucket_sizes,
                                          bucket_step, vae_factor)
from lora_dreambooth.data.captions import dropout_mask
from lora_dreambooth.data.examples import EpochSampler, Example, LatentCache, Shard, to_device
from lora_dreambooth.data.latent_store import LatentStore
from lora_dreambooth.data.random_crop import RandomCropLatents
from lora_dreambooth.data.subjects import Subject
from lora_dreambooth.training.losses import add_noise_offset
from lora_dreambooth.training.prompts import PromptTable

log = logging.getLogger(__name__)


@dataclass
class Placement:
    """Where this process sits: its device, rank, the number of processes, and how to gather across them."""

    device: torch.device
    rank: int = 0
    world: int = 1
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None


class MicroBatches:
    """Cached latents, samplers and prompt rows of the run; `batch`, `noise` and `masks` of any micro-batch."""

    def __init__(self, cfg: TrainConfig, instance: list[Example], class_examples: list[Example],
                 subjects: list[Subject], prompts: PromptTable, place: Placement, *, use_prior: bool,
                 model_prior: bool, num_train_timesteps: int):
        self.cfg, self.instance, self.class_examples, self.prompts, self.place = (cfg, instance, class_examples,
                                                                                  prompts, place)
        self.use_prior, self.model_prior, self.num_train_timesteps = use_prior, model_prior, num_train_timesteps
        self.instance_rows = prompts.rows([e.prompt for e in instance])
        self.fallback_rows = prompts.rows([subjects[e.subject].instance_prompt for e in instance])  # caption dropout
        self.instance_subjects = torch.tensor([e.subject for e in instance], device=place.device)
        self.class_rows = prompts.rows([e.prompt for e in class_examples])
        self.subject_class_rows = prompts.rows([s.class_prompt for s in subjects] if use_prior else [])
        self.class_latents = self.instance_masks = None

    # -- caching ------------------------------------------------------------------------------------------------
    def cache_latents(self, vae: torch.nn.Module, unet: torch.nn.Module, *, batch_size: int = 8,
                      store: LatentStore | None = None) -> None:
        """Encode every image once (per aspect-ratio bucket with --buckets), `batch_size` images per VAE call, and
        set up the samplers and masks. The VAE moves to this rank's device when it encodes. With a `store` (centre
        crops, one process), latents an earlier run encoded from the same images are loaded instead."""
        cfg, place = self.cfg, self.place
        if cfg.buckets:
            self._cache_bucket_latents(vae.to(place.device), unet)
        elif cfg.crop == "random":
            self._cache_whole_photos(vae, batch_size)
        else:
            shard = Shard(place.rank, place.world, place.gather) if place.world > 1 else None
            store = store if shard is None else None  # ranks would have to agree on every hit: each run encodes
            self.instance_latents = LatentCache(vae, self.instance, cfg.resolution, flip=cfg.flip, seed=cfg.seed,
                                                device=place.device, shard=shard, batch_size=batch_size, store=store)
            if self.class_examples:
                self.class_latents = LatentCache(vae, self.class_examples, cfg.resolution, flip=cfg.flip,
                                                 seed=cfg.seed + 1, device=place.device, shard=shard,
                                                 batch_size=batch_size, store=store)
        if not cfg.buckets:
            self.instance_sampler = EpochSampler(len(self.instance), cfg.batch_size, cfg.seed, cfg.flip,
                                                 place.rank, place.world)
        if self.class_examples:
            self.class_sampler = EpochSampler(len(self.class_examples), cfg.batch_size, cfg.seed + 1, cfg.flip,
                                              place.rank, place.world)
        if cfg.masked_loss:
            sizes = self.instance_buckets if cfg.buckets else [(cfg.resolution, cfg.resolution)] * len(self.instance)
            self.instance_masks = MaskCache(self.instance, sizes, vae_factor(vae), place.device)

    def _cache_whole_photos(self, vae: torch.nn.Module, batch_size: int) -> None:
        """--crop random: every photo encoded whole (on every process: the photos differ in size, so the encoding
        is not split); batches cut their windows from it."""
        cfg, place = self.cfg, self.place
        self.instance_latents = RandomCropLatents(vae, self.instance, cfg.resolution, flip=cfg.flip, seed=cfg.seed,
                                                  device=place.device, batch_size=batch_size)
        if self.class_examples:
            self.class_latents = RandomCropLatents(vae, self.class_examples, cfg.resolution, flip=cfg.flip,
                                                   seed=cfg.seed + 1, device=place.device, batch_size=batch_size)

    def _cache_bucket_latents(self, vae: torch.nn.Module, unet: torch.nn.Module) -> None:
        """--buckets: each photo at its aspect-ratio bucket, class images at every bucket in use; bucket batches."""
        cfg, place = self.cfg, self.place
        sizes = bucket_sizes(cfg.resolution, bucket_step(vae, unet))
        self.instance_buckets = assign_buckets(self.instance, sizes)
        used = sorted(set(self.instance_buckets))
        log.info("buckets (width x height: photos): %s",
                 ", ".join(f"{w}x{h}: {self.instance_buckets.count((w, h))}" for w, h in used))
        self.instance_latents = BucketLatentCache(vae, self.instance, [[b] for b in self.instance_buckets],
                                                  flip=cfg.flip, seed=cfg.seed, device=place.device)
        if self.class_examples:
            self.class_latents = BucketLatentCache(vae, self.class_examples, [used] * len(self.class_examples),
                                                   flip=cfg.flip, seed=cfg.seed + 1, device=place.device)
        self.instance_sampler = BucketSampler(self.instance_buckets, cfg.batch_size, cfg.seed, cfg.flip,
                                              place.rank, place.world)

    # -- one micro-batch ----------------------------------------------------------------------------------------
    def batch(self, micro_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents and prompt rows of this rank's micro-batch: instance images first, then the prior's rows."""
        device = self.place.device
        idx, flips = self.instance_sampler.indices(micro_index)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("rank %d micro-batch %d instance images %s", self.place.rank, micro_index, idx.tolist())
        latents = self._latents(self.instance_latents, self.instance_sampler, micro_index, idx, flips)
        idx_on_device = to_device(idx, device)
        rows = self.instance_rows[idx_on_device]
        if self.cfg.caption_dropout > 0:
            drop = dropout_mask(self.cfg.seed, micro_index, len(idx), self.cfg.caption_dropout,
                                rank=self.place.rank, world_size=self.place.world)
            rows = torch.where(to_device(drop, device), self.fallback_rows[idx_on_device], rows)
        if self.use_prior:
            prior_latents, prior_rows = self._prior_batch(micro_index, idx, latents)
            latents, rows = torch.cat([latents, prior_latents]), torch.cat([rows, prior_rows])
        if log.isEnabledFor(logging.DEBUG):
            log.debug("micro-batch %d prompts %s", micro_index, [self.prompts.texts[int(r)] for r in rows])
        return latents, rows

    def _prior_batch(self, micro_index: int, idx: torch.Tensor, latents: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.model_prior:  # the frozen base predicts the target for the instance latents with the class prompt
            return latents, self.subject_class_rows[self.instance_subjects[to_device(idx, self.place.device)]]
        cidx, cflips = self.class_sampler.indices(micro_index)
        if self.cfg.buckets:
            class_latents = self.class_latents.batch(cidx, cflips, self.instance_latents.size_of(int(idx[0])))
        else:
            class_latents = self._latents(self.class_latents, self.class_sampler, micro_index, cidx, cflips)
        return class_latents, self.class_rows[to_device(cidx, self.place.device)]

    @staticmethod
    def _latents(cache, sampler: EpochSampler, micro_index: int, idx: torch.Tensor, flips: torch.Tensor
                 ) -> torch.Tensor:
        if isinstance(cache, RandomCropLatents):  # --crop random: the sampler also places each window
            return cache.batch(idx, flips, sampler.positions(micro_index))
        return cache.batch(idx, flips)

    def masks(self, micro_index: int) -> tuple[torch.Tensor, ...]:
        """(mask,) of the micro-batch with --masked-loss (prior rows count everywhere), else ()."""
        if self.instance_masks is None:
            return ()
        mask = self.instance_masks.batch(*self.instance_sampler.indices(micro_index))
        return (torch.cat([mask, torch.ones_like(mask)]) if self.use_prior else mask,)

    def noise(self, latents: torch.Tensor, micro_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise and timesteps of this rank's rows, cut from draws for the whole global batch.

        The generator is seeded by (seed, micro-batch) only, so N processes with batch B see exactly the noise of
        one process with batch N*B, and a resumed run sees the noise of an uninterrupted one.
        """
        rows, world, rank = latents.shape[0], self.place.world, self.place.rank
        groups = 2 if self.use_prior else 1
        per_group = rows // groups
        g = torch.Generator(device=latents.device)
        g.manual_seed(self.cfg.seed * 1_000_003 + micro_index)
        shape = (groups, world, per_group, *latents.shape[1:])
        noise = torch.randn(shape, generator=g, device=latents.device, dtype=latents.dtype)[:, rank].flatten(0, 1)
        timesteps = torch.randint(0, self.num_train_timesteps, (groups, world, per_group), generator=g,
                                  device=latents.device)
        if self.cfg.noise_offset:  # drawn after the timesteps: runs without an offset keep their noise
            offset = torch.randn((*shape[:4], 1, 1), generator=g, device=latents.device, dtype=latents.dtype)
            noise = add_noise_offset(noise, offset[:, rank].flatten(0, 1), self.cfg.noise_offset)
        return noise, timesteps[:, rank].flatten()
