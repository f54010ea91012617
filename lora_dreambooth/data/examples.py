"""Training examples: photos + prompts, resized and cropped, encoded once to latents, sampled deterministically."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from PIL import Image, ImageOps

from lora_dreambooth.data.images import decode_workers, find_images, load_image, load_images
from lora_dreambooth.data.latent_store import LatentStore
from lora_dreambooth.errors import UserInputError

log = logging.getLogger(__name__)


MASK_SUFFIX = ".mask.png"


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A small host tensor (indices, flags) on `device` without making the host wait for the device.

    A plain copy from pageable host memory synchronises the CUDA stream: in the training loop that made the host
    wait for the queued steps to finish before it could prepare the next batch, so the GPU idled meanwhile. From
    pinned memory the copy is queued like a kernel.
    """
    device = torch.device(device)
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


@dataclass
class Example:
    """One training image (already RGB, short side = resolution) and the prompt it is trained with."""

    path: Path
    image: Image.Image
    prompt: str
    subject: int = 0  # index of its subject in a multi-subject run
    mask: Image.Image | None = None  # loss weight (mode L, same size as `image`; white = subject)


def load_examples(folder: str | Path, prompt: str, resolution: int, *, what: str = "instance folder",
                  skip_bad: bool = False, prompts: Callable[[list[Path]], list[str]] | None = None,
                  masks: bool = False, subject: int = 0) -> list[Example]:
    """Find, validate and decode every photo in `folder`, resize its short side to `resolution`.

    `prompts` maps the photos' paths to their prompts (captions); without it every photo gets `prompt`. With
    `masks`, each photo's loss mask is read from `photo.mask.png` or its alpha channel. Mask files are never
    taken for photos.
    """
    paths = [p for p in find_images(folder, what=what) if not is_mask_file(p)]
    if not paths:
        raise UserInputError(f"{what} '{folder}' holds only mask images (*{MASK_SUFFIX}), no photo")
    loaded = load_images(paths, min_size=resolution, skip_bad=skip_bad, workers=decode_workers())
    texts = prompts([path for path, _ in loaded]) if prompts else [prompt] * len(loaded)
    examples = []
    for (path, image), text in zip(loaded, texts):
        mask = load_mask(path, image.size) if masks else None
        resized = resize_short_side(image, resolution)
        if mask is not None:
            mask = mask.resize(resized.size, Image.BILINEAR) if mask.size != resized.size else mask
        examples.append(Example(path, resized, text, subject, mask))
    return examples


def is_mask_file(path: Path) -> bool:
    """`photo.mask.png` files are loss masks, not photos."""
    return path.name.lower().endswith(MASK_SUFFIX)


def load_mask(image_path: Path, size: tuple[int, int]) -> Image.Image | None:
    """The loss mask of a photo (mode L): `photo.mask.png` beside it, else its alpha channel, else None.

    `size` is the decoded (EXIF-oriented) photo's size; a mask file of another size is an error naming it.
    """
    mask_path = image_path.with_name(image_path.stem + MASK_SUFFIX)
    if mask_path.is_file():
        mask = load_image(mask_path).convert("L")
        if mask.size != size:
            raise UserInputError(f"mask '{mask_path}' is {mask.width}x{mask.height} but its photo is "
                                 f"{size[0]}x{size[1]}; masks must match their photo's size")
        return mask
    with Image.open(image_path) as raw:
        if raw.mode not in ("RGBA", "LA", "PA", "RGBa", "La") and "transparency" not in raw.info:
            return None
        oriented = ImageOps.exif_transpose(raw) or raw
        alpha = oriented.convert("RGBA").getchannel("A")
    return alpha if alpha.size == size else alpha.resize(size, Image.BILINEAR)


def resize_short_side(image: Image.Image, size: int) -> Image.Image:
    """Resize so the shorter side is `size` (bicubic; Lanczos when shrinking a lot)."""
    w, h = image.size
    scale = size / min(w, h)
    if scale == 1:
        return image
    new = (max(size, round(w * scale)), max(size, round(h * scale)))
    resample = Image.LANCZOS if scale < 0.5 else Image.BICUBIC
    return image.resize(new, resample)


def crop_box(image: Image.Image, size: int, *, random_crop: bool, generator: torch.Generator | None = None
             ) -> tuple[int, int, int, int]:
    """A `size`x`size` box: centred, or at a position drawn from `generator`."""
    w, h = image.size
    if random_crop:
        left = int(torch.randint(0, w - size + 1, (1,), generator=generator)) if w > size else 0
        top = int(torch.randint(0, h - size + 1, (1,), generator=generator)) if h > size else 0
    else:
        left, top = (w - size) // 2, (h - size) // 2
    return left, top, left + size, top + size


