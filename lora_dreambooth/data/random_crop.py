"""--crop random: a square cut from each photo at a place the sampler draws, without running the VAE every step.

Each photo (short side = resolution) is encoded once, whole, in both orientations when flipping; a training batch
cuts a resolution-sized window out of those latents. The window moves in latent cells (8 px for SD v1.x), and its
latents are the whole photo's, which differ from an encoding of the cropped pixels only near the window's edges
(the VAE's receptive field). Square class images have no room to move: their window is the whole image.
"""
from __future__ import annotations

import logging
from collections import defaultdict

import torch

from lora_dreambooth.data.buckets import fit_to_bucket, vae_factor
from lora_dreambooth.data.examples import Example, encode_latents, image_generators, stacked_pixel_bytes

log = logging.getLogger(__name__)


def encoded_size(image_size: tuple[int, int], factor: int) -> tuple[int, int]:
    """The (width, height) of a photo that the VAE encodes: its own, cut down to whole latent cells."""
    width, height = image_size
    return width // factor * factor, height // factor * factor


class RandomCropLatents:
    """Whole-photo latents of every example; `batch` cuts each row's window at its drawn position.

    The posterior sample of image `i` comes from its own generator (seed, i, orientation), as in
    :class:`~lora_dreambooth.data.examples.LatentCache`, so every process that encodes them gets the same latents.
    Photos of one size are encoded together, `batch_size` square-resolution images' worth of pixels at a time.
    """

    def __init__(self, vae: torch.nn.Module, examples: list[Example], resolution: int, *, flip: bool, seed: int,
                 device: torch.device | str, batch_size: int = 8):
        factor = vae_factor(vae)
        self.window = resolution // factor
        device = torch.device(device)
        vae = vae.to(device)
        by_size: dict[tuple[int, int], list[int]] = defaultdict(list)
        for index, example in enumerate(examples):
            by_size[encoded_size(example.image.size, factor)].append(index)
        self.plain: list[torch.Tensor | None] = [None] * len(examples)
        self.flipped: list[torch.Tensor | None] | None = [None] * len(examples) if flip else None
        for (width, height), members in sorted(by_size.items()):
            # the encoded size is within the photo, one side equal: fit_to_bucket only cuts the long side's margins
            pixels = stacked_pixel_bytes(fit_to_bucket(examples[i].image, (width, height)) for i in members)
            per_call = max(1, batch_size * resolution * resolution // (width * height))
            for orientation, store in ((0, self.plain), (1, self.flipped)):
                if store is None:
                    continue
                source = pixels.flip(-1) if orientation else pixels
                latents = encode_latents(vae, source, generator=image_generators(seed * 2 + orientation, members,
                                                                                 device), batch_size=per_call)
                for i, latent in zip(members, latents):
                    store[i] = latent
        log.debug("random crops: %d images encoded whole at %s", len(examples),
                  ", ".join(f"{w}x{h}" for w, h in sorted(by_size)))

    def __len__(self) -> int:
        return len(self.plain)

    def batch(self, indices: torch.Tensor, flips: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The windows of `indices` (mirrored where `flips`): `positions` (n x 2, in [0, 1)) place each window
        along the width and the height of its photo's latents."""
        rows = []
        for index, flipped, (across, down) in zip(indices.tolist(), flips.tolist(), positions.tolist()):
            latents = self.flipped[index] if flipped else self.plain[index]
            height, width = latents.shape[-2:]
            top = int(down * (height - self.window + 1))
            left = int(across * (width - self.window + 1))
            rows.append(latents[:, top:top + self.window, left:left + self.window])
        return torch.stack(rows)
