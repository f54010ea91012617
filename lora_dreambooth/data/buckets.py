"""Aspect-ratio buckets: non-square photos keep their framing instead of losing their sides to a square crop.

Every photo goes to the bucket (width x height, about `resolution`² pixels, sides multiples of the model's
step) whose aspect ratio is closest to its own, is resized to cover it and centre-cropped, and is encoded once
at that size. A batch holds photos of one bucket only; which bucket and which photos is a pure function of
(seed, step), like :class:`~lora_dreambooth.data.examples.EpochSampler`, so resuming stays bit-exact.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from lora_dreambooth.data.examples import Example, encode_latents, stacked_pixel_bytes, to_device

Size = tuple[int, int]  # (width, height) in pixels
MAX_ASPECT = 2.0


def vae_factor(vae: torch.nn.Module) -> int:
    """Pixels per latent pixel (8 for SD v1.x)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def bucket_step(vae: torch.nn.Module, unet: torch.nn.Module, minimum: int = 8) -> int:
    """Pixel step that keeps latents divisible through every UNet downsampling (64 for SD v1.x)."""
    unet_factor = 2 ** (len(unet.config.down_block_types) - 1)
    return max(minimum, vae_factor(vae) * unet_factor)


def bucket_sizes(resolution: int, step: int, max_aspect: float = MAX_ASPECT) -> list[Size]:
    """Sizes of about `resolution`² pixels (never more), sides multiples of `step`, aspect at most `max_aspect`."""
    area = resolution * resolution
    sizes = {(resolution, resolution)}
    width = step
    while width <= resolution * max_aspect:
        height = (area // width) // step * step
        if height >= step and max(width / height, height / width) <= max_aspect:
            sizes.add((width, height))
        width += step
    return sorted(sizes, key=lambda s: (s[0] / s[1], s[0]))


def nearest_bucket(width: int, height: int, sizes: list[Size]) -> Size:
    """The bucket whose aspect ratio is closest to `width`/`height` (in log space; ties go to the squarer one)."""
    aspect = math.log(width / height)
    return min(sizes, key=lambda s: (abs(math.log(s[0] / s[1]) - aspect), abs(math.log(s[0] / s[1]))))


def fit_to_bucket(image: Image.Image, size: Size, resample: int = Image.BICUBIC) -> Image.Image:
    """Resize `image` to cover `size`, then centre-crop to exactly `size`."""
    width, height = size
    scale = max(width / image.width, height / image.height)
    new = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    resized = image.resize(new, resample) if new != image.size else image
    left, top = (resized.width - width) // 2, (resized.height - height) // 2
    return resized.crop((left, top, left + width, top + height))


def assign_buckets(examples: list[Example], sizes: list[Size]) -> list[Size]:
    """The bucket of each example."""
    return [nearest_bucket(e.image.width, e.image.height, sizes) for e in examples]


class BucketLatentCache:
    """Latents of every example at each of its sizes (both orientations when flipping), encoded once.

    Instance photos have one size each (their bucket); class images are encoded at every size instance
    batches use, so a prior batch always matches its instance batch.
    """

    def __init__(self, vae: torch.nn.Module, examples: list[Example], sizes: list[list[Size]], *, flip: bool,
                 seed: int, device: torch.device | str):
        generator = torch.Generator(device=next(vae.parameters()).device).manual_seed(seed)
        members: dict[Size, list[int]] = defaultdict(list)
        for index, example_sizes in enumerate(sizes):
            for size in example_sizes:
                members[size].append(index)
        self.sizes = [list(s) for s in sizes]
        self._store: dict[Size, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._row: dict[tuple[int, Size], int] = {}
        for size in sorted(members):
            pixels = stacked_pixel_bytes(fit_to_bucket(examples[i].image, size) for i in members[size])
            plain = encode_latents(vae, pixels, generator=generator).to(device)
            flipped = encode_latents(vae, pixels.flip(-1), generator=generator).to(device) if flip else None
            self._store[size] = (plain, flipped)
            self._row.update({(index, size): row for row, index in enumerate(members[size])})

    def __len__(self) -> int:
        return len(self.sizes)

    def size_of(self, index: int) -> Size:
        """The (first) size example `index` was encoded at."""
        return self.sizes[index][0]

    def batch(self, indices: torch.Tensor, flips: torch.Tensor, size: Size | None = None) -> torch.Tensor:
        """Latents of `indices` at `size` (default: the first example's own size), mirrored where `flips`."""
        index_list = [int(i) for i in indices]
        size = size or self.size_of(index_list[0])
        try:
            rows = [self._row[(i, size)] for i in index_list]
        except KeyError:
            raise ValueError(f"examples {index_list} were not all encoded at {size[0]}x{size[1]}") from None
        plain, flipped = self._store[size]
        rows_t = to_device(torch.tensor(rows), plain.device)
        latents = plain[rows_t]
        if flipped is not None:
            latents = torch.where(to_device(flips, latents.device).view(-1, 1, 1, 1), flipped[rows_t], latents)
        return latents


class MaskCache:
    """Loss masks at latent resolution, one per example at its size; all ones for photos without a mask."""

    def __init__(self, examples: list[Example], sizes: list[Size], factor: int, device: torch.device | str):
        self.masks = []
        for example, (width, height) in zip(examples, sizes):
            if example.mask is None:
                mask = torch.ones(1, height // factor, width // factor)
            else:
                fitted = fit_to_bucket(example.mask, (width, height), Image.BILINEAR)
                small = fitted.resize((width // factor, height // factor), Image.BOX)
                mask = torch.from_numpy(np.asarray(small, dtype=np.float32) / 255.0)[None]
            self.masks.append(mask.to(device))

    def batch(self, indices: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
        """(batch, 1, h, w) masks of `indices`, mirrored where `flips`."""
        return torch.stack([self.masks[int(i)].flip(-1) if bool(f) else self.masks[int(i)]
                            for i, f in zip(indices, flips)])


@dataclass
class BucketSampler:
    """Batches drawn from one bucket at a time; batch `step` of rank `rank` is a pure function of (seed, step).

    Each epoch (a generator seeded by seed and epoch) shuffles every bucket's photos, cuts them into global
    batches (a bucket's last batch is filled up with its own photos again), and shuffles the order of all
    batches. Ranks take consecutive slices of a global batch, as with :class:`~lora_dreambooth.data.examples.EpochSampler`.
    """

    buckets: list[Size]  # the bucket of each example
    batch_size: int
    seed: int
    flip: bool = False
    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        groups: dict[Size, list[int]] = defaultdict(list)
        for index, size in enumerate(self.buckets):
            groups[size].append(index)
        self._groups = [torch.tensor(groups[size]) for size in sorted(groups)]
        global_batch = self.batch_size * self.world_size
        self.batches_per_epoch = sum(math.ceil(len(g) / global_batch) for g in self._groups)
        self._epoch: tuple[int, list[torch.Tensor], torch.Tensor] | None = None

    def _plan(self, epoch: int) -> tuple[list[torch.Tensor], torch.Tensor]:
        if self._epoch is None or self._epoch[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            global_batch = self.batch_size * self.world_size
            batches: list[torch.Tensor] = []
            for members in self._groups:
                shuffled = members[torch.randperm(len(members), generator=g)]
                count = math.ceil(len(members) / global_batch)
                filled = shuffled.repeat(math.ceil(count * global_batch / len(members)))[:count * global_batch]
                batches += list(filled.view(count, global_batch))
            order = torch.randperm(len(batches), generator=g)
            coins = torch.rand(len(self.buckets), generator=g)
            self._epoch = (epoch, [batches[int(i)] for i in order], coins)
        return self._epoch[1], self._epoch[2]

    def indices(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices, flip flags) of this rank's share of global batch number `step`."""
        epoch, offset = divmod(step, self.batches_per_epoch)
        batches, coins = self._plan(epoch)
        idx = batches[offset][self.rank * self.batch_size:(self.rank + 1) * self.batch_size].clone()
        flips = (coins[idx] < 0.5) & self.flip
        return idx, flips.to(torch.bool)
