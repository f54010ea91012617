"""The graph paths for everyone: fp16 loss scaling on the device, gradient accumulation into static gradients,
several processes with one all-reduce. On a CPU: the device scaler and the optimizer update against
torch.amp.GradScaler, accumulation, the planner. On a GPU: graph against eager, and 2 processes (gloo) on one GPU
against 1 process with twice the batch."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lora_dreambooth.files.metadata import ADAPTER_FILENAME
from lora_dreambooth.training.graph import DeviceLossScaler, FlatGradients, OptimizerUpdate
from lora_dreambooth.training.optim import SkippedSteps
from lora_dreambooth.training.recipe import DreamBoothRecipe

from .conftest import small_train_args
from .test_fast_paths import _NoGraph, _assert_same_adapters, _config, _plan, _r2

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU (run on the device machine)")
OVERFLOW_AT = {2, 6}  # steps whose gradients are forced to overflow


# -- CPU: the device-side loss scaler and the optimizer update against torch.amp.GradScaler ----------------------
def _problem(seed: int = 0):
    torch.manual_seed(seed)
    weights = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    inputs = [(torch.randn(5, 3), torch.randn(7)) for _ in range(12)]
    return weights, inputs


def _loss(weights, x, step: int) -> torch.Tensor:
    loss = (weights[0] * x[0]).sin().sum() + (weights[1] * x[1]).square().sum()
    return loss * (float("inf") if step in OVERFLOW_AT else 1.0)  # inf: every gradient non-finite


def _with_grad_scaler(max_grad_norm: float):
    weights, inputs = _problem()
    optimizer = torch.optim.AdamW(weights, lr=1e-2, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0, growth_interval=3)
    scales = []
    for step, x in enumerate(inputs):
        scaler.scale(_loss(weights, x, step)).backward()
        if max_grad_norm > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(weights, max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        scales.append(scaler.get_scale())
    return weights, scales, scaler.state_dict()


def _with_device_scaler(max_grad_norm: float):
    weights, inputs = _problem()
    optimizer = torch.optim.AdamW(weights, lr=1e-2, fused=True)
    scaler = DeviceLossScaler("cpu", init_scale=256.0, growth_interval=3)
    update = OptimizerUpdate(optimizer, FlatGradients(weights), max_grad_norm=max_grad_norm, loss_scaler=scaler)
    scales = []
    for step, x in enumerate(inputs):
        scaler.scale_loss(_loss(weights, x, step)).backward()
        update()
        scales.append(float(scaler.scale))
    return weights, scales, scaler


@pytest.mark.parametrize("max_grad_norm", [0.0, 0.5])
def test_device_loss_scaler_follows_grad_scaler_and_skips_exactly_the_overflowing_steps(max_grad_norm):
    expected, expected_scales, expected_state = _with_grad_scaler(max_grad_norm)
    got, scales, scaler = _with_device_scaler(max_grad_norm)
    assert scales == expected_scales  # backoff at the forced overflows, growth after 3 clean steps
    assert scaler.state_dict() == expected_state
    assert scaler.skipped_steps() == len(OVERFLOW_AT)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert expected_scales[min(OVERFLOW_AT)] == expected_scales[min(OVERFLOW_AT) - 1] / 2


def test_eager_skipped_steps_are_counted_for_a_fused_adamw_whose_kernel_skips():
    weights, inputs = _problem()
    optimizer = torch.optim.AdamW(weights, lr=1e-2, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0, growth_interval=3)
    counter = SkippedSteps(scaler)
    for step, x in enumerate(inputs):
        scaler.scale(_loss(weights, x, step)).backward()

        class _Scaled:  # the step GradScaler makes (accelerate's optimizer wrapper does the same)
            def step(self):
                scaler.step(optimizer)
                scaler.update()

        counter.step(_Scaled())
        optimizer.zero_grad(set_to_none=True)
    assert counter.count() == len(OVERFLOW_AT)
    assert SkippedSteps(None).count() == 0


def test_device_loss_scaler_state_goes_through_a_grad_scaler_both_ways():
    _, _, scaler = _with_device_scaler(0.0)
    holder = torch.amp.GradScaler("cpu")  # what accelerate saves in a checkpoint and restores on resume
    scaler.store_into(holder)
    restored = DeviceLossScaler.from_grad_scaler(holder, "cpu")
    assert restored.state_dict() == scaler.state_dict() != DeviceLossScaler("cpu").state_dict()


def test_accumulating_into_flat_gradients_is_one_step_on_the_whole_batch():
    def trained(accumulate: bool) -> list[torch.Tensor]:
        weights, inputs = _problem(1)
        optimizer = torch.optim.AdamW(weights, lr=1e-2, fused=True)
        gradients = FlatGradients(weights)
        update = OptimizerUpdate(optimizer, gradients, max_grad_norm=1.0)
        for first in range(0, 8, 2):
            pair = inputs[first:first + 2]
            if accumulate:  # k = 2 micro-batches, each loss / k, into the same static buffers
                for x in pair:
                    (_loss(weights, x, -1) / 2).backward()
            else:
                ((_loss(weights, pair[0], -1) + _loss(weights, pair[1], -1)) / 2).backward()
            update()
            assert all(p.grad.abs().sum() == 0 for p in weights) and weights[0].grad.data_ptr() == \
                gradients.buffers[0].data_ptr()  # zeroed in place, still views of the flat buffer
        return weights

    for a, b in zip(trained(True), trained(False)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("options, processes, says", [
    (dict(mixed_precision="fp16"), 1, "fp16 loss scaling on the device"),
    (dict(gradient_accumulation=4), 1, "4 replays into static gradients"),
    (dict(), 2, "2 processes: forward+backward captured, one all-reduce"),
    (dict(profile="low-memory", mixed_precision="fp16"), 1, "fp16 loss scaling on the device"),
    (dict(profile="auto", mixed_precision="fp16", max_vram="24GB"), 2, "one all-reduce"),
])
def test_fp16_processes_and_accumulation_keep_the_graph_and_the_log_says_how(options, processes, says):
    plan = _plan(_r2(**{"profile": "fast", **options}), processes=processes)
    assert plan.cuda_graph and says in plan.describe(), plan.describe()


# -- CUDA: graph against eager -------------------------------------------------------------------------------
class _Overflowing(DreamBoothRecipe):
    """Multiplies the loss's gradient by 1e30 at the steps in OVERFLOW_AT: fp16 backward overflows there."""

    def _prepare_step_runner(self) -> None:
        self.boost = torch.ones((), device=self.device)
        self.skips: list[int] = []
        super()._prepare_step_runner()

    def _loss(self, *args) -> torch.Tensor:
        return _BoostGradient.apply(super()._loss(*args), self.boost)

    def _micro_step(self, micro_index: int) -> torch.Tensor:
        self.boost.fill_(1e30 if micro_index in OVERFLOW_AT else 1.0)
        loss = super()._micro_step(micro_index)
        self.skips.append(self._skipped_steps())
        return loss


