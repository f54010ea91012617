"""The app in a real browser (Debian chromium driven by playwright): pick subjects, type a prompt, generate.

Saves screenshots to test-artifacts/ (git-ignored). Skipped only when /usr/bin/chromium is missing; CI installs it.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from .conftest import REPO
from .test_app import free_port, quiet_gradio_env
from .test_inference import trained_subjects

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
ARTIFACTS = REPO / "test-artifacts"

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium is missing (apt-get install chromium)")


@pytest.fixture(scope="module")
def running_app(tmp_path_factory, tiny_base, dog_dir, cat_dir):
    """The real app (lora_dreambooth.serve.app.serve) in this process, so the test can read its load counters."""
    tmp = tmp_path_factory.mktemp("browser")
    library = tmp / "library"
    shutil.copytree(trained_subjects(tmp_path_factory, tiny_base, dog_dir, cat_dir), library,
                    ignore=shutil.ignore_patterns("logs"))
    saved = {key: os.environ.get(key) for key in quiet_gradio_env(tmp)}
    os.environ.update(quiet_gradio_env(tmp))
    from lora_dreambooth.serve.app import serve

    app = serve(str(tiny_base), library, port=free_port(), block=False)
    yield app
    app.close()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def page(running_app):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.set_default_timeout(30_000)
        page.goto(running_app.url)
        page.wait_for_selector("#generate")
        yield page
        browser.close()


def pick(page, dropdown: str, label: str) -> None:
    page.locator(f"{dropdown} input").click()
    page.get_by_role("option", name=label).click()


def set_number(page, elem_id: str, value: int) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def generate_and_wait(page, previous_src: str | None) -> str:
    """Click Generate; wait until the gallery shows a new image; return its URL."""
    page.locator("#generate").click()
    page.wait_for_function(
        "prev => { const img = document.querySelector('#gallery img');"
        "          return img && img.complete && img.naturalWidth > 0 && img.getAttribute('src') !== prev; }",
        arg=previous_src)
    return page.locator("#gallery img").first.get_attribute("src")


def image_bytes(page, src: str) -> bytes:
    return page.request.get(src).body()


def test_pick_subject_type_prompt_generate_and_switch(page, running_app):
    ARTIFACTS.mkdir(exist_ok=True)
    resident = running_app.resident
    loads_at_start = (resident.base_loads, resident.adapter_disk_loads)
    assert loads_at_start == (1, 2)
    for elem_id, value in (("steps", 3), ("width", 32), ("height", 32)):
        set_number(page, elem_id, value)

    pick(page, "#subject", "zwx cat · zwx-cat")
    page.wait_for_function("() => document.querySelector('#prompt textarea').value === 'a photo of zwx cat'")
    page.locator("#prompt textarea").fill("a photo of zwx cat on the beach")
    cat_src = generate_and_wait(page, None)
    page.screenshot(path=str(ARTIFACTS / "app-zwx-cat.png"), full_page=True)
    assert "zwx-cat ×1" in page.locator("#status").inner_text()
    assert resident.stats()["active"] == [["zwx-cat", 1.0]]

    pick(page, "#subject", "sks dog · sks-dog")
    page.locator("#prompt textarea").fill("a photo of sks dog on the beach")
    dog_src = generate_and_wait(page, cat_src)
    page.screenshot(path=str(ARTIFACTS / "app-sks-dog.png"), full_page=True)
    assert image_bytes(page, dog_src) != image_bytes(page, cat_src), "switching subjects must change the image"
    status = page.locator("#status").inner_text()
    assert "sks-dog ×1" in status and "adapter loads from disk: 2" in status and "base loads: 1" in status
    assert resident.stats()["active"] == [["sks-dog", 1.0]]

    pick(page, "#subject", "none (base model only)")
    base_src = generate_and_wait(page, dog_src)
    assert image_bytes(page, base_src) not in (image_bytes(page, dog_src), image_bytes(page, cat_src))
    assert resident.stats()["active"] == []
    assert (resident.base_loads, resident.adapter_disk_loads) == loads_at_start, "no file may be read on switching"
    assert resident.generations == 3


def test_bad_input_shows_a_message_in_the_page(page, running_app):
    pick(page, "#subject", "sks dog · sks-dog")
    page.locator("#prompt textarea").fill("")
    generations = running_app.resident.generations
    page.locator("#generate").click()
    toast = page.get_by_text("the prompt is empty")
    toast.wait_for()
    page.wait_for_timeout(800)  # let the toast finish fading in before the screenshot
    page.screenshot(path=str(ARTIFACTS / "app-error.png"))  # the message is a toast over the viewport
    assert "Traceback" not in page.content()
    assert running_app.resident.generations == generations
