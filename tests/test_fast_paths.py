"""The fast paths compute what the plain path computes: NF4 layers, the low-memory profile, cached text,
checkpointing without RNG bookkeeping, the profile planner, and (on a GPU) the whole-step CUDA graph."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from lora_dreambooth import TrainConfig
from lora_dreambooth.errors import UserInputError
from lora_dreambooth.training.graph import CudaGraphStep, checkpoint_without_rng_state, make_optimizer_capturable
from lora_dreambooth.training.lowmem import (GIB, Footprint, NF4Conv2d, NF4Linear, choose_plan, dequantize_into,
                                          dequantize_nf4_eager, kernels_likely, placed_unquantized_likely,
                                          predict_peak_bytes, quantize_frozen)
from lora_dreambooth.training.recipe import DreamBoothRecipe

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU (run on the device machine)")
# SD v1.4 counted by lowmem.footprint (UNet rank-4 LoRA on to_q/k/v/out.0; text encoder on q/k/v/out_proj)
SD14_UNET = Footprint(quantizable=859_077_120, other=443_844, adapter=797_184)
SD14_TEXT = Footprint(quantizable=84_934_656, other=38_125_824, adapter=294_912)
FAST_CKPT = "fast (checkpointing, cuda graph, channels-last)"


def _config(instance_dir, base, out, **overrides) -> TrainConfig:
    values = dict(instance_dir=str(instance_dir), base=str(base), token="sks", class_noun="dog", output_dir=str(out),
                  resolution=32, steps=8, num_class_images=2, class_inference_steps=2, lr=1e-3, save_dtype="fp32",
                  log_every=4, class_dir=str(out.parent / "class"))
    values.update(overrides)
    return TrainConfig(**values)


def _loss_curve(recipe: DreamBoothRecipe, steps: int) -> list[float]:
    recipe.setup()
    return [float(recipe._micro_step(i).detach()) for i in range(steps)]


def _adapter_values(recipe: DreamBoothRecipe) -> torch.Tensor:
    return torch.cat([p.detach().float().flatten().cpu() for p in recipe.params])


def _assert_same_adapters(a: DreamBoothRecipe, b: DreamBoothRecipe, tolerance: float) -> None:
    """Relative distance of the adapter weights (Adam turns rounding noise on near-zero gradients into
    lr-sized steps, so single elements are a poor yardstick; a wrong gradient moves the whole vector)."""
    va, vb = _adapter_values(a), _adapter_values(b)
    distance = float((va - vb).norm() / vb.norm())
    assert distance < tolerance, f"adapters differ by {distance:.2e} (relative)"


# -- NF4 layers ------------------------------------------------------------------------------------------------
def test_nf4_layers_compute_what_dense_layers_with_the_dequantized_weight_compute():
    torch.manual_seed(0)
    linear, conv = nn.Linear(96, 80), nn.Conv2d(16, 24, 3, padding=1, stride=2)
    for source, x in ((linear, torch.randn(5, 7, 96)), (conv, torch.randn(2, 16, 9, 9))):
        cls = NF4Linear if isinstance(source, nn.Linear) else NF4Conv2d
        quantized = cls(source, compute_dtype=torch.float32, device="cpu")
        dense = nn.Sequential(quantized)
        dequantize_into(dense)
        assert type(dense[0]) is type(source)
        assert (dense[0].weight - source.weight).abs().max() < 0.25 * source.weight.abs().max()  # 4-bit, not exact
        x_q, x_d = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_q, out_d = quantized(x_q), dense(x_d)
        torch.testing.assert_close(out_q, out_d, rtol=1e-5, atol=1e-5)
        grad = torch.randn_like(out_q)
        out_q.backward(grad)
        out_d.backward(grad)
        torch.testing.assert_close(x_q.grad, x_d.grad, rtol=1e-5, atol=1e-5)


def test_nf4_statistics_survive_a_dtype_cast_and_requantizing_is_a_fixed_point():
    torch.manual_seed(1)
    layer = NF4Linear(nn.Linear(64, 130), compute_dtype=torch.float32, device="cpu")
    before = layer.dequantize()
    nn.Sequential(layer).to(torch.bfloat16)  # casts floating buffers: the int32-stored statistics must not change
    torch.testing.assert_close(layer.dequantize(), before)
    again = NF4Linear(nn.Linear(64, 130), compute_dtype=torch.float32, device="cpu")
    again._store_nf4(before, torch.float32, "cpu")
    torch.testing.assert_close(again.dequantize(), before)
    # the eager decoder reads bitsandbytes' layout: a code in each nibble, high nibble first
    data = torch.tensor([[0x7F], [0x0A]], dtype=torch.uint8)
    code = torch.arange(16, dtype=torch.float32)
    out = dequantize_nf4_eager(data, torch.tensor([2.0]), code, torch.Size([4]), torch.float32)
    assert out.tolist() == [14.0, 30.0, 0.0, 20.0]


def test_quantize_frozen_replaces_linear_and_conv_layers_and_leaves_the_rest(tiny_base):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(tiny_base), subfolder="unet")
    big = [m for m in unet.modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and m.weight.numel() >= 1024]
    summary = quantize_frozen(unet, compute_dtype=torch.bfloat16, device="cpu")
    assert summary.layers == len(big) > 0
    assert not any(type(m) in (nn.Linear, nn.Conv2d) and m.weight.numel() >= 1024 for m in unet.modules())
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in unet.parameters())
    assert summary.device_bytes < 0.3 * summary.params * 2  # about a quarter of bf16


# -- the low-memory profile against the plain path ---------------------------------------------------------------
class _PlainOnDequantizedBase(DreamBoothRecipe):
    """The plain eager recipe, with the frozen weights replaced by their NF4 round trip."""

    def _inject_adapters(self) -> None:
        for model in (self.base.unet, self.base.text_encoder):
            quantize_frozen(model, compute_dtype=self.weight_dtype, device=self.device)
            dequantize_into(model)
        super()._inject_adapters()


def test_low_memory_profile_trains_like_the_plain_path_on_the_same_weights(tmp_path, tiny_base, dog_dir):
    low = DreamBoothRecipe(_config(dog_dir, tiny_base, tmp_path / "low", profile="low-memory"))
    low_curve = _loss_curve(low, 6)
    assert low.plan.quantize == "nf4" and low.plan.gradient_checkpointing
    assert any(isinstance(m, NF4Conv2d) for m in low.base.unet.modules())
    plain = _PlainOnDequantizedBase(_config(dog_dir, tiny_base, tmp_path / "plain", profile="plain"))
    plain_curve = _loss_curve(plain, 6)
    assert plain.plan.profile == "plain" and not plain.plan.gradient_checkpointing
    # Exact arithmetic on a CPU. On an H100 the NF4 kernels and checkpointed recomputation leave small
    # differences: 4.3e-5 and 6.4e-4 (absolute, on a loss of ~2.3) measured in two runs.
    torch.testing.assert_close(torch.tensor(low_curve), torch.tensor(plain_curve), rtol=1e-3, atol=2e-3)
    _assert_same_adapters(low, plain, 5e-3)  # 3.5e-3 measured on an H200 (graph path, bf16)
    assert low_curve[0] != low_curve[-1]


class _TextEncoderEveryStep(DreamBoothRecipe):
    """The plain recipe without the text-embedding cache: the frozen text encoder runs in every step."""

    def _prepare_text(self) -> None:
        super()._prepare_text()
        self.base.text_encoder.to(self.device, self.weight_dtype)
        self.cached_text = _LiveText(self.base.text_encoder, self.prompts.ids)


class _LiveText:
    def __init__(self, text_encoder, prompt_ids):
        self.text_encoder, self.prompt_ids = text_encoder, prompt_ids

    def __getitem__(self, rows):
        with torch.no_grad():
            return self.text_encoder(self.prompt_ids[rows])[0]


def test_cached_text_embeddings_give_the_loss_curve_of_running_the_text_encoder(tmp_path, tiny_base, dog_dir):
    options = dict(train_text_encoder=False, profile="plain")
    cached = DreamBoothRecipe(_config(dog_dir, tiny_base, tmp_path / "cached", **options))
    live = _TextEncoderEveryStep(_config(dog_dir, tiny_base, tmp_path / "live", **options))
    # all prompts in one batch vs a row at a time: other GEMM shapes, so float rounding may differ on a GPU
    torch.testing.assert_close(torch.tensor(_loss_curve(cached, 5)), torch.tensor(_loss_curve(live, 5)),
                               rtol=2e-5, atol=2e-5)
    assert cached.cached_text is not None and cached.text_encoder is None


def test_checkpointing_without_rng_state_gives_the_gradients_of_no_checkpointing(tiny_base):
    from diffusers import UNet2DConditionModel

    grads = []
    for checkpointing in (False, True):
        unet = UNet2DConditionModel.from_pretrained(str(tiny_base), subfolder="unet")
        unet.requires_grad_(True)
        unet.train()
        if checkpointing:
            unet.enable_gradient_checkpointing(checkpoint_without_rng_state)
        torch.manual_seed(3)
        sample, hidden = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32)
        unet(sample, torch.tensor([10, 500]), hidden).sample.square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in unet.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


# -- the planner -----------------------------------------------------------------------------------------------
def _r2(**overrides) -> TrainConfig:
    values = dict(instance_dir="photos", base="base", token="sks", class_noun="dog", output_dir="out",
                  mixed_precision="bf16", resolution=512)
    values.update(overrides)
    return TrainConfig(**values)


def _plan(cfg: TrainConfig, device: str = "cuda", processes: int = 1, free: int | None = None):
    te = SD14_TEXT if cfg.train_text_encoder else None
    return choose_plan(cfg, device=torch.device(device), num_processes=processes, unet=SD14_UNET, text_encoder=te,
                       free_bytes=free)


def test_profiles_resolve_to_plans():
    assert _plan(_r2(profile="plain")).label == "plain (eager)"
    assert _plan(_r2(profile="fast")).label == "fast (cuda graph, channels-last)"
    assert _plan(_r2(profile="fast")).channels_last_norms  # the NHWC GroupNorm kernel, launched from the graph
    assert _plan(_r2(profile="fast")).fused_geglu  # likewise GEGLU's gate
    assert _plan(_r2(profile="fast")).fused_qkv and _plan(_r2(profile="fast")).fused_text_qkv  # stacked q, k, v
    # cuDNN's attention kernels for the full-resolution self-attention, wherever the device is a GPU
    assert [_plan(_r2(profile=p), device=d).top_attention for p, d in (
        ("fast", "cuda"), ("low-memory", "cuda"), ("plain", "cuda"), ("low-memory", "cpu"))] == [
        "cudnn", "cudnn", "flash", "flash"]
    assert _plan(_r2(profile="fast", gradient_checkpointing=True)).label == FAST_CKPT
    assert _plan(_r2(profile="low-memory")).label == "low-memory (nf4, checkpointing, cuda graph)"
    assert _plan(_r2(), device="cpu").label == "plain (eager)"
    assert _plan(_r2(profile="low-memory"), device="cpu").label == "low-memory (nf4, checkpointing)"
    compiled = _plan(_r2(profile="plain", compile=True))
    assert not compiled.compile and "--compile ignored" in compiled.describe()


def test_a_plan_that_runs_the_kernels_is_foreseen_before_the_base_s_shapes_are_known():
    def likely(cfg, free=16 * GIB, device="cuda", dtype=torch.bfloat16):
        return kernels_likely(cfg, torch.device(device), dtype, 1, free)

    foreseen = [(_r2(profile="fast"), None), (_r2(), 16 * GIB), (_r2(), 8 * GIB), (_r2(max_vram="24GB"), None),
                (_r2(profile="fast", gradient_checkpointing=True), None), (_r2(mixed_precision="fp16"), 16 * GIB)]
    for cfg, free in foreseen:  # wherever the guess says yes, the plan made later runs the kernels
        plan = _plan(cfg, free=free)
        assert likely(cfg, free) and plan.channels_last and plan.channels_last_norms and plan.fused_geglu, cfg
    assert not likely(_r2(), 4 * GIB) and not likely(_r2(), None)  # auto might choose the low-memory plan
    assert not likely(_r2(max_vram="2GB")) and _plan(_r2(max_vram="2GB")).quantize
    assert not likely(_r2(profile="low-memory")) and not likely(_r2(profile="plain"))
    assert not likely(_r2(profile="fast", optimizer="adamw8bit"))  # no graph: the kernels are not launched
    assert not likely(_r2(profile="fast"), device="cpu")
    assert not likely(_r2(profile="fast", mixed_precision="no"), dtype=torch.float32)


def test_a_plan_that_places_the_base_unquantized_is_foreseen_before_its_shapes_are_known():
    def likely(cfg, free=16 * GIB, device="cuda"):
        return placed_unquantized_likely(cfg, torch.device(device), free)

    foreseen = [(_r2(profile="fast"), 1 * GIB), (_r2(profile="plain"), None), (_r2(), 8 * GIB),
                (_r2(max_vram="24GB"), None), (_r2(mixed_precision="no"), 16 * GIB),
                (_r2(profile="fast", optimizer="adamw8bit"), None)]
    for cfg, free in foreseen:  # wherever the guess says yes (the UNet is read early), the plan places it as it is
        assert likely(cfg, free) and not _plan(cfg, free=free).quantize, cfg
    assert not likely(_r2(), 4 * GIB) and not likely(_r2(), None) and not likely(_r2(max_vram="2GB"))
    assert not likely(_r2(profile="low-memory")) and not likely(_r2(profile="fast"), device="cpu")


@pytest.mark.parametrize("blocking, reason", [
    (dict(optimizer="adamw8bit"), "adamw8bit"),
])
def test_what_a_cuda_graph_cannot_run_is_named(blocking, reason):
    plan = _plan(_r2(profile="fast", **blocking))
    assert not plan.cuda_graph and reason in plan.describe()
    assert plan.channels_last and not plan.channels_last_norms  # eagerly, Triton's launches would cost host time
    assert not plan.fused_geglu and not plan.fused_qkv and not plan.fused_text_qkv


def test_max_vram_picks_the_fastest_plan_predicted_to_fit():
    assert _plan(_r2(max_vram="24GB")).label == "fast (cuda graph, channels-last)"
    assert _plan(_r2(max_vram="4GB")).label == FAST_CKPT
    low = _plan(_r2(max_vram="2GB"))
    assert low.label == "low-memory (nf4, checkpointing, cuda graph)" and low.predicted_bytes <= 2 * GIB
    assert "fastest predicted to fit --max-vram 2.00 GiB" in low.describe()
    leanest = _plan(_r2(max_vram="500MB"))
    assert leanest.label == "low-memory (nf4, checkpointing)" and "nothing predicted to fit" in leanest.describe()
    assert _plan(_r2(), free=4 * GIB).label == FAST_CKPT  # auto: 90% of the free memory
    with pytest.raises(UserInputError, match="--max-vram"):
        _r2(max_vram="4GB", profile="fast")
    with pytest.raises(UserInputError, match="--max-vram must be a size"):
        _r2(max_vram="lots")


def test_memory_predictions_order_the_candidates_and_scale_with_the_work():
    cfg = _r2()
    peak = lambda c, **kw: predict_peak_bytes(c, SD14_UNET, SD14_TEXT, **kw)  # noqa: E731
    fast = peak(cfg, quantized=False, checkpointing=False, cuda_graph=True)
    ckpt = peak(cfg, quantized=False, checkpointing=True, cuda_graph=True)
    low = peak(cfg, quantized=True, checkpointing=True, cuda_graph=True)
    assert fast > ckpt > low and low < 1.5 * GIB < ckpt  # measured on an H100: 4.21, 2.50, 1.12 GiB
    assert 4.2 * GIB < fast < 4.6 * GIB and 1.1 * GIB < low < 1.4 * GIB
    assert peak(_r2(resolution=768), quantized=True, checkpointing=True, cuda_graph=True) > low
    assert peak(_r2(prior=False), quantized=True, checkpointing=True, cuda_graph=True) < low


# -- CUDA only: the whole-step graph ---------------------------------------------------------------------------
class _NoGraph(DreamBoothRecipe):
    """The same plan, stepped eagerly through accelerate (DDP, GradScaler)."""

    def _prepare_step_runner(self) -> None:
        self.plan = dataclasses.replace(self.plan, cuda_graph=False)
        super()._prepare_step_runner()


@needs_cuda
@pytest.mark.parametrize("profile", ["fast", "low-memory"])
def test_cuda_graph_replays_give_the_eager_loss_curve(tmp_path, tiny_base, dog_dir, profile):
    options = dict(mixed_precision="bf16", profile=profile, lr_scheduler="linear", steps=12)
    graphed = DreamBoothRecipe(_config(dog_dir, tiny_base, tmp_path / "graph", **options))
    graphed_curve = _loss_curve(graphed, 12)
    assert graphed.plan.cuda_graph and graphed.step_runner.replaying
    eager = _NoGraph(_config(dog_dir, tiny_base, tmp_path / "eager", **options))
    eager_curve = _loss_curve(eager, 12)
    assert not eager.plan.cuda_graph
    torch.testing.assert_close(torch.tensor(graphed_curve), torch.tensor(eager_curve), rtol=2e-2, atol=2e-3)
    _assert_same_adapters(graphed, eager, 2e-2)
    assert float(graphed.lr_scheduler.get_last_lr()[0]) == pytest.approx(float(eager.lr_scheduler.get_last_lr()[0]))


@needs_cuda
def test_bitsandbytes_cuda_dequantize_matches_the_eager_decoder():
    layer = NF4Linear(nn.Linear(320, 770), compute_dtype=torch.bfloat16, device="cuda")
    absmax, code = layer.nf4_absmax.view(torch.float32), layer.nf4_code.view(torch.float32)
    eager = dequantize_nf4_eager(layer.nf4_data, absmax, code, layer.nf4_shape, torch.bfloat16)
    torch.testing.assert_close(layer.dequantize(), eager, rtol=0, atol=0)


@needs_cuda
def test_captured_optimizer_follows_the_learning_rate_schedule():
    def trajectory(graphed: bool) -> torch.Tensor:
        torch.manual_seed(0)
        weight = nn.Parameter(torch.randn(64, device="cuda"))
        optimizer = torch.optim.AdamW([weight], lr=1e-2, fused=True)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
        target = torch.randn(64, device="cuda")

        def step(x: torch.Tensor) -> torch.Tensor:
            loss = (weight * x - target).square().mean()
            loss.backward()
            optimizer.step()
            return loss

        runner = step
        if graphed:
            make_optimizer_capturable(optimizer)
            runner = CudaGraphStep(step, warmup=2)
        for i in range(8):
            runner(torch.full((64,), 1.0 + i, device="cuda"))
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
        assert not graphed or runner.replaying
        return weight.detach().clone()

    torch.testing.assert_close(trajectory(True), trajectory(False), rtol=1e-5, atol=1e-6)
