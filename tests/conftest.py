"""Shared fixtures: a tiny random SD v1 base saved like a real one, the bundled photos, a CLI runner."""
from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from lora_dreambooth.demo import example_photos

REPO = Path(__file__).resolve().parents[1]
# One thread unless OMP_NUM_THREADS says otherwise, in-process and in the CLI subprocesses alike (they inherit it):
# tests compare in-process runs with subprocess runs bit for bit, and a CPU splits its sums by the thread count.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_configure(config):
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


# Test files whose expensive fixtures are shared run on one xdist worker together (`--dist loadgroup`); every other
# file is a group of its own, so a module-scoped fixture is never built twice on two workers.
SHARED_FIXTURES = {"test_variants": "variants", "test_kohya": "variants", "test_lycoris": "variants",  # adapters
                   "test_inference": "subjects", "test_app": "subjects", "test_browser": "subjects"}  # library
# The longest groups start first, so that no worker is left with a long group at the end.
LONG_GROUPS = ("test_synthetic", "test_train_tab", "test_scaleout", "test_reliability", "subjects", "test_notebook",
               "test_train")


def _group(nodeid_or_module: str) -> str:
    """The xdist group of a test (its file's name, or the group of files sharing fixtures)."""
    module = nodeid_or_module.split("::", 1)[0].rsplit("/", 1)[-1].removesuffix(".py").rsplit(".", 1)[-1]
    return SHARED_FIXTURES.get(module, module)


def pytest_collection_modifyitems(config, items):
    """Start the longest groups first (xdist hands out groups in collection order, see below)."""
    def rank(item) -> int:
        group = _group(item.nodeid)
        return LONG_GROUPS.index(group) if group in LONG_GROUPS else len(LONG_GROUPS)

    items.sort(key=rank)


try:
    from xdist.scheduler import LoadScopeScheduling
except ImportError:  # plain pytest: the tests run one by one
    LoadScopeScheduling = None

if LoadScopeScheduling is not None:
    class SharedFixtureScheduling(LoadScopeScheduling):
        """`--dist loadgroup` by file and SHARED_FIXTURES, in collection order. (xdist 3.8's own loadgroup tags
        node ids, which pytest 9 no longer lets it rewrite, so it silently spread a module's tests over workers and
        built module fixtures twice.)"""

        def _split_scope(self, nodeid: str) -> str:
            return _group(nodeid)

    def pytest_xdist_make_scheduler(config, log):
        if config.getvalue("dist") == "loadgroup":
            config.option.loadscopereorder = False  # keep the longest-first order of the collection
            return SharedFixtureScheduling(config, log)
        return None


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """A random tiny StableDiffusionPipeline written with save_pretrained (offline)."""
    from lora_dreambooth.tiny import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny-base") / "base", seed=0)


@pytest.fixture(scope="session")
def dog_dir() -> Path:
    """The bundled, downscaled DreamBooth dog photos (CC BY 4.0, see ATTRIBUTION.md)."""
    return example_photos("dog")


@pytest.fixture(scope="session")
def cat_dir() -> Path:
    return example_photos("cat")


# Kernels whose results do not depend on timing. A GPU's flash and memory-efficient attention backward passes
# accumulate with atomics, so two identical runs differ in the last bits there (seen on an H200: adapters 1e-4
# apart after a resume). Tests that compare runs bit for bit use math attention and deterministic cuDNN on a GPU,
# as a CPU always is. Subprocess drivers run DETERMINISTIC_GPU_KERNELS_CODE.
DETERMINISTIC_GPU_KERNELS_CODE = """
import torch
if torch.cuda.is_available():
    torch.backends.cuda.enable_flash_sdp(False)
    torch.backends.cuda.enable_mem_efficient_sdp(False)
    torch.backends.cudnn.deterministic = True
"""


@contextmanager
def deterministic_gpu_kernels_context():
    """The in-process form of DETERMINISTIC_GPU_KERNELS_CODE, undone afterwards."""
    import torch

    if not torch.cuda.is_available():
        yield
        return
    saved = (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled(),
             torch.backends.cudnn.deterministic)
    exec(DETERMINISTIC_GPU_KERNELS_CODE, {})
    try:
        yield
    finally:
        torch.backends.cuda.enable_flash_sdp(saved[0])
        torch.backends.cuda.enable_mem_efficient_sdp(saved[1])
        torch.backends.cudnn.deterministic = saved[2]


@pytest.fixture(scope="module")
def deterministic_gpu_kernels():
    """For a module whose runs are compared bit for bit (use it as an autouse module fixture there)."""
    with deterministic_gpu_kernels_context():
        yield


@pytest.fixture(scope="module")
def cpu_training():
    """Train on the CPU even where a GPU is visible (accelerate's ACCELERATE_USE_CPU, which the recipe honours),
    for a module whose exact comparisons are CPU semantics: an in-memory model against files reloaded on the CPU,
    CPU ranks against one process. On a GPU the recipe would leave the VAE on the CPU and train in bf16."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ACCELERATE_USE_CPU", "1")
        yield


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Class-image caches go to the test's tmp dir, never to ~/.cache."""
    monkeypatch.setenv("LORA_DREAMBOOTH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def run_cli(*args: str, env: dict | None = None, timeout: float = 300, cwd: Path | None = None
            ) -> subprocess.CompletedProcess:
    """Run `python -m lora_dreambooth ARGS` in a subprocess (the real entry point), capturing output."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "lora_dreambooth", *map(str, args)], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=cwd)


def small_train_args(instance_dir: Path, base: Path, out: Path, *extra: str) -> list[str]:
    """A fast training command line for the tiny base (32 px, few steps, 2 class images)."""
    return ["train", str(instance_dir), "--base", str(base), "--token", "sks", "--class-noun", "dog",
            "--output", str(out), "--resolution", "32", "--steps", "6", "--num-class-images", "2",
            "--class-inference-steps", "2", "--lr", "1e-3", "--save-dtype", "fp32", "--log-every", "2", *extra]


@dataclass
class CliRun:
    """The outcome of one in-process CLI call."""

    returncode: int
    stdout: str
    stderr: str


def cli_in_process(capsys, *args: str) -> CliRun:
    """Run `lora_dreambooth.cli.main(ARGS)` in this process (the real entry point without the ~5 s start-up).

    Exit codes and `Error:` lines are exactly those of the command; our log handler is rebound to the captured
    stderr for the call and removed afterwards (logger settings restored), so it never writes into a stream
    pytest has closed.
    """
    import logging

    from lora_dreambooth.cli import main

    def drop_handlers() -> None:
        logger = logging.getLogger("lora_dreambooth")
        for handler in [h for h in logger.handlers if getattr(h, "_lora_dreambooth", False)]:
            logger.removeHandler(handler)

    logger = logging.getLogger("lora_dreambooth")
    saved = (logger.level, logger.propagate)
    capsys.readouterr()
    drop_handlers()
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        drop_handlers()
        logger.setLevel(saved[0])
        logger.propagate = saved[1]  # caplog in later tests listens at the root logger
    out, err = capsys.readouterr()
    return CliRun(code, out, err)
