"""The NHWC GroupNorm kernel (kernels/group_norm.py): torch's GroupNorm maths without the layout copies, the layer
patch that uses it only where it can run, and the trial run that falls back to torch's kernel where it cannot."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lora_dreambooth.kernels.group_norm import group_norm_nhwc, supports, trial_failure, use_channels_last_group_norm

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

