"""kernels/: the NHWC GroupNorm kernel (torch's GroupNorm maths without the layout copies, with the layer patch
that uses it only where it can run), the transformer blocks' outputs kept channels-last, the attention backend of
the full-resolution self-attention, and GEGLU's fused gate."""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from lora_dreambooth.kernels.attention import route_attention
from lora_dreambooth.kernels.geglu import geglu, use_fused_geglu
from lora_dreambooth.kernels.geglu import trial_failure as geglu_trial_failure
from lora_dreambooth.kernels.group_norm import group_norm_nhwc, supports, trial_failure, use_channels_last_group_norm
from lora_dreambooth.kernels.layouts import keep_transformer_outputs_channels_last
from lora_dreambooth.kernels.resnet import fuse_resnet_norm_activations
from lora_dreambooth.tiny import build_tiny_pipeline

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="the kernel is written in Triton for CUDA")


def _norms_model(dtype: torch.dtype) -> torch.nn.Sequential:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 64, 3, padding=1), torch.nn.GroupNorm(32, 64), torch.nn.SiLU(),
                                torch.nn.Conv2d(64, 64, 1), torch.nn.GroupNorm(8, 64, eps=1e-6))
    with torch.no_grad():
        for norm in (model[1], model[4]):
            norm.weight.normal_(1.0, 0.3)
            norm.bias.normal_(0.0, 0.3)
    return model.to(dtype).requires_grad_(False)


def test_only_frozen_16_bit_group_norms_are_patched():
    assert use_channels_last_group_norm(_norms_model(torch.bfloat16)) == 2
    assert use_channels_last_group_norm(_norms_model(torch.float32)) == 0  # fp32 layers keep torch's path


def test_on_a_cpu_the_patched_layers_compute_exactly_as_before():
    plain, patched = _norms_model(torch.bfloat16), _norms_model(torch.bfloat16)
    use_channels_last_group_norm(patched)
    x = torch.randn(2, 4, 8, 8).to(torch.bfloat16).to(memory_format=torch.channels_last)
    assert not supports(x, None, None)
    assert torch.equal(plain(x), patched(x))


def test_where_the_kernel_cannot_run_its_trial_says_why_instead_of_raising():
    assert trial_failure(torch.device("cpu"), torch.bfloat16) in ("Triton is not importable", "unsupported input")


@CUDA
def test_on_a_gpu_the_kernel_passes_its_trial_run():
    assert trial_failure(torch.device("cuda", torch.cuda.current_device()), torch.bfloat16) is None


def _reference(x: torch.Tensor, groups: int, weight, bias, eps: float, silu: bool, grad_y: torch.Tensor,
               dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's GroupNorm (then SiLU) on an NCHW copy in `dtype`: output and input gradient."""
    x = x.detach().contiguous().to(dtype).requires_grad_(True)
    y = F.group_norm(x, groups, weight.to(dtype), bias.to(dtype), eps)
    if silu:
        y = F.silu(y)
    y.backward(grad_y.contiguous().to(dtype))
    return y.detach().float(), x.grad.float()


@CUDA
@pytest.mark.parametrize("shape", [(2, 320, 64, 64), (2, 1280, 8, 8), (1, 96, 5, 7), (2, 1920, 16, 16)])
@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_the_kernel_matches_torchs_group_norm_within_torchs_own_rounding(shape, silu, dtype):
    torch.manual_seed(0)
    c = shape[1]
    x = (torch.randn(shape, device="cuda") * 2 + 3).to(memory_format=torch.channels_last)
    weight, bias = torch.randn(c, device="cuda") * 0.3 + 1, torch.randn(c, device="cuda") * 0.3
    grad_y = torch.randn(shape, device="cuda").to(memory_format=torch.channels_last)
    exact_y, exact_grad = _reference(x, 32, weight, bias, 1e-5, silu, grad_y, torch.float32)
    torch_y, torch_grad = _reference(x, 32, weight, bias, 1e-5, silu, grad_y, dtype)

    ours_x = x.to(dtype).requires_grad_(True)
    assert supports(ours_x, weight.to(dtype), bias.to(dtype))
    y = group_norm_nhwc(ours_x, 32, weight.to(dtype), bias.to(dtype), 1e-5, silu=silu)
    y.backward(grad_y.to(dtype))
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
    assert ours_x.grad.is_contiguous(memory_format=torch.channels_last)

    slack = 1e-5 if dtype == torch.float32 else 1e-3  # fp32: summation order only
    for ours, theirs, exact in ((y, torch_y, exact_y), (ours_x.grad, torch_grad, exact_grad)):
        error = (ours.float() - exact).abs().max().item()
        assert error <= 1.25 * (theirs - exact).abs().max().item() + slack * exact.abs().max().item()


@CUDA
def test_a_channels_last_unet_block_with_patched_norms_trains_like_torchs_norms():
    plain, patched = _norms_model(torch.bfloat16).cuda(), _norms_model(torch.bfloat16).cuda()
    for model in (plain, patched):
        model.to(memory_format=torch.channels_last)
        model[3].weight.requires_grad_(True)  # something to train behind the norms
    assert use_channels_last_group_norm(patched) == 2
    x = torch.randn(2, 4, 32, 32, device="cuda").to(torch.bfloat16).to(memory_format=torch.channels_last)
    outputs, grads = [], []
    for model in (plain, patched):
        out = model(x)
        out.float().square().mean().backward()
        outputs.append(out.float())
        grads.append(model[3].weight.grad.float())
    assert outputs[1].is_contiguous(memory_format=torch.channels_last)
    assert not outputs[0].is_contiguous(memory_format=torch.channels_last)  # torch's norm returns NCHW
    assert torch.allclose(outputs[0], outputs[1], atol=0.05, rtol=0.02)
    assert torch.allclose(grads[0], grads[1], atol=1e-3, rtol=0.05)


@contextlib.contextmanager
def _proj_out_layouts(unet):
    """Whether each transformer block's `proj_out` received an NHWC tensor during one forward."""
    seen = []
    hooks = [m.proj_out.register_forward_pre_hook(
        lambda _, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last)))
        for m in unet.modules() if hasattr(m, "_get_output_for_continuous_inputs")]
    try:
        yield seen
    finally:
        for hook in hooks:
            hook.remove()


