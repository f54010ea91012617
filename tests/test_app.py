"""The Gradio app as API clients see it: a real `lora-dreambooth serve` process on a loopback port, called through
gradio_client, compared with the `generate` CLI."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx
import numpy as np
import pytest
from PIL import Image

from lora_dreambooth.cli import main
from lora_dreambooth.serve.app import is_loopback
from lora_dreambooth.serve.library import BASE_ONLY

from .conftest import run_cli
from .test_inference import trained_subjects

PROMPT = "a photo of sks dog"
SETTINGS = dict(negative_prompt="", strength=1.0, mix_subject=BASE_ONLY, mix_strength=0.5, steps=3, guidance=7.5,
                seed=5, randomize_seed=False, num_images=1, width=32, height=32)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def quiet_gradio_env(tmp: Path) -> dict[str, str]:
    """Environment for an offline, telemetry-free app whose temporary files stay in the test's folder."""
    return {"GRADIO_TEMP_DIR": str(tmp / "gradio-tmp"), "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "1"}


@contextmanager
def server_process(base: Path, library: Path, tmp: Path, *extra_args: str, env: dict[str, str] | None = None,
                   timeout: float = 180) -> Iterator[tuple[str, list[str], subprocess.Popen]]:
    """`python -m lora_dreambooth serve` on a free loopback port; yields (url, output lines so far, the process)."""
    port = free_port()
    full_env = {**os.environ, **quiet_gradio_env(tmp), **(env or {})}
    proc = subprocess.Popen([sys.executable, "-m", "lora_dreambooth", "serve", "--base", str(base), "--adapters",
                             str(library), "--port", str(port), *extra_args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=full_env)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + timeout
        while True:
            assert proc.poll() is None, f"server exited early:\n{''.join(lines)}"
            assert time.monotonic() < deadline, f"server did not start:\n{''.join(lines)}"
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        yield url, lines, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def app_library(tmp_path_factory, tiny_base, dog_dir, cat_dir) -> Path:
    """A private copy of the two trained subjects (the refresh test adds to it)."""
    source = trained_subjects(tmp_path_factory, tiny_base, dog_dir, cat_dir)
    target = tmp_path_factory.mktemp("app") / "library"
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("logs"))
    return target


@pytest.fixture(scope="module")
def server(tiny_base, app_library, tmp_path_factory):
    with server_process(tiny_base, app_library, tmp_path_factory.mktemp("server")) as running:
        yield running


@pytest.fixture(scope="module")
def client(server, tmp_path_factory):
    from gradio_client import Client

    return Client(server[0], verbose=False, analytics_enabled=False,
                  download_files=str(tmp_path_factory.mktemp("downloads")))


def generate(client, subject: str, **changes) -> tuple[np.ndarray, int, str]:
    images, seed, status = client.predict(subject=subject, prompt=PROMPT, **{**SETTINGS, **changes},
                                          api_name="/generate")
    assert len(images) == (changes.get("num_images") or SETTINGS["num_images"])
    return np.asarray(Image.open(images[0]["image"]).convert("RGB"), dtype=np.int16), seed, status


def test_server_binds_loopback_and_switches_subjects_without_reloading(server, client):
    url, lines, _ = server
    assert any(f"on http://127.0.0.1:{url.rsplit(':', 1)[1]}" in line for line in lines), "".join(lines)
    before = client.predict(api_name="/status")
    assert before["resident"] == ["sks-dog", "zwx-cat"]
    dog, seed, status = generate(client, "sks-dog")
    cat, _, _ = generate(client, "zwx-cat")
    dog_again, _, status = generate(client, "sks-dog")
    none, _, _ = generate(client, BASE_ONLY)
    assert seed == 5 and "sks-dog ×1" in status
    assert np.abs(dog - cat).max() > 10 and np.abs(dog - none).max() > 10
    np.testing.assert_array_equal(dog, dog_again)
    after = client.predict(api_name="/status")
    assert (after["base_loads"], after["adapter_disk_loads"]) == (1, 2), "switching must not read files"
    assert after["generations"] == before["generations"] + 4


def test_api_output_equals_generate_cli(server, client, tiny_base, app_library, tmp_path):
    dog, _, _ = generate(client, "sks-dog", num_images=2)
    result = run_cli("generate", "--base", tiny_base, "--adapter", f"{app_library / 'sks-dog'}:1.0", "--prompt", PROMPT,
                     "--out", tmp_path / "out", "--steps", 3, "--guidance", 7.5, "--seed", 5, "--num-images", 2,
                     "--height", 32, "--width", 32)
    assert result.returncode == 0, result.stderr
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == ["grid.png", "image-00-seed5.png", "image-01-seed6.png"]
    first = Image.open(tmp_path / "out" / "image-00-seed5.png")
    np.testing.assert_array_equal(np.asarray(first.convert("RGB"), dtype=np.int16), dog)
    assert first.text["prompt"] == PROMPT and "Seed: 5, Size: 32x32" in first.text["parameters"]
    assert '"adapters": [{"name": "sks-dog", "weight": 1.0}]' in first.text["lora_dreambooth"]
    assert Image.open(tmp_path / "out" / "grid.png").size == (64, 32)


@pytest.mark.parametrize("subject, changes, message", [
    ("../sks-dog", {}, "not a library name"),
    ("/etc/passwd", {}, "not a library name"),
    ("sks-dog/../../x", {}, "not a library name"),
    ("no-such-subject", {}, "unknown subject 'no-such-subject'"),
    ("sks-dog", {"mix_subject": "../zwx-cat"}, "not a library name"),
    ("sks-dog", {"prompt": "   "}, "the prompt is empty"),
    ("sks-dog", {"steps": 100000}, "greater than maximum value 100"),  # gradio's slider check comes first
    ("sks-dog", {"width": 30}, "width must be a multiple of 8"),
    ("sks-dog", {"guidance": -3}, "less than minimum value 0"),
    ("sks-dog", {"mix_subject": "sks-dog"}, "same subject is chosen twice"),
])
def test_bad_requests_get_a_readable_message_not_a_trace(client, subject, changes, message):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as error:
        client.predict(subject=subject, **{"prompt": PROMPT, **SETTINGS, **changes}, api_name="/generate")
    text = str(error.value)
    assert message in text and "Traceback" not in text and "\n" not in text.strip()


def test_refresh_loads_new_subjects_once(server, client, app_library):
    shutil.copytree(app_library / "zwx-cat", app_library / "zwx-cat-copy")
    cat, _, _ = generate(client, "zwx-cat")
    _, _, status = client.predict(api_name="/refresh")
    assert "added: zwx-cat-copy" in status
    copy, _, _ = generate(client, "zwx-cat-copy")
    np.testing.assert_array_equal(copy, cat)
    client.predict(api_name="/refresh")  # nothing new: nothing read
    stats = client.predict(api_name="/status")
    assert (stats["base_loads"], stats["adapter_disk_loads"]) == (1, 3)
    shutil.rmtree(app_library / "zwx-cat-copy")
    _, _, status = client.predict(api_name="/refresh")
    assert "removed: zwx-cat-copy" in status


def test_cli_refuses_bad_input_with_one_line(tmp_path, tiny_base, capsys):
    for argv, message in (
        (["serve", "--base", str(tiny_base), "--adapters", str(tmp_path / "missing")], "is not a folder"),
        (["generate", "--base", str(tiny_base), "--prompt", "x", "--out", str(tmp_path), "--steps", "0"],
         "steps must be between 1 and 150"),
        (["generate", "--base", str(tiny_base), "--adapter", str(tmp_path / "nope"), "--prompt", "x", "--out",
          str(tmp_path / "o"), "--steps", "1"], "does not exist"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_loopback_detection():
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.10") and not is_loopback("example.com")
