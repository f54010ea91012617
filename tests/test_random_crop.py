"""--crop random: windows cut from whole-photo latents at places the sampler draws per image and epoch."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from lora_dreambooth import TrainConfig
from lora_dreambooth.data.buckets import vae_factor
from lora_dreambooth.data.examples import EpochSampler, Example, encode_latents, stacked_pixel_bytes
from lora_dreambooth.data.random_crop import RandomCropLatents
from lora_dreambooth.files.metadata import ADAPTER_FILENAME
from lora_dreambooth.training.recipe import DreamBoothRecipe

from .conftest import cli_in_process, small_train_args


@pytest.fixture(scope="module")
def vae(tiny_base):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(tiny_base, subfolder="vae")


@pytest.fixture(scope="module")
def wide_photos(tmp_path_factory, dog_dir) -> Path:
    """The dog photos with their left half kept and a band of colour added on the right: 2:1, so a window can move."""
    folder = tmp_path_factory.mktemp("wide-dogs")
    for i, path in enumerate(sorted(dog_dir.glob("*.jpg"))[:3]):
        photo = Image.open(path).convert("RGB").resize((64, 64))
        wide = Image.new("RGB", (128, 64), (40 * i, 200, 90))
        wide.paste(photo, (0, 0))
        wide.save(folder / f"wide-{i}.png")
    return folder


def test_windows_are_cut_from_the_latents_of_the_whole_photo(vae):
    factor = vae_factor(vae)
    wide = Image.effect_noise((64, 32), 60).convert("RGB")
    square = Image.effect_noise((32, 32), 40).convert("RGB")
    examples = [Example(Path("wide.png"), wide, "p"), Example(Path("square.png"), square, "p")]
    cache = RandomCropLatents(vae, examples, 32, flip=True, seed=3, device="cpu", batch_size=2)
    whole = encode_latents(vae, stacked_pixel_bytes([wide]),
                           generator=[torch.Generator().manual_seed(6 * 1_000_003 + 0)])[0]
    mirrored = encode_latents(vae, stacked_pixel_bytes([wide]).flip(-1),
                              generator=[torch.Generator().manual_seed(7 * 1_000_003 + 0)])[0]
    torch.testing.assert_close(cache.plain[0], whole, rtol=0, atol=0)
    window = 32 // factor
    room = 64 // factor - window
    indices, no, yes = torch.tensor([0, 0, 0]), torch.tensor([False] * 3), torch.tensor([False, False, True])
    left_middle_right = torch.tensor([[0.0, 0.5], [0.5, 0.5], [0.999, 0.5]])
    out = cache.batch(indices, yes, left_middle_right)
    assert out.shape == (3, whole.shape[0], window, window)
    torch.testing.assert_close(out[0], whole[:, :, :window], rtol=0, atol=0)
    middle = int(0.5 * (room + 1))
    torch.testing.assert_close(out[1], whole[:, :, middle:middle + window], rtol=0, atol=0)
    torch.testing.assert_close(out[2], mirrored[:, :, room:], rtol=0, atol=0)
    assert not torch.equal(cache.batch(indices[:1], no[:1], left_middle_right[:1]),
                           cache.batch(indices[:1], no[:1], left_middle_right[2:]))
    # a square image has no room: every position gives the whole image
    anywhere = cache.batch(torch.tensor([1, 1]), no[:2], torch.tensor([[0.0, 0.0], [0.99, 0.99]]))
    torch.testing.assert_close(anywhere[0], cache.plain[1], rtol=0, atol=0)
    torch.testing.assert_close(anywhere[1], cache.plain[1], rtol=0, atol=0)


def test_positions_are_drawn_per_image_and_epoch_and_leave_the_order_unchanged():
    sampler = EpochSampler(num_items=5, batch_size=2, seed=3, flip=True)
    # The order and flips are drawn first, exactly as before crop positions existed.
    g = torch.Generator().manual_seed(3 * 1_000_003 + 0)
    perm, coins = torch.randperm(5, generator=g), torch.rand(5, generator=g)
    idx, flips = sampler.indices(0)
    assert idx.tolist() == perm[:2].tolist() and flips.tolist() == (coins[:2] < 0.5).tolist()
    # Two ranks with batch 2 see the positions of one process with batch 4.
    one = EpochSampler(num_items=5, batch_size=4, seed=3, flip=True)
    ranks = [EpochSampler(num_items=5, batch_size=2, seed=3, flip=True, rank=r, world_size=2) for r in (0, 1)]
    for step in range(4):
        torch.testing.assert_close(one.positions(step), torch.cat([r.positions(step) for r in ranks]))
        assert one.positions(step).shape == (4, 2)
        assert ((one.positions(step) >= 0) & (one.positions(step) < 1)).all()
    # The same image gets a new place in the next epoch.
    first = {int(i): p for i, p in zip(sampler.indices(0)[0], sampler.positions(0))}
    later = {int(i): p for step in (2, 3, 4) for i, p in zip(sampler.indices(step)[0], sampler.positions(step))}
    assert any(not torch.equal(first[i], later[i]) for i in first if i in later)


def test_random_crop_trains_on_moving_windows_and_differs_from_centre_crops(tmp_path, tiny_base, wide_photos,
                                                                             capsys):
    common = ("--steps", "4", "--no-prior", "--log-every", "2")
    centre = cli_in_process(capsys, *small_train_args(wide_photos, tiny_base, tmp_path / "centre", *common))
    moving = cli_in_process(capsys, *small_train_args(wide_photos, tiny_base, tmp_path / "random", *common,
                                                      "--crop", "random"))
    assert centre.returncode == 0 and moving.returncode == 0, moving.stderr[-3000:]
    a, b = load_file(str(tmp_path / "centre" / ADAPTER_FILENAME)), load_file(str(tmp_path / "random" / ADAPTER_FILENAME))
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)
    # The batches the loop sees: windows of the whole photos' latents, placed differently from step to step.
    cfg = TrainConfig(instance_dir=str(wide_photos), base=str(tiny_base), token="sks", class_noun="dog",
                      output_dir=str(tmp_path / "look"), resolution=32, steps=8, prior=False, crop="random")
    recipe = DreamBoothRecipe(cfg)
    recipe.setup()
    latents = recipe.batches.instance_latents
    assert isinstance(latents, RandomCropLatents) and latents.plain[0].shape[-1] == 2 * latents.window
    seen = {}
    for step in range(8):
        (index,), _ = recipe.batches.instance_sampler.indices(step)
        batch, _ = recipe.batches.batch(step)
        seen.setdefault(int(index), []).append(batch[0])
    assert any(not torch.equal(windows[0], w) for windows in seen.values() for w in windows[1:])


@pytest.mark.parametrize("option", ["--buckets", "--masked-loss"])
def test_random_crop_with_buckets_or_masks_is_a_one_line_error(tmp_path, tiny_base, wide_photos, capsys, option):
    run = cli_in_process(capsys, *small_train_args(wide_photos, tiny_base, tmp_path / "out", "--crop", "random",
                                                   option))
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1].startswith("Error: --crop random") and "Traceback" not in run.stderr
    assert not (tmp_path / "out").exists()
