"""Nothing lost: kill -9 at a step or half-way through a write, Ctrl-C, then --resume gives the adapter of an
uninterrupted run bit for bit; no half-written file ever looks finished; a diverging run stops cleanly.

A real subprocess is killed with `kill -9` half-way through writing a checkpoint or the adapter: a small driver
runs the CLI with `torch.save`/`safetensors.torch.save_file` wrapped to truncate the file they just wrote and
freeze (SIGSTOP), and the test then SIGKILLs it (the state a power cut or the OOM killer leaves behind). Ctrl-C
and SIGTERM are raised inside the training loop at a chosen step; the rest runs the CLI entry point in-process.
"""
from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
import torch
from safetensors.torch import load_file

from lora_dreambooth import TrainConfig, train
from lora_dreambooth.errors import UserInputError
from lora_dreambooth.files.metadata import ADAPTER_FILENAME, resolve_adapter_file
from lora_dreambooth.training.checkpoints import list_checkpoints

from .conftest import DETERMINISTIC_GPU_KERNELS_CODE, REPO, cli_in_process

STEPS = 24
SETTINGS = dict(resolution=32, steps=STEPS, num_class_images=2, class_inference_steps=2, lr=1e-3, save_dtype="fp32",
                log_every=4)

DRIVER = '''
"""Run the lora-dreambooth CLI; stop (SIGSTOP) half-way through writing the first file whose path holds TARGET,
so that the test can kill -9 it at exactly that moment."""
import os
import signal
import sys

import safetensors.torch
import torch

target = sys.argv[1]


def wrap(module, name):
    real = getattr(module, name)

    def write_then_freeze_half_way(obj, path, *args, **kwargs):
        result = real(obj, path, *args, **kwargs)
        if isinstance(path, (str, os.PathLike)) and target in os.fspath(path):
            os.truncate(path, os.path.getsize(path) // 2)
            os.kill(os.getpid(), signal.SIGSTOP)
        return result

    setattr(module, name, write_then_freeze_half_way)


wrap(torch, "save")
wrap(safetensors.torch, "save_file")
'''
DRIVER_MAIN = '''
from lora_dreambooth.cli import main  # noqa: E402

main(sys.argv[2:])
'''


@pytest.fixture(scope="module", autouse=True)
def _deterministic(deterministic_gpu_kernels):
    """Runs here are compared bit for bit: deterministic kernels on a GPU (conftest), in the subprocesses too."""


def train_cmd(instance: Path, base: Path, out: Path, class_dir: Path, *extra: str) -> list[str]:
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in SETTINGS.items()]
    return ["train", str(instance), "--base", str(base), "--token", "sks", "--class-noun", "dog", "--output",
            str(out), "--class-dir", str(class_dir), *flags, *extra]


