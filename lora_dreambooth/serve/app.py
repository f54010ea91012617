"""The Gradio app: one resident base pipeline, a library of trained subjects in a dropdown, generate.

`lora-dreambooth serve --base MODEL --adapters DIR` runs :func:`serve`. Every adapter of the library is loaded
once at start (and on Refresh); picking another subject only switches adapters in memory. The app exposes the
named API endpoints ``generate``, ``refresh`` and ``status`` for ``gradio_client``. It binds 127.0.0.1 unless told
otherwise, makes no share link unless asked, keeps a bounded queue and turns every failure into a one-line
message in the page (details go to the server log), never a stack trace.
"""
from __future__ import annotations

import functools
import ipaddress
import logging
import os
import random
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from lora_dreambooth.errors import UserInputError
from lora_dreambooth.serve.generation import GenerationLimits, GenerationRequest
from lora_dreambooth.serve.library import BASE_ONLY, AdapterLibrary, check_subject_name
from lora_dreambooth.serve.pipeline import ResidentPipeline

if TYPE_CHECKING:
    from lora_dreambooth.serve.jobs import JobQueue

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
DEFAULT_MAX_QUEUE = 16
BASE_ONLY_LABEL = "none (base model only)"
MAX_SEED = 2**32 - 1
MAX_UPLOAD_BYTES = 25 * 2**20  # the Train tab's photos (jobs.MAX_PHOTO_BYTES)


def _quiet_gradio_env() -> None:
    """No telemetry or update checks: must be set before gradio is imported."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


class SubjectApp:
    """The app's behaviour, independent of widgets: choices, prompt offers, generate, refresh, status."""

    def __init__(self, resident: ResidentPipeline, library: AdapterLibrary):
        self.resident = resident
        self.library = library
        self.version = 0  # bumped by every refresh that changed the library: pages update their dropdowns
        self._refresh_lock = threading.Lock()

    # -- choices ----------------------------------------------------------------------------------------------
    def subject_choices(self) -> list[tuple[str, str]]:
        """(label, name) of every resident library subject, then "none"."""
        resident = set(self.resident.names)
        return [(e.label, e.name) for e in self.library if e.name in resident] + [(BASE_ONLY_LABEL, BASE_ONLY)]

    def default_subject(self) -> str:
        return self.subject_choices()[0][1]

    def offered_prompt(self, subject: str | None) -> str:
        """The subject's instance prompt (for "none": a plain prompt)."""
        if not subject or subject == BASE_ONLY or subject not in self.library:
            return "a photo"
        return self.library.get(subject).instance_prompt

    def known_prompts(self) -> set[str]:
        return {self.offered_prompt(name) for _, name in self.subject_choices()} | {""}

    def preview(self, subject: str | None) -> str | None:
        if subject and subject != BASE_ONLY and subject in self.library:
            preview = self.library.get(subject).preview
            return str(preview) if preview else None
        return None

    # -- actions ----------------------------------------------------------------------------------------------
    def request(self, subject: str | None, prompt: str, negative_prompt: str, strength: float, mix_subject: str | None,
                mix_strength: float, steps: float, guidance: float, seed: float, num_images: float, width: float,
                height: float) -> GenerationRequest:
        """A validated request from the form's values; unknown subjects and paths are refused by name."""
        adapters = []
        for name, weight in ((subject, strength), (mix_subject, mix_strength)):
            if name in (None, "", BASE_ONLY):
                continue
            check_subject_name(name)
            if name not in self.resident.names:
                raise UserInputError(f"unknown subject '{name}': pick one from the list (or press Refresh)")
            adapters.append((name, weight))
        return GenerationRequest(prompt=prompt, negative_prompt=negative_prompt or "", adapters=tuple(adapters),
                                 steps=steps, guidance=guidance, seed=seed, num_images=num_images,
                                 height=height or None, width=width or None).validated(self.resident.limits)

    def status_text(self, extra: str = "") -> str:
        stats = self.resident.stats()
        text = (f"{len(stats['resident'])} subjects resident · adapter loads from disk: "
                f"{stats['adapter_disk_loads']} · base loads: {stats['base_loads']} · "
                f"generations: {stats['generations']}")
        return f"{extra} — {text}" if extra else text

    def refresh(self) -> tuple[list[str], list[str]]:
        """Rescan the library and load what is new or replaced; returns (one-line changes, problems)."""
        with self._refresh_lock:  # the page's Refresh and a finished training job may both call it
            changes = self.library.refresh()
            report = self.resident.sync(self.library)
            if changes or report.loaded or report.reloaded or report.removed:
                self.version += 1
        lines = [f"{what}: {', '.join(names)}" for what, names in
                 (("added", report.loaded), ("reloaded", report.reloaded), ("removed", report.removed)) if names]
        problems = [f"{name}: {why}" for name, why in report.failed.items()]
        problems += [f"{name}: {why.split(' ', 2)[-1]}" for name, why in self.library.problems.items()
                     if name in changes.added or name not in self.resident.names]
        return lines, sorted(set(problems))


