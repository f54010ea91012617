"""The UNet's weights read while the libraries import (`lora_dreambooth.prefetch`): the UNet built from them is the
one diffusers loads, whatever the early read cannot use is loaded by diffusers as before, and the read starts only
where the base will be placed on a GPU as it is."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from lora_dreambooth import TrainConfig
from lora_dreambooth.models import load_base
from lora_dreambooth import prefetch as prefetch_module
from lora_dreambooth.prefetch import WeightPrefetch, unet_weights_file
from lora_dreambooth.training.startup import EarlyStart, base_placement, plan_before_loading, start_before_imports

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="reads onto a GPU (run on the device machine)")


def _assert_same_unet(unet: torch.nn.Module, reference: torch.nn.Module) -> None:
    ours, theirs = unet.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    for name, tensor in ours.items():
        other = theirs[name]
        assert (tensor.dtype, tensor.device, tensor.shape) == (other.dtype, other.device, other.shape), name
        assert torch.equal(tensor, other), name
    assert unet.config == reference.config  # _name_or_path included
    assert getattr(unet, "hf_device_map", None) == getattr(reference, "hf_device_map", None)
    assert not unet.training


def _config(**overrides) -> TrainConfig:
    values = dict(instance_dir="photos", base="base", token="sks", class_noun="dog", output_dir="out",
                  mixed_precision="bf16", resolution=512)
    return TrainConfig(**{**values, **overrides})


def test_the_unet_read_early_is_the_one_diffusers_loads(tiny_base):
    prefetch = WeightPrefetch.start(unet_weights_file(str(tiny_base)), "cpu")
    early = load_base(str(tiny_base), device="cpu", dtype=torch.bfloat16, unet_prefetch=prefetch)
    usual = load_base(str(tiny_base), device="cpu", dtype=torch.bfloat16)
    assert prefetch.seconds > 0
    assert early.unet.dtype == torch.bfloat16
    _assert_same_unet(early.unet, usual.unet)


def test_what_the_early_read_cannot_use_is_loaded_by_diffusers(tiny_base, tmp_path):
    usual = load_base(str(tiny_base), device="cpu", dtype=torch.bfloat16).unet
    truncated = tmp_path / "unet.safetensors"
    data = unet_weights_file(str(tiny_base)).read_bytes()
    truncated.write_bytes(data[: len(data) - 100])
    unusable = {
        "another model's weights (the VAE's keys)": Path(tiny_base) / "vae" / "diffusion_pytorch_model.safetensors",
        "a file that ends early": truncated,
        "a missing file": tmp_path / "gone.safetensors",
    }
    for why, file in unusable.items():
        prefetch = WeightPrefetch.start(file, "cpu")
        unet = load_base(str(tiny_base), device="cpu", dtype=torch.bfloat16, unet_prefetch=prefetch).unet
        _assert_same_unet(unet, usual)
    assert WeightPrefetch.start(truncated, "cpu").state_dict(torch.bfloat16) is None

    # the base left unplaced (the low-memory plan, a CPU run): fp32 on the CPU as always, the read dropped
    prefetch = WeightPrefetch.start(unet_weights_file(str(tiny_base)), "cpu")
    where = base_placement(_config(profile="low-memory"), _low_memory_plan(), torch.device("cuda"), torch.bfloat16,
                           prefetch)
    assert "device" not in where and where["unet_prefetch"] is prefetch
    unplaced = load_base(str(tiny_base), **where).unet
    assert unplaced.dtype == torch.float32 and prefetch._raw is None
    _assert_same_unet(unplaced, load_base(str(tiny_base)).unet)


def _low_memory_plan():
    from lora_dreambooth.training.lowmem import ExecutionPlan

    return ExecutionPlan("low-memory", cuda_graph=True, quantize="nf4", gradient_checkpointing=True)


def test_the_early_read_starts_only_for_a_diffusers_folder_placed_on_a_gpu(tiny_base, tmp_path):
    early = start_before_imports(_config(profile="fast"), str(tiny_base), torch.device("cpu"), torch.bfloat16, 1)
    assert early == EarlyStart(None, None)
    assert unet_weights_file("org/name") is None  # a hub id: diffusers resolves and downloads it
    assert unet_weights_file(str(tmp_path / "model.safetensors")) is None  # a single-file checkpoint
    sharded = tmp_path / "sharded"
    shutil.copytree(tiny_base, sharded)
    weights = unet_weights_file(str(sharded))
    weights.rename(weights.with_name("diffusion_pytorch_model-00001-of-00001.safetensors"))
    assert unet_weights_file(str(sharded)) is None


def test_a_cancelled_read_stops_at_its_next_chunk_and_diffusers_loads_the_unet(tiny_base, monkeypatch):
    monkeypatch.setattr(prefetch_module, "CHUNK_BYTES", 4096)  # the tiny UNet's file in many chunks
    file = unet_weights_file(str(tiny_base))
    usual = load_base(str(tiny_base), device="cpu", dtype=torch.bfloat16).unet
    stopped = WeightPrefetch(file, torch.device("cpu"))
    stopped._cancelled.set()  # before the first chunk: the read ends there
    stopped._thread.start()
    assert stopped.state_dict(torch.bfloat16) is None and isinstance(stopped._error, InterruptedError)
    for when in ("at once", "after the read"):  # whenever it comes, a cancel leaves nothing to build from
        prefetch = WeightPrefetch.start(file, "cpu")
        if when == "after the read":
            prefetch._thread.join()
        prefetch.cancel()
        assert prefetch.state_dict(torch.bfloat16) is None
        _assert_same_unet(load_base(str(tiny_base), device="cpu", dtype=torch.bfloat16, unet_prefetch=prefetch).unet,
                          usual)


def test_the_plan_counts_the_memory_free_before_the_read_began(tiny_base):
    """The read's buffer is on the GPU while the plan is made, and freed once the UNet is built: the plan is made
    for the memory free before it (here given on a CPU: the planner only compares numbers)."""
    cuda = torch.device("cuda")
    roomy = plan_before_loading(_config(), str(tiny_base), device=cuda, num_processes=1,
                                early=EarlyStart(None, 64 << 30))
    cramped = plan_before_loading(_config(), str(tiny_base), device=cuda, num_processes=1,
                                  early=EarlyStart(None, 1 << 20))
    assert not roomy.quantize and cramped.quantize


@needs_cuda
def test_on_a_gpu_the_unet_read_early_is_the_one_diffusers_loads_and_its_buffer_is_given_back(tiny_base):
    device = torch.device("cuda")  # as accelerate names a single process's GPU: the reading thread finds its index
    usual = load_base(str(tiny_base), device=device, dtype=torch.bfloat16)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated(device)
    free = torch.cuda.mem_get_info(device)[0]
    early = start_before_imports(_config(profile="fast"), str(tiny_base), device, torch.bfloat16, 1)
    prefetch = early.unet_prefetch
    assert prefetch is not None and abs(early.free_bytes - free) < (256 << 20)
    early = load_base(str(tiny_base), device=device, dtype=torch.bfloat16, unet_prefetch=prefetch)
    _assert_same_unet(early.unet, usual.unet)
    models = (early.unet, early.text_encoder, early.vae)
    held = sum(t.numel() * t.element_size() for m in models for t in (*m.parameters(), *m.buffers()))
    assert torch.cuda.memory_allocated(device) - before <= held + (1 << 20)  # the file's bytes are not kept