class _EagerOverflowing(_NoGraph, _Overflowing):
    pass


class _BoostGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value, boost):
        ctx.save_for_backward(boost)
        return value.clone()

    @staticmethod
    def backward(ctx, grad):
        (boost,) = ctx.saved_tensors
        return grad * boost, None


def _run(recipe: DreamBoothRecipe, micro_steps: int) -> list[float]:
    recipe.setup()
    return [float(recipe._micro_step(i).detach()) for i in range(micro_steps)]


@needs_cuda
@pytest.mark.parametrize("profile", ["fast", "low-memory"])
def test_fp16_graph_skips_the_overflowing_steps_like_the_eager_grad_scaler(tmp_path, tiny_base, dog_dir, profile):
    options = dict(mixed_precision="fp16", profile=profile, steps=10)
    graphed = _Overflowing(_config(dog_dir, tiny_base, tmp_path / "graph", **options))
    graphed_curve = _run(graphed, 10)
    assert graphed.plan.cuda_graph and graphed.step_runner.replaying and graphed.graph.loss_scaler is not None
    eager = _EagerOverflowing(_config(dog_dir, tiny_base, tmp_path / "eager", **options))
    eager_curve = _run(eager, 10)
    assert eager.graph is None
    assert graphed.skips == eager.skips  # the same steps skipped, step by step
    for step in OVERFLOW_AT:
        assert graphed.skips[step] == (graphed.skips[step - 1] if step else 0) + 1, graphed.skips
    assert graphed.graph.loss_scaler.state_dict() == eager.accelerator.scaler.state_dict()
    torch.testing.assert_close(torch.tensor(graphed_curve), torch.tensor(eager_curve), rtol=2e-2, atol=5e-3)
    _assert_same_adapters(graphed, eager, 2e-2)