def centre_crop(image: Image.Image, size: int) -> Image.Image:
    """The centre `size`x`size` crop of `image`."""
    return image.crop(crop_box(image, size, random_crop=False))


def stacked_pixel_bytes(images: Iterable[Image.Image]) -> torch.Tensor:
    """Same-sized RGB `images` as one uint8 tensor (n, 3, height, width): a quarter of the float pixels' bytes,
    converted where the VAE runs (`encode_latents` does it chunk by chunk on its device)."""
    return torch.from_numpy(np.stack([np.asarray(image, dtype=np.uint8).transpose(2, 0, 1) for image in images]))


def pixels_from_bytes(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels (..., 3, H, W) as contiguous float32 in [-1, 1]."""
    return (pixels.to(torch.float32) / 127.5 - 1.0).contiguous()


@torch.no_grad()
def encode_latents(vae: torch.nn.Module, pixels: torch.Tensor, *,
                   generator: torch.Generator | list[torch.Generator] | None = None, batch_size: int = 8
                   ) -> torch.Tensor:
    """VAE latents (already multiplied by the scaling factor) of a pixel batch, in fp32, chunked.

    `pixels`: floats in [-1, 1], or uint8 (`stacked_pixel_bytes`), converted chunk by chunk on the VAE's device.
    `generator`: one for the whole batch, one per image (a list), or None for the posterior mean.
    Under fp16 autocast (the caller's: GPUs without fast fp32, see `encoding_precision`), a chunk whose latents
    overflow fp16 is encoded again in fp32 with the same noise.
    """
    device = next(vae.parameters()).device
    dtype = next(vae.parameters()).dtype
    out = []
    for start in range(0, pixels.shape[0], batch_size):
        chunk = pixels[start:start + batch_size].to(device)
        if chunk.dtype == torch.uint8:
            chunk = pixels_from_bytes(chunk)
        chunk = chunk.to(dtype)
        dist = vae.encode(chunk).latent_dist
        noise = _posterior_noise(generator, dist.mean.shape, start, device)
        sample = _posterior_sample(dist, noise)
        if torch.is_autocast_enabled(device.type) and not bool(torch.isfinite(sample).all()):
            log.info("the VAE overflowed fp16 while encoding images %d-%d: encoding them in fp32",
                     start, start + chunk.shape[0] - 1)
            with torch.autocast(device.type, enabled=False):
                sample = _posterior_sample(vae.encode(chunk).latent_dist, noise)
        out.append(sample * vae.config.scaling_factor)
    return torch.cat(out).contiguous()  # NCHW whatever layout the VAE chose, as a latent cache loads them


def _posterior_noise(generator: torch.Generator | list[torch.Generator] | None, shape: torch.Size, start: int,
                     device: torch.device) -> torch.Tensor | None:
    """The posterior sample's noise for a chunk (None: the mean), in fp32 whatever precision encoded it."""
    if generator is None:
        return None
    if isinstance(generator, list):
        return torch.stack([torch.randn(shape[1:], generator=g, device=device, dtype=torch.float32)
                            for g in generator[start:start + shape[0]]])
    return torch.randn(shape, generator=generator, device=device, dtype=torch.float32)


def _posterior_sample(dist, noise: torch.Tensor | None) -> torch.Tensor:
    mean = dist.mean.float()
    return mean if noise is None else mean + dist.std.float() * noise


@dataclass(frozen=True)
class Shard:
    """This process's share of a job split across `world` processes; `gather` concatenates equal-shaped tensors
    from every rank in rank order (e.g. `accelerator.gather`)."""

    rank: int
    world: int
    gather: Callable[[torch.Tensor], torch.Tensor]


def image_generators(seed: int, indices: Iterable[int], device: torch.device | str) -> list[torch.Generator]:
    """One generator per image for its posterior sample, seeded by (seed, the image's index) alone: the latents do
    not depend on which images are encoded together, or on which process."""
    return [torch.Generator(device=device).manual_seed(seed * 1_000_003 + i) for i in indices]


def _encode_sharded(vae: torch.nn.Module, pixels: torch.Tensor, seed: int, shard: Shard | None,
                    batch_size: int = 8) -> torch.Tensor:
    """Encode this rank's slice (all of it without a shard) with per-image generators, then gather."""
    n = pixels.shape[0]
    rank, world = (shard.rank, shard.world) if shard else (0, 1)
    per_rank = -(-n // world)
    start, stop = min(rank * per_rank, n), min((rank + 1) * per_rank, n)
    device = next(vae.parameters()).device
    generators = image_generators(seed, range(start, stop), device)
    log.debug("rank %d encodes latents of images %d-%d of %d", rank, start, stop, n)
    local = encode_latents(vae, pixels[start:stop], generator=generators, batch_size=batch_size) if stop > start else None
    if shard is None or world == 1:
        return local
    shape = (per_rank, *(local.shape[1:] if local is not None else _latent_shape(vae, pixels)))
    padded = torch.zeros(shape, device=device)
    if local is not None:
        padded[: local.shape[0]] = local
    return shard.gather(padded)[:n]


def _latent_shape(vae: torch.nn.Module, pixels: torch.Tensor) -> tuple[int, int, int]:
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    return vae.config.latent_channels, pixels.shape[-2] // factor, pixels.shape[-1] // factor


class LatentCache:
    """Latents of every example encoded once (both orientations when flipping), so the VAE leaves the loop.

    With a `shard`, each process encodes only its contiguous slice of the examples and the slices are gathered,
    so every rank ends up with all latents while the VAE work is split. Each image's posterior sample comes
    from its own generator (seed, index, orientation): the latents do not depend on how the work was split.
    `batch_size` images go through the VAE at a time (the caller sizes it to the free memory). The VAE is moved to
    `device` only when it has to encode: with a `store` (one process) that already holds these latents, they are
    loaded and the VAE stays where it is.
    """

    def __init__(self, vae: torch.nn.Module, examples: list[Example], resolution: int, *, flip: bool,
                 seed: int, device: torch.device | str, shard: Shard | None = None, batch_size: int = 8,
                 store: LatentStore | None = None):
        pixels = stacked_pixel_bytes(centre_crop(e.image, resolution) for e in examples)
        device = torch.device(device)
        key = store.key(vae, pixels, seed=seed, flip=flip, device_type=device.type) if store else None
        saved = store.load(key, count=len(examples), flip=flip, device=device) if store else None
        if saved is not None:
            log.info("latents of %d images loaded from the cache (%s)", len(examples), store.path(key))
            self.plain, self.flipped = saved["plain"], saved.get("flipped")
            return
        vae = vae.to(device)
        self.plain = _encode_sharded(vae, pixels, seed * 2, shard, batch_size).to(device)
        self.flipped = (_encode_sharded(vae, pixels.flip(-1), seed * 2 + 1, shard, batch_size).to(device)
                        if flip else None)
        if store:
            store.save(key, {"plain": self.plain, **({"flipped": self.flipped} if flip else {})})

    def __len__(self) -> int:
        return self.plain.shape[0]

    def batch(self, indices: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
        """Latents for `indices`, taking the mirrored encoding where `flips` is true."""
        indices = to_device(indices, self.plain.device)
        latents = self.plain[indices]
        if self.flipped is not None:
            mirrored = self.flipped[indices]
            latents = torch.where(to_device(flips, latents.device).view(-1, 1, 1, 1), mirrored, latents)
        return latents


@dataclass
class EpochSampler:
    """Stateless, resumable sampling: batch `step` of rank `rank` is a pure function of (seed, step).

    Every epoch is a fresh permutation drawn from `seed + epoch`; ranks take consecutive slices of the global
    batch, so resuming at any step (or on another number of processes) sees the same data order.
    """

    num_items: int
    batch_size: int
    seed: int
    flip: bool = False
    rank: int = 0
    world_size: int = 1

    def indices(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices, flip flags) of this rank's share of global batch number `step`."""
        idx, flips = [], []
        for perm, coins, _, offset in self._draws(step):
            idx.append(int(perm[offset]))
            flips.append(bool(coins[offset] < 0.5) and self.flip)
        return torch.tensor(idx, dtype=torch.long), torch.tensor(flips, dtype=torch.bool)

    def positions(self, step: int) -> torch.Tensor:
        """Where --crop random places each window of `indices(step)`: (n, 2) fractions of the room along the width
        and the height, one pair per image and epoch."""
        return torch.stack([places[offset] for _, _, places, offset in self._draws(step)])

    def _draws(self, step: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]]:
        """(permutation, flip coins, crop positions, offset in the epoch) of each item of this rank's share."""
        global_batch = self.batch_size * self.world_size
        start = step * global_batch + self.rank * self.batch_size
        cache: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        draws = []
        for pos in range(start, start + self.batch_size):
            epoch, offset = divmod(pos, self.num_items)
            if epoch not in cache:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                perm, coins = torch.randperm(self.num_items, generator=g), torch.rand(self.num_items, generator=g)
                cache[epoch] = (perm, coins, torch.rand(self.num_items, 2, generator=g))  # drawn last: same order
            draws.append((*cache[epoch], offset))
        return draws