def test_transformer_outputs_stay_channels_last_with_the_same_values_and_gradients():
    unets = [build_tiny_pipeline(seed=3).unet.to(memory_format=torch.channels_last) for _ in range(2)]
    assert keep_transformer_outputs_channels_last(unets[1]) == 4  # down 1, mid 1, up 2
    torch.manual_seed(0)
    latents = torch.randn(2, 4, 8, 8).to(memory_format=torch.channels_last)
    text = torch.randn(2, 77, 32)
    results = []
    for unet in unets:
        x = latents.clone().requires_grad_(True)
        with _proj_out_layouts(unet) as seen:
            out = unet(x, torch.tensor([10, 500]), encoder_hidden_states=text).sample
        out.square().mean().backward()
        results.append((out.detach(), x.grad, seen))
    (plain, plain_grad, plain_seen), (kept, kept_grad, kept_seen) = results
    assert plain_seen == [False] * 4 and kept_seen == [True] * 4  # diffusers copies to NCHW first
    assert torch.allclose(plain, kept, atol=1e-5) and torch.allclose(plain_grad, kept_grad, atol=1e-6)


def test_only_the_full_resolution_attention_is_routed_and_computes_the_same():
    unets = [build_tiny_pipeline(seed=4).unet for _ in range(2)]
    assert route_attention(unets[1], "flash") == 0  # torch's own choice: nothing to change
    # attn1 of down block 0's one layer and of the last up block's two (SD v1: 2 + 3)
    assert route_attention(unets[1], "cudnn") == 3
    routed = {name for name, m in unets[1].named_modules() if type(getattr(m, "processor", None)).__name__
              == "PreferredBackendProcessor"}
    assert all(name.endswith("attn1") and name.startswith(("down_blocks.0.", "up_blocks.1.")) for name in routed)
    with pytest.raises(ValueError, match="unknown attention backend"):
        route_attention(unets[1], "tpu")
    fresh = build_tiny_pipeline(seed=4).unet
    assert route_attention(fresh, "cudnn", levels=2, cross=True) == 6  # attn2 too; level 2 has no attention here
    torch.manual_seed(0)
    latents, text = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32)
    outs = [unet(latents, torch.tensor([10, 500]), encoder_hidden_states=text).sample for unet in unets]
    assert torch.allclose(outs[0], outs[1], atol=1e-5)


@CUDA
@pytest.mark.parametrize("backend", ["cudnn", "efficient"])
def test_on_a_gpu_the_routed_backend_trains_like_flash_attention_at_sd_shapes(backend):
    from diffusers.models.attention_processor import Attention
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    attn = Attention(320, heads=8, dim_head=40).cuda().to(torch.bfloat16)  # SD v1's 64x64 level
    x = torch.randn(2, 4096, 320, device="cuda", dtype=torch.bfloat16)
    results = []
    for routed in (False, True):
        model = torch.nn.Sequential()
        model.add_module("down_blocks", torch.nn.ModuleList([attn]))
        model.add_module("up_blocks", torch.nn.ModuleList([torch.nn.Identity()]))
        if routed:
            assert route_attention(model, backend) == 1
        inputs = x.clone().requires_grad_(True)
        with contextlib.nullcontext() if routed else sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            out = attn(inputs)
        out.float().square().mean().backward()
        results.append((out.float(), inputs.grad.float()))
    (out_flash, grad_flash), (out_routed, grad_routed) = results
    assert torch.allclose(out_flash, out_routed, atol=2e-2, rtol=2e-2)
    assert torch.allclose(grad_flash, grad_routed, atol=1e-3, rtol=5e-2)