@needs_cuda
def test_gradient_accumulation_in_the_graph_matches_eager_accumulation(tmp_path, tiny_base, dog_dir):
    options = dict(mixed_precision="bf16", profile="fast", steps=5, gradient_accumulation=3, lr_scheduler="linear")
    graphed = DreamBoothRecipe(_config(dog_dir, tiny_base, tmp_path / "graph", **options))
    graphed.setup()
    graphed_result = graphed.train()
    assert graphed.step_runner.replaying and graphed.graph.parts
    eager = _NoGraph(_config(dog_dir, tiny_base, tmp_path / "eager", **options))
    eager.setup()
    eager_result = eager.train()
    assert graphed_result.last_loss == pytest.approx(eager_result.last_loss, rel=2e-2)
    _assert_same_adapters(graphed, eager, 2e-2)
    assert float(graphed.lr_scheduler.get_last_lr()[0]) == pytest.approx(float(eager.lr_scheduler.get_last_lr()[0]))


@needs_cuda
def test_fp16_graph_checkpoint_resumes_with_the_scaler_state(tmp_path, tiny_base, dog_dir):
    options = dict(mixed_precision="fp16", profile="fast", steps=8, checkpoint_every=4)
    first = _Overflowing(_config(dog_dir, tiny_base, tmp_path / "run", **options))
    first.setup()
    first.train()
    saved = torch.load(tmp_path / "run" / "checkpoints" / "checkpoint-4" / "scaler.pt", weights_only=True)
    assert saved["scale"] < 2.0 ** 16  # the forced overflow at step 2 backed the scale off before step 4
    resumed = _Overflowing(_config(dog_dir, tiny_base, tmp_path / "run", **options, resume=True))
    resumed.setup()
    assert resumed.start_step == 4 and resumed.graph.loss_scaler.state_dict()["scale"] == saved["scale"]
    resumed.train()
    assert resumed.graph.loss_scaler.state_dict() == first.graph.loss_scaler.state_dict()
    _assert_same_adapters(resumed, first, 1e-3)


# -- CUDA: two processes on one GPU (gloo) with the graph ------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun_on_one_gpu(processes: int, *args: str) -> subprocess.CompletedProcess:
    """Our CLI under torchrun, every rank on GPU 0, over gloo (NCCL refuses two ranks on one GPU)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo",
           "NCCL_NVLS_ENABLE": "0", "NVIDIA_TF32_OVERRIDE": "0"}  # fp32 without TF32: close sums
    launcher = Path(__file__).with_name("gloo_one_gpu.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(launcher), "-v", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=240)


@needs_cuda
def test_two_processes_with_the_graph_train_the_adapter_of_one_process_with_twice_the_batch(tmp_path, tiny_base,
                                                                                            dog_dir):
    common = ("--steps", "4", "--num-class-images", "4", "--class-dir", str(tmp_path / "class"),
              "--mixed-precision", "no", "--profile", "fast")
    two = _torchrun_on_one_gpu(2, *small_train_args(dog_dir, tiny_base, tmp_path / "two", *common))
    assert two.returncode == 0, "\n".join([line for line in two.stderr.splitlines() if "Error" in line][-12:]
                                          + [two.stderr[-2000:]])
    assert "process 1/2" in two.stderr and "2 processes: forward+backward captured" in two.stderr
    assert "captured the training step" in two.stderr
    one = _torchrun_on_one_gpu(1, *small_train_args(dog_dir, tiny_base, tmp_path / "one", *common, "--batch-size",
                                                     "2"))
    assert one.returncode == 0, one.stderr[-4000:]
    a, b = load_file(str(tmp_path / "two" / ADAPTER_FILENAME)), load_file(str(tmp_path / "one" / ADAPTER_FILENAME))
    assert a.keys() == b.keys()
    for key in a:  # the tolerance of the CPU scale-out test
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)
