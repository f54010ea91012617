"""App and server safety, against the running Gradio app (real server, real `gradio_client`, real HTTP).

Binds 127.0.0.1 unless asked; public hosts and --share only with a warning; subjects are library names, never
paths; per-request limits and a bounded queue; concurrent requests each get their own subject's image.
"""
from __future__ import annotations

import socket
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lora_dreambooth import TrainConfig, train

from .conftest import cli_in_process

pytest.importorskip("gradio")
pytest.importorskip("gradio_client")

SUBJECTS = {"my-dog": ("sks", "dog"), "my-cat": ("zwx", "cat")}
BASE_ONLY = "(base model)"


@pytest.fixture(scope="module")
def library(tmp_path_factory, tiny_base, dog_dir, cat_dir) -> Path:
    """Two tiny adapters (a few steps at a high lr, so their images differ clearly from each other)."""
    root = tmp_path_factory.mktemp("library")
    for (name, (token, noun)), photos in zip(SUBJECTS.items(), (dog_dir, cat_dir)):
        train(TrainConfig(instance_dir=str(photos), base=str(tiny_base), token=token, class_noun=noun,
                          output_dir=str(root / name), resolution=32, steps=3, prior=False, lr=1e-2,
                          save_dtype="fp32"))
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(library, tiny_base, tmp_path_factory):
    """`serve` with its defaults (host, no share), a queue of 2 so that the bound can be seen."""
    mp = pytest.MonkeyPatch()
    mp.setenv("GRADIO_TEMP_DIR", str(tmp_path_factory.mktemp("gradio")))
    from lora_dreambooth.serve.app import serve

    port = free_port()
    running = serve(str(tiny_base), library, port=port, device="cpu", max_queue=2, block=False)
    yield {"url": running.url, "port": port, "resident": running.resident}
    running.close()
    mp.undo()


def client(server):
    from gradio_client import Client

    return Client(server["url"], verbose=False)


def generate(c, subject: str, *, prompt: str | None = None, mix: str = BASE_ONLY, **settings):
    token, noun = SUBJECTS.get(subject, ("sks", "dog"))
    values = dict(subject=subject, prompt=prompt or f"a photo of {token} {noun}", negative_prompt="", strength=1.0,
                  mix_subject=mix, mix_strength=0.5, steps=3, guidance=7.5, seed=0, randomize_seed=False,
                  num_images=1, width=32, height=32)
    values.update(settings)
    gallery, _, _ = c.predict(*values.values(), api_name="/generate")
    return np.asarray(Image.open(gallery[0]["image"]).convert("RGB"))


def disk_loads(c) -> tuple[int, int]:
    stats = c.predict(api_name="/status")
    return stats["adapter_disk_loads"], stats["generations"]


def outside_address() -> str | None:
    """This machine's address on a non-loopback interface (no packet is sent), if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 9))
            address = s.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


def test_binds_loopback_only_by_default(server):
    assert server["url"].startswith("http://127.0.0.1:")
    with urllib.request.urlopen(server["url"], timeout=10) as response:
        assert response.status == 200
    address = outside_address()
    if address is None:
        pytest.skip("no non-loopback interface to try")
    with pytest.raises(OSError):
        socket.create_connection((address, server["port"]), timeout=5).close()


@pytest.mark.parametrize("flags, warning", [
    (("--host", "0.0.0.0"), "binding 0.0.0.0: anyone who can reach this machine"),
    (("--share",), "--share: a public gradio.live link"),
])
def test_public_exposure_only_on_request_and_with_a_warning(tmp_path, tiny_base, capsys, flags, warning):
    # The library is missing, so serve stops right after its warnings, before binding anything.
    run = cli_in_process(capsys, "serve", "--base", tiny_base, "--adapters", tmp_path / "nowhere", *flags)
    assert warning in run.stderr
    assert run.returncode == 2 and run.stderr.strip().splitlines()[-1].startswith("Error: adapter library")


# (test_app.py covers "../x", "/etc/passwd" and unknown names with their messages.)
CRAFTED = ["..", "~/my-dog", "C:\\Windows\\x", "my-dog\x00", "my-dog\n", ".hidden", "pytorch_lora_weights.safetensors"]


def test_crafted_subject_values_are_refused_without_touching_disk(server, library):
    c = client(server)
    before = disk_loads(c)
    real_paths = [str(library / "my-dog"), str(library / "my-dog" / "pytorch_lora_weights.safetensors")]
    for crafted in CRAFTED + real_paths:
        for field in ("subject", "mix"):
            with pytest.raises(Exception) as caught:
                generate(c, "my-dog", mix=crafted) if field == "mix" else generate(c, crafted)
            message = str(caught.value)
            assert "is not a library name" in message or "unknown subject" in message, (crafted, field, message)
    assert disk_loads(c) == before  # nothing was read from disk, nothing was generated


def test_per_request_limits(server):
    c = client(server)
    before = disk_loads(c)
    for setting, value in [("num_images", 100), ("height", 4096), ("strength", 50.0), ("prompt", "x" * 5000),
                           ("seed", -1)]:
        with pytest.raises(Exception):
            generate(c, "my-dog", **{setting: value})
    assert disk_loads(c) == before


def test_files_outside_the_app_are_not_served(server, library):
    for target in ("/etc/passwd", str(library / "my-dog" / "pytorch_lora_weights.safetensors")):
        for route in ("gradio_api/file=", "file="):
            with pytest.raises(urllib.error.HTTPError) as caught:
                urllib.request.urlopen(server["url"] + route + target, timeout=10)
            assert caught.value.code in (403, 404), (route, target, caught.value.code)


def test_the_queue_is_bounded(server):
    c = client(server)
    jobs = [c.submit("my-dog", "a photo of sks dog", "", 1.0, BASE_ONLY, 0.5, 20, 7.5, 0, False, 1, 32, 32,
                     api_name="/generate") for _ in range(6)]
    outcomes = []
    for job in jobs:
        try:
            job.result(timeout=300)
            outcomes.append("done")
        except Exception as exc:  # gradio_client's QueueError
            outcomes.append("full" if "Queue is full" in str(exc) else f"other: {exc}")
    assert "full" in outcomes and "done" in outcomes, outcomes
    assert all(o in ("done", "full") for o in outcomes), outcomes


def test_concurrent_requests_each_get_their_own_subject(server):
    c = client(server)
    expected = {name: generate(c, name) for name in SUBJECTS}
    base = generate(c, BASE_ONLY, prompt="a photo of sks dog")
    assert not np.array_equal(expected["my-dog"], expected["my-cat"])
    assert not np.array_equal(expected["my-dog"], base)
    order = list(SUBJECTS) * 3
    per_thread = threading.local()

    def request(name: str) -> tuple[str, np.ndarray]:
        if not hasattr(per_thread, "client"):
            per_thread.client = client(server)
        return name, generate(per_thread.client, name)

    with ThreadPoolExecutor(max_workers=2) as pool:  # 2 in flight: within the queue bound of this server
        results = list(pool.map(request, order))
    for name, image in results:
        assert np.array_equal(image, expected[name]), name