def kill_9_while_writing(tmp_path: Path, target: str, *args: str) -> None:
    """Run the CLI in a subprocess until it is half-way through writing `target`, then `kill -9` it."""
    driver = tmp_path / "freeze_while_writing.py"
    driver.write_text(DRIVER + DETERMINISTIC_GPU_KERNELS_CODE + DRIVER_MAIN)
    log = tmp_path / "driver.log"
    with open(log, "w") as stream:
        proc = subprocess.Popen([sys.executable, str(driver), target, *args], stdout=stream, stderr=subprocess.STDOUT,
                                env={**os.environ, "HF_HUB_OFFLINE": "1",
                                     "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])})
    try:
        _, status = os.waitpid(proc.pid, os.WUNTRACED)  # returns when it stops (or ends)
    except BaseException:
        proc.kill()
        raise
    if not os.WIFSTOPPED(status):
        proc.returncode = os.waitstatus_to_exitcode(status)
        raise AssertionError(f"the run ended (code {proc.returncode}) before writing {target}:\n"
                             f"{log.read_text()[-3000:]}")
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL


@contextmanager
def signal_after_step(sig: int, step: int) -> Iterator[None]:
    """Inside the block, the training loop receives `sig` (as from Ctrl-C or `kill`) right after micro-batch `step`."""
    from lora_dreambooth.training.recipe import DreamBoothRecipe

    real = DreamBoothRecipe._micro_step

    def micro_step(self, micro_index: int):
        loss = real(self, micro_index)
        if micro_index == step - 1:
            signal.raise_signal(sig)
        return loss

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(DreamBoothRecipe, "_micro_step", micro_step)
        yield


def checkpoint_steps(out: Path) -> list[int]:
    return [step for step, _ in list_checkpoints(out)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_base, dog_dir):
    """An uninterrupted run (in-process: same arithmetic as the CLI on one thread); its class images are reused."""
    root = tmp_path_factory.mktemp("reference")
    cfg = TrainConfig(instance_dir=str(dog_dir), base=str(tiny_base), token="sks", class_noun="dog",
                      output_dir=str(root / "adapter"), class_dir=str(root / "class"), **SETTINGS)
    result = train(cfg)
    return {"weights": load_file(str(result.adapter_path)), "class_dir": root / "class"}


def test_killed_and_interrupted_runs_resume_bit_exactly(tmp_path, tiny_base, dog_dir, reference, capsys):
    out = tmp_path / "run"
    cmd = train_cmd(dog_dir, tiny_base, out, reference["class_dir"], "--checkpoint-every", "2",
                    "--checkpoints-total-limit", "1")

    # 1. kill -9 half-way through writing checkpoint 8. With a limit of 1, checkpoint 6 must survive (pruning
    #    waits for a finished new one) and the half-written folder must never count as a checkpoint.
    kill_9_while_writing(tmp_path, ".checkpoint-8.partial/optimizer.bin", *cmd)
    assert checkpoint_steps(out) == [6]
    assert (out / "checkpoints" / ".checkpoint-8.partial" / "optimizer.bin").is_file()
    assert not (out / ADAPTER_FILENAME).exists()

    # 2. --resume, then Ctrl-C (SIGINT) after step 12: a checkpoint there, exit code 130 and a resume hint.
    with signal_after_step(signal.SIGINT, 12):
        run = cli_in_process(capsys, *cmd, "--resume")
    assert run.returncode == 130, run.stderr[-3000:]
    assert "resumed from" in run.stderr and "at step 6" in run.stderr
    assert "Interrupted at step 12/24; checkpoint saved. Resume with the same command plus --resume." in run.stderr
    assert checkpoint_steps(out) == [12]
    assert not (out / "checkpoints" / ".checkpoint-8.partial").exists()  # rewritten on the way, then pruned

    # 3. A resume whose options change the maths is refused before anything loads.
    run = cli_in_process(capsys, *cmd, "--resume", "--rank", "8", "--lr", "2e-3")
    assert run.returncode == 2 and run.stderr.strip().splitlines()[-1].startswith("Error: cannot resume from")
    assert "lr: 0.001 -> 0.002" in run.stderr and "rank: 4 -> 8" in run.stderr
    assert checkpoint_steps(out) == [12]

    # 4. --resume, kill -9 half-way through writing the adapter: no file that looks finished.
    kill_9_while_writing(tmp_path, f".{ADAPTER_FILENAME}.", *cmd, "--resume")
    assert not (out / ADAPTER_FILENAME).exists() and not (out / "train_config.toml").exists()
    leftovers = list(out.glob(f".{ADAPTER_FILENAME}.*.partial"))
    assert len(leftovers) == 1
    with pytest.raises(UserInputError, match="truncated"):
        resolve_adapter_file(leftovers[0])
    inspect = cli_in_process(capsys, "inspect", out)
    assert inspect.returncode == 2 and f"has no {ADAPTER_FILENAME}" in inspect.stderr

    # 5. The last --resume finishes; the adapter is the uninterrupted run's, bit for bit.
    run = cli_in_process(capsys, *cmd, "--resume")
    assert run.returncode == 0, run.stderr[-3000:]
    resumed = load_file(str(out / ADAPTER_FILENAME))
    assert resumed.keys() == reference["weights"].keys()
    for key, tensor in reference["weights"].items():
        assert torch.equal(resumed[key], tensor), key
    assert checkpoint_steps(out) == [22]  # the limit held all along


def test_sigterm_checkpoints_and_resume_finishes_bit_exactly(tmp_path, tiny_base, dog_dir, capsys):
    def cmd(out: Path, *extra: str) -> list:
        return ["train", dog_dir, "--base", tiny_base, "--token", "sks", "--class-noun", "dog", "--output", out,
                "--resolution", "32", "--steps", "6", "--no-prior", "--lr", "1e-3", "--save-dtype", "fp32", *extra]

    assert cli_in_process(capsys, *cmd(tmp_path / "whole")).returncode == 0
    with signal_after_step(signal.SIGTERM, 3):
        run = cli_in_process(capsys, *cmd(tmp_path / "stopped"))
    assert run.returncode == 130 and "Interrupted at step 3/6" in run.stderr, run.stderr[-3000:]
    assert checkpoint_steps(tmp_path / "stopped") == [3]  # saved on the way out, with no --checkpoint-every
    assert cli_in_process(capsys, *cmd(tmp_path / "stopped", "--resume")).returncode == 0
    whole = load_file(str(tmp_path / "whole" / ADAPTER_FILENAME))
    resumed = load_file(str(tmp_path / "stopped" / ADAPTER_FILENAME))
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_divergence_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path, tiny_base, dog_dir, capsys):
    out = tmp_path / "nan"
    cmd = ["train", dog_dir, "--base", tiny_base, "--token", "sks", "--class-noun", "dog", "--output", out,
           "--resolution", "32", "--steps", "8", "--no-prior", "--lr", "1e6", "--checkpoint-every", "1",
           "--log-every", "100"]
    run = cli_in_process(capsys, *cmd)
    assert run.returncode == 1, run.stderr[-3000:]
    error = run.stderr.strip().splitlines()[-1]
    assert error.startswith("Error: loss became NaN/inf at step 2; no adapter was written"), error
    assert "lower --lr (now 1e+06" in error and "checkpoint-1" in error
    assert "Traceback" not in run.stderr
    assert not (out / ADAPTER_FILENAME).exists()
    # The guard runs before every checkpoint, so nothing taken after the loss went bad was kept.
    assert checkpoint_steps(out) == [1]
    saved = load_file(str(out / "checkpoints" / "checkpoint-1" / "adapter_0.safetensors"))
    assert saved and all(bool(torch.isfinite(t).all()) for t in saved.values())


def test_loss_scale_skips_are_counted_in_the_result(tmp_path, tiny_base, dog_dir):
    """fp16 loss-scale skips happen only on a GPU; without loss scaling the count must stay 0."""
    cfg = TrainConfig(instance_dir=str(dog_dir), base=str(tiny_base), token="sks", class_noun="dog",
                      output_dir=str(tmp_path / "o"), resolution=32, steps=2, prior=False)
    result = train(cfg)
    assert result.skipped_steps == 0 and math.isfinite(result.last_loss)


def test_resume_without_checkpoints_and_fresh_run_over_old_checkpoints_warn(tmp_path, tiny_base, dog_dir, capsys):
    out = tmp_path / "o"
    base_cmd = ["train", dog_dir, "--base", tiny_base, "--token", "sks", "--class-noun", "dog", "--output", out,
                "--resolution", "32", "--steps", "2", "--no-prior", "--checkpoint-every", "1"]
    run = cli_in_process(capsys, *base_cmd, "--resume")
    assert run.returncode == 0 and "--resume: no checkpoint" in run.stderr
    run = cli_in_process(capsys, *base_cmd, "--overwrite")
    assert run.returncode == 0
    assert "holds checkpoints of an earlier run (latest: checkpoint-1)" in run.stderr


def test_a_checkpoint_written_before_the_restructuring_resumes_to_the_same_adapter(tmp_path, tiny_base, dog_dir,
                                                                                   caplog, monkeypatch):
    """tests/data/checkpoint-0.1.0 was written by the package before its modules moved into stage folders
    (commit 151febd): 8 steps on the tiny base (seed 0) with the bundled dog photos and 2 class images,
    checkpointed at step 4, and the adapter that run finished with. Resuming it today finishes the same adapter."""
    import json
    import logging
    import shutil

    data = Path(__file__).parent / "data" / "checkpoint-0.1.0"
    out = tmp_path / "out"
    shutil.copytree(data / "checkpoints", out / "checkpoints")
    state_file = out / "checkpoints" / "checkpoint-4" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["config"]["base"] = str(tiny_base)  # the same tiny base, built where this test keeps it
    state_file.write_text(json.dumps(state))
    # On the CPU as that run was, a GPU machine too: a GPU draws other noise from the same seed (and runs TF32).
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    config = TrainConfig(instance_dir=str(dog_dir), base=str(tiny_base), token="sks", class_noun="dog",
                         output_dir=str(out), class_dir=str(data / "class-images"), resolution=32, steps=8,
                         checkpoint_every=4, num_class_images=2, class_inference_steps=2, lr=1e-3, save_dtype="fp32",
                         log_every=2, seed=3, resume=True, mixed_precision="no")  # what that run resolved "auto" to
    with caplog.at_level(logging.INFO, logger="lora_dreambooth.training.checkpoints"):
        result = train(config)
    assert result.steps_done == 8 and not result.interrupted
    assert any("resumed from" in r.getMessage() and r.getMessage().endswith("at step 4") for r in caplog.records)
    resumed, finished = load_file(str(result.adapter_path)), load_file(str(data / "finished_adapter.safetensors"))
    assert resumed.keys() == finished.keys()
    # The file was written on another machine's CPU, which alone would repeat it bit for bit: another CPU picks other
    # vector kernels or threads (2.2e-8 apart on the CI machine).
    atol = 1e-6
    for key, tensor in finished.items():
        torch.testing.assert_close(resumed[key], tensor, rtol=0, atol=atol)
    # ... while the 4 steps moved the adapter far more than that, so a resume that lost its state would fail here.
    unet_at_4 = load_file(str(data / "checkpoints" / "checkpoint-4" / "adapter_0.safetensors"))
    moved = max((finished[f"unet.{key}"] - tensor).abs().max().item() for key, tensor in unet_at_4.items())
    assert moved > 10 * atol, moved


def test_resume_keeps_how_this_run_steps_the_optimizer(tmp_path):
    """A checkpoint's param groups carry the optimizer's execution flags: one written by a plain AdamW (a CPU run) must
    not turn this run's fused AdamW (what a GPU run and its CUDA graph use) back into a plain one."""
    from accelerate import Accelerator

    from lora_dreambooth.training.checkpoints import keep_execution_flags
    from lora_dreambooth.training.runtime import reset_single_process_state

    def run(fused: bool):
        reset_single_process_state()
        accelerator = Accelerator(cpu=True)
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 2)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused, foreach=None if fused else False)
        model, optimizer = accelerator.prepare(model, optimizer)
        return accelerator, model, optimizer

    accelerator, model, optimizer = run(fused=False)
    model(torch.ones(3, 4)).sum().backward()
    optimizer.step()
    accelerator.save_state(str(tmp_path / "ckpt"))
    saved = {k: v.clone() for k, v in optimizer.optimizer.state[optimizer.optimizer.param_groups[0]["params"][0]].items()}

    accelerator, model, optimizer = run(fused=True)
    with keep_execution_flags(optimizer):
        accelerator.load_state(str(tmp_path / "ckpt"))
    group = optimizer.optimizer.param_groups[0]
    assert group["fused"] is True and not group["foreach"]
    state = optimizer.optimizer.state[group["params"][0]]
    for key, value in saved.items():  # the moments and the step count came through
        torch.testing.assert_close(state[key], value)
    model(torch.ones(3, 4)).sum().backward()
    optimizer.step()  # the fused kernel steps the restored state
    assert float(state["step"]) == 2