def _readable_errors(fn: Callable) -> Callable:
    """UI handlers: our errors become a one-line gr.Error; anything else is logged and summarised in one line."""
    import gradio as gr

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UserInputError as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        except gr.Error:
            raise
        except Exception as exc:  # keep the trace in the server log, not in the page
            log.exception("request failed")
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            raise gr.Error(f"request failed: {type(exc).__name__}: {first}", print_exception=False) from None

    return wrapper


def build_app(resident: ResidentPipeline, library: AdapterLibrary, *, title: str = "lora-dreambooth",
              jobs: JobQueue | None = None):
    """The Gradio Blocks app over a resident pipeline and its library (not launched); with ``jobs``, a Train tab."""
    _quiet_gradio_env()
    import gradio as gr

    app = SubjectApp(resident, library)
    with gr.Blocks(title=title, analytics_enabled=False, delete_cache=(3600, 3600)) as demo:
        gr.Markdown(f"## {title}\nPick a trained subject, write a prompt with its token, generate"
                    f"{' — or teach the base a new subject in the Train tab' if jobs is not None else ''}. "
                    f"Base model: `{resident.base}`")
        with gr.Tabs(elem_id="tabs"):
            with gr.Tab("Generate", id="generate", elem_id="generate-tab"):
                widgets = _generate_tab(gr, app)
            if jobs is not None:
                from lora_dreambooth.serve.train_tab import build_train_tab

                jobs.on_done = lambda job: app.refresh()  # the new subject joins the library and the dropdowns
                with gr.Tab("Train", id="train", elem_id="train-tab"):
                    build_train_tab(gr, app, jobs, widgets, _readable_errors)

        def on_load():
            choices = app.subject_choices()  # new subjects since launch show up in new pages too
            return gr.update(choices=choices), gr.update(choices=choices), app.status_text()

        def status_api() -> dict:
            return resident.stats()

        demo.load(on_load, None, [widgets["subject"], widgets["mix_subject"], widgets["status"]],
                  api_visibility="private", queue=False)
        gr.api(status_api, api_name="status")
    return demo


def _generate_tab(gr: Any, app: SubjectApp) -> dict[str, Any]:
    """The Generate tab's widgets (wired by :func:`_wire_generate`); returns them by name."""
    limits: GenerationLimits = app.resident.limits
    native = app.resident.native_size()
    w: dict[str, Any] = {}
    with gr.Row():
        with gr.Column(scale=1):
            w["subject"] = gr.Dropdown(app.subject_choices(), value=app.default_subject(), label="Subject",
                                       allow_custom_value=True, elem_id="subject", info="token + class · library name")
            w["strength"] = gr.Slider(0, limits.max_weight, 1.0, step=0.05, label="Subject strength",
                                      elem_id="strength")
            w["prompt"] = gr.Textbox(app.offered_prompt(app.default_subject()), label="Prompt", lines=2,
                                     elem_id="prompt")
            w["negative"] = gr.Textbox("", label="Negative prompt", elem_id="negative")
            with gr.Row():
                w["run"] = gr.Button("Generate", variant="primary", elem_id="generate")
                w["refresh"] = gr.Button("Refresh library", elem_id="refresh")
            with gr.Accordion("Mix in a second subject", open=False):
                w["mix_subject"] = gr.Dropdown(app.subject_choices(), value=BASE_ONLY, label="Second subject",
                                               allow_custom_value=True, elem_id="mix-subject")
                w["mix_strength"] = gr.Slider(0, limits.max_weight, 0.5, step=0.05, label="Second subject strength")
            with gr.Accordion("Settings", open=True):
                w["steps"] = gr.Slider(1, min(limits.max_steps, 100), 25, step=1, label="Steps", elem_id="steps")
                w["guidance"] = gr.Slider(0, 20, 7.5, step=0.5, label="Guidance scale", elem_id="guidance")
                with gr.Row():
                    w["seed"] = gr.Number(0, label="Seed", precision=0, minimum=0, maximum=MAX_SEED, elem_id="seed")
                    w["randomize"] = gr.Checkbox(False, label="Random seed", elem_id="randomize")
                w["num_images"] = gr.Slider(1, limits.max_images, 1, step=1, label="Images", elem_id="num-images")
                with gr.Row():
                    low, high = min(64, native), max(1024, native)
                    w["width"] = gr.Slider(low, high, native, step=8, label="Width", elem_id="width")
                    w["height"] = gr.Slider(low, high, native, step=8, label="Height", elem_id="height")
        with gr.Column(scale=1):
            w["gallery"] = gr.Gallery(label="Images", format="png", columns=2, object_fit="contain",
                                      elem_id="gallery", height=420)
            w["seed_used"] = gr.Number(label="Seed used", precision=0, interactive=False, elem_id="seed-used")
            w["status"] = gr.Markdown(app.status_text(), label="Status", elem_id="status")
            first_preview = app.preview(app.default_subject())
            w["preview"] = gr.Image(first_preview, label="Subject preview (from training)", interactive=False,
                                    height=200, visible=first_preview is not None, elem_id="preview")
    _wire_generate(gr, app, w)
    return w


