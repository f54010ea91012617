"""The app's Train tab: a real `lora-dreambooth serve` process with a Train tab, driven by gradio_client (train,
train_status, cancel, generate with the new subject, generate while a training runs, a bad photo) and by headless
Chromium (upload, start, progress, pick the new subject, generate). One server serves every check."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lora_dreambooth.errors import UserInputError
from lora_dreambooth.serve.jobs import JOBS_DIR, JobProgress, copy_photos, progress_from_log, safe_file_name

from .conftest import REPO
from .test_app import server_process

CHROMIUM = Path("/usr/bin/chromium")
GENERATE = dict(negative_prompt="", strength=1.0, mix_subject="(base model)", mix_strength=0.5, steps=3,
                guidance=7.5, seed=3, randomize_seed=False, num_images=1, width=32, height=32)
TRAIN_DEFAULTS = """resolution = 32
num_class_images = 2
class_inference_steps = 2
lr = 1e-3
save_dtype = "fp32"
validation_inference_steps = 2
checkpoint_every = 0
"""


@pytest.fixture(scope="module")
def train_server(tmp_path_factory, tiny_base):
    """`python -m lora_dreambooth serve` on an empty library, with a Train tab whose jobs train at 32 px."""
    tmp = tmp_path_factory.mktemp("train-tab")
    library = tmp / "library"
    library.mkdir()
    (tmp / "train.toml").write_text(TRAIN_DEFAULTS)
    with server_process(tiny_base, library, tmp, "--train-config", str(tmp / "train.toml"),
                        env={"LORA_DREAMBOOTH_CACHE": str(tmp / "cache")}) as (url, lines, proc):
        yield url, library, lines, proc


@pytest.fixture(scope="module")
def client(train_server, tmp_path_factory):
    from gradio_client import Client

    return Client(train_server[0], verbose=False, analytics_enabled=False,
                  download_files=str(tmp_path_factory.mktemp("downloads")))


def start(client, photos, token: str, class_noun: str = "dog", steps: int = 12) -> str:
    from gradio_client import handle_file

    return client.predict(photos=[handle_file(str(p)) for p in photos], token=token, class_noun=class_noun,
                          steps=steps, api_name="/train")


def wait_for(client, job: str, states: tuple[str, ...], timeout: float = 150, min_step: int = 0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status = client.predict(job=job, api_name="/train_status")
        if status["state"] in states and status["step"] >= min_step:
            return status
        assert time.monotonic() < deadline, f"job {job} still {status}"
        time.sleep(0.4)


def generate(client, subject: str, prompt: str) -> np.ndarray:
    images, _, _ = client.predict(subject=subject, prompt=prompt, **GENERATE, api_name="/generate")
    return np.asarray(Image.open(images[0]["image"]).convert("RGB"))


def dog_photos(dog_dir: Path, count: int = 3) -> list[Path]:
    return sorted(dog_dir.glob("*.jpg"))[:count]


def test_train_queue_bad_photo_generate_while_training_and_cancel(client, train_server, dog_dir, tmp_path):
    _, library, lines, proc = train_server
    broken = tmp_path / "holiday (1).jpg"
    broken.write_bytes(b"\xff\xd8\xff this is not really a JPEG")
    first = start(client, dog_photos(dog_dir, 4), "sks")
    bad = start(client, [*dog_photos(dog_dir, 2), broken], "zwx", "cat")
    long_run = start(client, dog_photos(dog_dir), "ohwx", steps=5000)
    queued = client.predict(job=bad, api_name="/train_status")
    assert queued["state"] == "queued" and queued["queue_position"] >= 1, queued

    done = wait_for(client, first, ("done", "failed"))
    assert done["state"] == "done", done
    assert (done["step"], done["total_steps"]) == (12, 12)
    subject = done["subject"]
    assert subject == "sks-dog" and (library / subject / "pytorch_lora_weights.safetensors").is_file()
    assert not (library / subject / "checkpoints").exists()
    assert (library / subject / "preview.png").is_file()  # the last validation picture
    uploads = sorted(p.name for p in (library / JOBS_DIR / first / "photos").iterdir())
    assert uploads == ["00-00.jpg", "01-01.jpg", "02-02.jpg", "03-03.jpg"], uploads
    with_subject = generate(client, subject, "a photo of sks dog")
    base_only = generate(client, "(base model)", "a photo of sks dog")
    assert np.abs(with_subject.astype(int) - base_only).max() > 0, "the new subject must change the picture"

    failed = wait_for(client, bad, ("done", "failed"))
    assert failed["state"] == "failed", failed
    message = failed["message"]
    assert message.startswith("Error:") and "02-holiday_1.jpg" in message and "\n" not in message, message
    assert "Traceback" not in message

    running = wait_for(client, long_run, ("running",), min_step=1)
    answered = generate(client, subject, "a photo of sks dog on the beach")
    assert answered.shape == (32, 32, 3)
    assert client.predict(job=long_run, api_name="/train_status")["state"] == "running", "generate answered late"
    client.predict(job=long_run, api_name="/cancel_training")
    cancelled = wait_for(client, long_run, ("cancelled", "failed", "done"))
    assert cancelled["state"] == "cancelled" and cancelled["resumable"], cancelled
    assert cancelled["step"] >= running["step"]
    assert any((library / JOBS_DIR / long_run / "adapter").glob("checkpoints/checkpoint-*")), "no checkpoint"
    client.predict(job=long_run, api_name="/resume_training")
    resumed = wait_for(client, long_run, ("running",), min_step=cancelled["step"] + 1)
    client.predict(job=long_run, api_name="/cancel_training")
    assert wait_for(client, long_run, ("cancelled", "failed"))["state"] == "cancelled"
    log_text = (library / JOBS_DIR / long_run / "train.log").read_text()
    assert f"at step {cancelled['step']}" in log_text.split("resumed from", 1)[1][:400], "did not resume"
    assert resumed["step"] > cancelled["step"]
    assert proc.poll() is None, "the server must survive every job"
    assert "Traceback" not in "".join(lines)


def test_bad_requests_are_refused_in_one_line(client, dog_dir):
    from gradio_client.exceptions import AppError

    for photos, token, noun, steps, expected in (
        (dog_photos(dog_dir, 2), "sks", "dog", 12, "drop 3 to 20 photos"),
        (dog_photos(dog_dir), "", "dog", 12, "--token must not be empty"),
        (dog_photos(dog_dir), "dog", "dog", 12, "equals --class-noun"),
        (dog_photos(dog_dir), "sks", "dog", 0, "steps must be a whole number"),
    ):
        with pytest.raises(AppError) as error:
            start(client, photos, token, noun, steps)
        text = str(error.value)
        assert expected in text and "Traceback" not in text, text
    with pytest.raises(AppError, match="unknown job"):
        client.predict(job="../../etc", api_name="/train_status")


def test_uploads_get_safe_names_and_caps(tmp_path, dog_dir):
    assert safe_file_name("../../etc/passwd", 0) == "00-passwd.jpg"
    assert safe_file_name("C:\\Users\\me\\my dog!.PNG", 3) == "03-my_dog.png"
    assert safe_file_name(".bashrc", 1) == "01-bashrc.jpg"
    with pytest.raises(UserInputError, match="not a photo"):
        copy_photos([*dog_photos(dog_dir, 2), REPO / "setup.cfg"], tmp_path / "a")
    with pytest.raises(UserInputError, match="drop 3 to 20"):
        copy_photos(dog_photos(dog_dir) * 7, tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_progress_is_read_from_the_trainers_progress_bar():
    text = ("loading\rtrain:  50%|#####     | 6/12 [00:03<00:03,  1.90step/s, its=2.00, loss=0.1234, lr=1.00e-03]"
            "\nvalidation grid for step 6: /x/validation/step-000006.png\r")
    progress = progress_from_log(text, JobProgress())
    assert (progress.step, progress.total_steps, progress.loss, progress.eta_s) == (6, 12, 0.1234, 3.0)
    assert progress.phase.startswith("validation grid for step 6")


def test_progress_file_written_by_the_trainer_component_is_read_by_the_app(tmp_path):
    from lora_dreambooth.serve.jobs import progress_from_file
    from lora_dreambooth.training.progress import ProgressLog

    path = tmp_path / "progress.jsonl"
    progress = ProgressLog(path, total_steps=12, start_step=0)
    progress.write(6, loss=0.25, lr=1e-3)
    progress.validation(6, tmp_path / "validation" / "step-000006.png")
    with path.open("a") as fh:
        fh.write('{"event": "step", "st')  # a line still being written is skipped
    seen = JobProgress()
    assert progress_from_file(path, seen)
    assert (seen.step, seen.total_steps, seen.loss) == (6, 12, 0.25)
    assert seen.validation == tmp_path / "validation" / "step-000006.png"
    assert seen.eta_s is not None and seen.eta_s >= 0
    assert not progress_from_file(tmp_path / "missing.jsonl", JobProgress())
    assert ProgressLog(None, 12).path is None  # no file configured: nothing written


@pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium is missing (apt-get install chromium)")
def test_train_tab_in_a_browser(train_server, dog_dir):
    from playwright.sync_api import sync_playwright

    from .test_browser import ARTIFACTS, CHROMIUM_ARGS, pick, set_number

    url = train_server[0]
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(120_000)
        page.goto(url)
        page.get_by_role("tab", name="Train").click()
        page.locator("#train-photos input[type=file]").set_input_files([str(p) for p in dog_photos(dog_dir, 3)])
        page.wait_for_function("() => document.querySelectorAll('#train-photos a, #train-photos .file-name').length"
                               " >= 3 || document.querySelector('#train-photos').innerText.includes('02.jpg')")
        token = page.locator("#train-token textarea, #train-token input").first
        token.fill("xyz")
        page.locator("#train-class textarea, #train-class input").first.fill("pup")
        pick(page, "#train-steps", "test run · 12 steps")
        page.locator("#train-start").click()
        page.wait_for_function("() => /step \\d+ \\/ 12|done/.test(document.querySelector('#train-progress')"
                               ".innerText)")
        page.screenshot(path=str(ARTIFACTS / "train-tab-running.png"), full_page=True)
        page.wait_for_function("() => document.querySelector('#train-progress').innerText.includes('done')")
        page.screenshot(path=str(ARTIFACTS / "train-tab-done.png"), full_page=True)
        assert "xyz-pup" in page.locator("#train-progress").inner_text()
        page.get_by_role("tab", name="Generate").click()
        for elem_id, value in (("steps", 3), ("width", 32), ("height", 32)):
            set_number(page, elem_id, value)
        pick(page, "#subject", "xyz pup · xyz-pup")
        page.wait_for_function("() => document.querySelector('#prompt textarea').value === 'a photo of xyz pup'")
        page.locator("#generate").click()
        page.wait_for_function("() => { const img = document.querySelector('#gallery img');"
                               " return img && img.complete && img.naturalWidth > 0; }")
        assert "xyz-pup ×1" in page.locator("#status").inner_text()
        assert "Traceback" not in page.content()
        browser.close()