def test_geglu_layers_are_patched_and_on_a_cpu_compute_exactly_as_before():
    unets = [build_tiny_pipeline(seed=5).unet for _ in range(2)]
    assert use_fused_geglu(unets[1], torch.float32) == 4  # one feed-forward per transformer block
    latents, text = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32)
    outs = [unet(latents, torch.tensor([10, 500]), encoder_hidden_states=text).sample for unet in unets]
    assert torch.equal(outs[0], outs[1])


@CUDA
def test_on_a_gpu_the_geglu_kernels_pass_their_trial_run():
    assert geglu_trial_failure(torch.device("cuda"), torch.bfloat16) is None


@CUDA
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(2, 4096, 2 * 1280), (2, 64, 2 * 5120), (3, 7, 2 * 40)])
def test_the_geglu_kernels_match_diffusers_maths_within_rounding(shape, dtype):
    torch.manual_seed(0)
    projected = torch.randn(shape, device="cuda").to(dtype)
    grad_out = torch.randn(*shape[:-1], shape[-1] // 2, device="cuda").to(dtype)
    results = []
    for fused in (False, True):
        p = projected.clone().requires_grad_(True)
        if fused:
            out = geglu(p)
        else:
            value, gate = p.chunk(2, dim=-1)
            out = value * F.gelu(gate)
        out.backward(grad_out)
        results.append((out.float(), p.grad.float()))
    (out_ref, grad_ref), (out_fused, grad_fused) = results
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=0.02, rtol=0.02)
    assert torch.allclose(out_fused, out_ref, **tol)
    assert torch.allclose(grad_fused, grad_ref, **tol)


# -- ResnetBlock2D with its norms and SiLU fused (kernels/resnet.py) ---------------------------------------------------
def _resnet_unets(device: str, seed: int = 5):
    """Two identical tiny bf16 channels-last UNets with NHWC norms, the second with fused resnet blocks."""
    unets = [build_tiny_pipeline(seed=seed).unet.to(device, torch.bfloat16).to(memory_format=torch.channels_last)
             .requires_grad_(False) for _ in range(2)]
    for unet in unets:
        use_channels_last_group_norm(unet)
    return unets, fuse_resnet_norm_activations(unets[1])


def _unet_step(unet, device: str):
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8, device=device).to(torch.bfloat16).to(memory_format=torch.channels_last)
    x.requires_grad_(True)
    text = torch.randn(2, 77, 32, device=device).to(torch.bfloat16)
    out = unet(x, torch.tensor([10, 500], device=device), encoder_hidden_states=text).sample
    out.float().square().mean().backward()
    return out.detach().float(), x.grad.float()


def test_resnet_blocks_are_fused_and_on_a_cpu_compute_exactly_as_before():
    (plain, fused), changed = _resnet_unets("cpu")
    assert changed == sum(type(m).__name__ == "ResnetBlock2D" for m in fused.modules()) > 0
    assert fuse_resnet_norm_activations(build_tiny_pipeline(seed=5).unet) == 0  # fp32 norms: left alone
    (out_plain, grad_plain), (out_fused, grad_fused) = _unet_step(plain, "cpu"), _unet_step(fused, "cpu")
    assert torch.equal(out_plain, out_fused) and torch.equal(grad_plain, grad_fused)  # torch's norm and SiLU here


@CUDA
def test_on_a_gpu_fused_resnet_blocks_train_like_diffusers_blocks():
    (plain, fused), changed = _resnet_unets("cuda")
    assert changed > 0
    (out_plain, grad_plain), (out_fused, grad_fused) = _unet_step(plain, "cuda"), _unet_step(fused, "cuda")
    # the SiLU inside the norm's kernel: rounded once, not after the norm and again after the SiLU
    errors = [float((a - b).norm() / b.norm()) for a, b in ((out_fused, out_plain), (grad_fused, grad_plain))]
    assert not torch.equal(out_plain, out_fused) and errors[0] <= 2e-2 and errors[1] <= 3e-2, errors


def test_without_a_gpu_nothing_compiles_in_the_background():
    from lora_dreambooth.kernels import warmup

    warmup.compile_in_background(torch.device("cpu"), torch.bfloat16, norms=True, geglu=True)
    assert not warmup._PENDING
    assert warmup.wait_for_compiles() < 0.1  # returns at once


@CUDA
def test_on_a_gpu_the_kernels_compile_in_another_process_into_triton_s_cache(tmp_path, monkeypatch):
    from lora_dreambooth.kernels import warmup

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    warmup.compile_in_background(torch.device("cuda"), torch.bfloat16, norms=True, geglu=True)
    warmup.compile_in_background(torch.device("cuda"), torch.bfloat16, norms=True, geglu=False)  # covered
    assert len(warmup._PENDING) == 1
    process = next(iter(warmup._PENDING.values()))
    assert warmup.wait_for_compiles() > 0
    assert process.returncode == 0 and not warmup._PENDING  # both trials passed there
    compiled = {path.stem for path in tmp_path.rglob("*.cubin")}
    assert {"group_norm_moments", "group_norm_apply", "group_norm_grad_sums", "group_norm_grad_input",
            "geglu_forward", "geglu_backward"} <= compiled