def _wire_generate(gr: Any, app: SubjectApp, w: dict[str, Any]) -> None:
    """The Generate tab's events: generate (API ``generate``), subject change, refresh (API ``refresh``)."""

    @_readable_errors
    def generate(subject: str, prompt: str, negative_prompt: str, strength: float, mix_subject: str,
                 mix_strength: float, steps: float, guidance: float, seed: float, randomize_seed: bool,
                 num_images: float, width: float, height: float):
        if randomize_seed:
            seed = random.randint(0, MAX_SEED)
        request = app.request(subject, prompt, negative_prompt, strength, mix_subject, mix_strength, steps,
                              guidance, seed, num_images, width, height)
        result = app.resident.generate(request)
        images = [(image, f"seed {s}") for image, s in zip(result.images, result.seeds)]
        mix = " + ".join(f"{n} ×{w:g}" for n, w in request.adapters) or "base model"
        return images, request.seed, app.status_text(f"{mix}: {result.seconds:.2f} s")

    def on_subject_change(new_subject: str, current_prompt: str):
        offered = app.offered_prompt(new_subject)
        keep = (current_prompt or "").strip() not in app.known_prompts()
        image = app.preview(new_subject)
        return gr.update() if keep else offered, gr.update(value=image, visible=image is not None)

    @_readable_errors
    def on_refresh():
        lines, problems = app.refresh()
        for problem in problems:
            gr.Warning(f"skipped {problem}")
        choices = app.subject_choices()
        return (gr.update(choices=choices), gr.update(choices=choices),
                app.status_text("; ".join(lines) or "library unchanged"))

    inputs = [w[k] for k in ("subject", "prompt", "negative", "strength", "mix_subject", "mix_strength", "steps",
                             "guidance", "seed", "randomize", "num_images", "width", "height")]
    w["run"].click(generate, inputs, [w["gallery"], w["seed_used"], w["status"]], api_name="generate")
    w["subject"].change(on_subject_change, [w["subject"], w["prompt"]], [w["prompt"], w["preview"]],
                        api_visibility="private", queue=False)
    w["refresh"].click(on_refresh, None, [w["subject"], w["mix_subject"], w["status"]], api_name="refresh")


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class RunningApp:
    """A launched app: the Blocks, its URL, and the resident pipeline and library behind it."""

    demo: Any
    url: str
    resident: ResidentPipeline
    library: AdapterLibrary
    jobs: JobQueue | None = None

    def close(self) -> None:
        if self.jobs is not None:
            self.jobs.close()
        self.demo.close()


def serve(base: str, adapters_dir: str | Path, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
          share: bool = False, device: str | None = None, dtype: str | None = None, fuse: bool = False,
          max_queue: int = DEFAULT_MAX_QUEUE, block: bool = True, allow_pickle: bool = False, train: bool = True,
          train_defaults: dict[str, Any] | None = None) -> RunningApp:
    """Load the base once, load the library's adapters, launch the app (with a Train tab unless ``train`` is off;
    ``train_defaults``: TrainConfig values for its jobs, e.g. from ``--train-config``).

    With ``block=False`` it returns the :class:`RunningApp` right after launch (the server runs in a background
    thread; call ``close()``); otherwise it serves until interrupted.
    """
    _quiet_gradio_env()
    if share:
        log.warning("--share: a public gradio.live link will let anyone on the internet use this machine's GPU/CPU")
    if not is_loopback(host):
        log.warning("binding %s: anyone who can reach this machine on port %d can use the app (no login)", host, port)
    if not 1 <= max_queue <= 10_000:
        raise UserInputError(f"--max-queue must be between 1 and 10000 (got {max_queue})")
    library = AdapterLibrary(adapters_dir)
    resident = ResidentPipeline.from_base(base, device=device, dtype=dtype, fuse=fuse, allow_pickle=allow_pickle)
    report = resident.sync(library)
    if not report.loaded:
        log.warning("no usable adapters in '%s' yet: train some into sub-folders there, then press Refresh",
                    library.folder)
    jobs = None
    if train:
        from lora_dreambooth.serve.jobs import JobQueue

        jobs = JobQueue(library.folder, base, defaults={"resolution": resident.native_size(), **(train_defaults or {})})
    demo = build_app(resident, library, jobs=jobs)
    demo.queue(max_size=max_queue, default_concurrency_limit=1)
    try:
        _, local_url, share_url = demo.launch(
            server_name=host, server_port=port, share=share, prevent_thread_lock=True, quiet=True, show_error=False,
            ssr_mode=False, enable_monitoring=False, pwa=False, mcp_server=False, footer_links=["api"],
            max_file_size=MAX_UPLOAD_BYTES,
        )
    except OSError as exc:
        if jobs is not None:
            jobs.close()
        raise UserInputError(f"cannot listen on {host}:{port} ({exc}); pick another --port") from None
    url = share_url or local_url
    log.info("serving %d subjects (%s) on %s", len(resident.names), ", ".join(resident.names) or "none", local_url)
    if share_url:
        log.info("public link: %s", share_url)
    running = RunningApp(demo=demo, url=url, resident=resident, library=library, jobs=jobs)
    if block:
        try:
            demo.block_thread()
        finally:
            running.close()
    return running
