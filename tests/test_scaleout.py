"""Scale-out through accelerate: a real 2-rank DDP run on CPU (gloo over loopback)."""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from lora_dreambooth.files.metadata import ADAPTER_FILENAME

from .conftest import cli_in_process, small_train_args


@pytest.fixture(scope="module", autouse=True)
def _on_cpu(cpu_training):
    """These comparisons are CPU semantics (see conftest.cpu_training), also on a GPU machine."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_two_ranks(*args: str) -> subprocess.CompletedProcess:
    """`accelerate launch` the real CLI on 2 CPU ranks. `--cpu --num_processes 2` silently runs ONE process, hence
    --multi_gpu with ACCELERATE_USE_CPU. The GPUs are hidden from the ranks: accelerate's barrier passes
    `device_ids=[local rank]` even for CPU ranks, and with CUDA visible gloo then takes GPU `rank` (rank 1 failed
    with "invalid device ordinal" on a one-GPU machine)."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--main_process_ip", "127.0.0.1", "--main_process_port", str(_free_port()),
                "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "lora_dreambooth", "-v", *args]
    return subprocess.run(launcher, capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory, tiny_base, dog_dir):
    root = tmp_path_factory.mktemp("ddp")
    args = small_train_args(dog_dir, tiny_base, root / "ddp", "--steps", "4", "--num-class-images", "4",
                            "--class-dir", str(root / "class"), "--checkpoint-every", "2")
    proc = _launch_two_ranks(*args)
    rank1 = [line for line in proc.stderr.splitlines() if line.startswith("[rank1]")]  # the crashed rank's own trace
    assert proc.returncode == 0, "\n".join(rank1[-25:]) + "\n...\n" + proc.stderr[-3000:]
    return root, proc


def test_two_ranks_train_one_adapter(two_rank_run):
    root, proc = two_rank_run
    log = proc.stderr
    assert "process 0/2" in log and "process 1/2" in log
    seen = {r: set() for r in (0, 1)}
    for rank, images in re.findall(r"rank (\d) micro-batch \d+ instance images \[([\d, ]+)\]", log):
        seen[int(rank)].update(int(i) for i in images.split(","))
    assert seen[0] and seen[1] and seen[0] != seen[1], seen
    shards = re.findall(r"rank (\d) encodes latents of images (\d+)-(\d+) of (\d+)", log)
    assert {(r, a, b) for r, a, b, n in shards if n == "5"} == {("0", "0", "3"), ("1", "3", "5")}, shards
    digests = dict(re.findall(r"rank (\d) adapter sha256 (\w+)", log))
    assert set(digests) == {"0", "1"} and digests["0"] == digests["1"], digests
    assert "effective batch: 2 process(es) x 1 image(s) x 1 accumulation = 2" in log
    assert sorted(p.name for p in (root / "ddp").glob("*.safetensors")) == [ADAPTER_FILENAME]
    assert proc.stdout.count("Wrote ") == 1
    # class images were split across ranks without duplicates: exactly 4, each generated once
    assert sorted(p.name for p in (root / "class").glob("*.png")) == [f"class-0000{i}.png" for i in range(4)]
    assert len(re.findall(r"generating 2 on this process", log)) == 2


def test_two_ranks_match_one_process_with_same_effective_batch(two_rank_run, tiny_base, dog_dir, capsys):
    root, _ = two_rank_run
    args = small_train_args(dog_dir, tiny_base, root / "single", "--steps", "4", "--num-class-images", "4",
                            "--class-dir", str(root / "class"), "--batch-size", "2")
    proc = cli_in_process(capsys, *args)  # one process: this one
    assert proc.returncode == 0, proc.stderr[-4000:]
    ddp, single = load_file(str(root / "ddp" / ADAPTER_FILENAME)), load_file(str(root / "single" / ADAPTER_FILENAME))
    assert ddp.keys() == single.keys()
    for key in ddp:
        torch.testing.assert_close(ddp[key], single[key], atol=1e-5, rtol=1e-4)


def test_checkpoint_of_two_ranks_resumes_on_one(two_rank_run, tiny_base, dog_dir, capsys):
    root, _ = two_rank_run
    resumed = root / "resumed"
    import shutil

    shutil.copytree(root / "ddp" / "checkpoints", resumed / "checkpoints")
    args = small_train_args(dog_dir, tiny_base, resumed, "--steps", "4", "--num-class-images", "4",
                            "--class-dir", str(root / "class"), "--checkpoint-every", "2", "--resume")
    proc = cli_in_process(capsys, *args)  # one process: this one
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "resumed from" in proc.stderr and "at step 2" in proc.stderr
    assert (resumed / ADAPTER_FILENAME).is_file()
