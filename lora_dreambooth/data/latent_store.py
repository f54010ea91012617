"""Latents kept on disk between runs, keyed by what they are made of.

A rerun on the same photos and class images (new learning rate, more steps, another rank) loads the latents an
earlier run encoded instead of running the VAE over every image again. The key is a digest of everything the
latents depend on: the uint8 crops themselves, the seed that draws each image's posterior sample, whether mirrored
copies are encoded, the VAE's weights and config, and the device type (CPU and CUDA draw different noise). A changed
photo, resolution, seed or VAE therefore misses; nothing is reused as if it were equal.

Nothing here knows the recipe: `LatentCache` asks a store for a key, loads or saves through it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import weakref
from pathlib import Path

import torch

from lora_dreambooth.files.atomic import atomic_path

log = logging.getLogger(__name__)

# Part of every key: bump it when encode_latents or the per-image generator seeds change what a key's latents are.
STORE_VERSION = 1
# After a save the least recently used files go until at most this many, of at most this many bytes, are left
# (100 class images at 512 px are 6.5 MB; the newest file always stays).
MAX_FILES = 64
MAX_BYTES = 2 << 30


def weights_fingerprint(model: torch.nn.Module) -> bytes:
    """An exact fingerprint of `model`'s floating-point weights: names, shapes, dtypes and the int64 sum of each
    tensor's bit patterns. Integer sums are exact, so the fingerprint is the same wherever the model sits (CPU or
    GPU); two real VAEs (a fine-tune, another release) differ in it."""
    names, sums = [], []
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not tensor.is_floating_point():
                continue
            bits = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()]
            names.append(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}")
            sums.append(tensor.detach().contiguous().view(bits).sum(dtype=torch.int64))
    digest = hashlib.sha256("\n".join(names).encode())
    if sums:
        digest.update(torch.stack(sums).cpu().numpy().tobytes())
    return digest.digest()


class LatentStore:
    """A folder of `<key>.safetensors` files, each holding the latents of one image set ("plain", and "flipped"
    when mirrored copies were encoded), written atomically; the most recently used `max_files` (at most
    `max_bytes` together) are kept."""

    def __init__(self, folder: str | Path, *, max_files: int = MAX_FILES, max_bytes: int = MAX_BYTES):
        self.folder = Path(folder)
        self.max_files, self.max_bytes = max_files, max_bytes
        # By the VAE object itself, held weakly: an id() could be reused by another VAE once the first is freed.
        self._fingerprints: weakref.WeakKeyDictionary[torch.nn.Module, bytes] = weakref.WeakKeyDictionary()

    def key(self, vae: torch.nn.Module, pixels: torch.Tensor, *, seed: int, flip: bool, device_type: str) -> str:
        """The key of `pixels` (uint8, n x 3 x H x W) encoded by `vae` with `seed` on a `device_type` device, and
        under that device's autocast if one is on (its latents are rounded differently)."""
        if vae not in self._fingerprints:  # one VAE per run: fingerprinted once
            self._fingerprints[vae] = weights_fingerprint(vae)
        config = json.dumps(dict(getattr(vae, "config", {})), sort_keys=True, default=str)
        head = f"v{STORE_VERSION}\n{device_type}\n{seed}\n{flip}\n{tuple(pixels.shape)}\n{pixels.dtype}\n{config}\n"
        if torch.is_autocast_enabled(device_type):  # fp32 runs keep the keys they always had
            head += f"autocast {torch.get_autocast_dtype(device_type)}\n"
        digest = hashlib.sha256(head.encode())
        digest.update(self._fingerprints[vae])
        digest.update(pixels.contiguous().numpy())  # the buffer itself, no copy
        return digest.hexdigest()[:32]

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.safetensors"

    def load(self, key: str, *, count: int, flip: bool, device: torch.device | str) -> dict[str, torch.Tensor] | None:
        """The latents saved under `key` on `device`, or None when there are none or they do not fit (`count`
        images, a "flipped" set exactly when `flip`): a damaged or foreign file is a miss, never an error."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = self.path(key)
        if not path.is_file():
            return None
        try:
            tensors = load_file(path, device=str(device))
        except (OSError, SafetensorError) as exc:
            log.warning("latent cache: ignoring unreadable %s (%s); encoding again", path, exc)
            return None
        expected = {"plain", "flipped"} if flip else {"plain"}
        if set(tensors) != expected or any(t.shape[0] != count or t.dim() != 4 for t in tensors.values()):
            log.warning("latent cache: ignoring %s (it does not hold %d images' latents); encoding again", path, count)
            return None
        try:
            os.utime(path)  # last use: pruning keeps what is used
        except OSError:
            pass
        return tensors

    def save(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        """Write `tensors` under `key` (whole or not at all), then prune; a full or read-only disk only warns."""
        from safetensors.torch import save_file

        try:
            with atomic_path(self.path(key)) as tmp:
                save_file({name: t.detach().contiguous().cpu() for name, t in tensors.items()}, str(tmp),
                          metadata={"format": "lora-dreambooth latents", "version": str(STORE_VERSION)})
            self._prune()
        except OSError as exc:
            log.warning("latent cache: could not write %s (%s); the run goes on without it", self.path(key), exc)

    def _prune(self) -> None:
        files = sorted(((path.stat(), path) for path in self.folder.glob("*.safetensors")),
                       key=lambda entry: entry[0].st_mtime, reverse=True)
        kept_bytes = 0
        for index, (stat, path) in enumerate(files):
            kept_bytes += stat.st_size
            if index > 0 and (index >= self.max_files or kept_bytes > self.max_bytes):
                path.unlink(missing_ok=True)
