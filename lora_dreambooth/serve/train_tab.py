"""The app's Train tab: drop photos, name the subject, Start; follow the queue and the run; the new subject appears
in the Generate tab's dropdown when the run ends.

Named API endpoints for scripts: ``train`` (``photos``, ``token``, ``class_noun``, ``steps``) returns a job id;
``train_status`` (``job``) returns the job's state (queued | running | done | failed | cancelled), ``step``,
``total_steps``, ``loss``, ``eta_s``, ``message`` and, once done, ``subject`` (the dropdown value to generate with);
``cancel_training`` and ``resume_training`` (``job``) stop a run at a resumable checkpoint and continue it.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from lora_dreambooth.errors import UserInputError
from lora_dreambooth.serve.jobs import MAX_PHOTOS, MIN_PHOTOS, JobQueue, TrainJob

log = logging.getLogger(__name__)

#: (label, steps) of the steps presets; any whole number also works through the API.
STEP_PRESETS: list[tuple[str, int]] = [("test run · 12 steps", 12), ("quick · 300 steps", 300),
                                       ("standard · 800 steps", 800), ("thorough · 1500 steps", 1500)]
DEFAULT_STEPS = 800
FALLBACK_TOKEN = "sks"


def suggested_token(app: Any) -> str:
    """A rare single-token word of the base's tokenizer that no library subject uses yet (else ``sks``)."""
    from lora_dreambooth.data.tokens import suggest_tokens

    used = {str(e.token).lower() for e in app.library if e.token}
    try:
        suggestions = [s.text for s in suggest_tokens(app.resident.pipe.tokenizer, 40)]
    except Exception:  # a tokenizer without a vocabulary table: offer the usual token
        log.debug("no token suggestions", exc_info=True)
        suggestions = []
    return next((t for t in suggestions + [FALLBACK_TOKEN, "zwx", "ohwx"] if t.lower() not in used), FALLBACK_TOKEN)


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


def job_line(job: TrainJob, position: int | None) -> str:
    """One line of the queue listing."""
    p = job.progress
    total = p.total_steps or job.steps
    if job.state == "running":
        what = f"running · step {p.step}/{total}" + (f" · loss {p.loss:.4f}" if p.loss is not None else "")
    elif job.state == "queued":
        what = f"queued · position {position}"
    elif job.state == "done":
        what = f"done · subject `{job.subject}`"
    else:
        what = f"{job.state} · {job.message}"
    return f"- `{job.id}` **{job.title}** ({len(job.photos)} photos, {job.steps} steps): {what}"


def progress_text(jobs: JobQueue, job_id: str | None) -> str:
    """The followed job's progress as Markdown (step / total, loss, ETA, phase or outcome)."""
    if not job_id:
        return "No training started from this page yet."
    try:
        status = jobs.status(job_id)
    except UserInputError as exc:
        return f"{exc}"
    state, step, total = status["state"], status["step"], status["total_steps"]
    head = f"**{status['token']} {status['class_noun']}** · `{status['job']}` · **{state}**"
    if state == "queued":
        return f"{head} · waiting, position {status['queue_position']} in the queue"
    if state == "running":
        loss = f"{status['loss']:.4f}" if status["loss"] is not None else "–"
        preparing = f"\n\npreparing: {status['phase']}" if step == 0 and status["phase"] else ""
        return f"{head} · step **{step} / {total}** · loss {loss} · ETA {_eta(status['eta_s'])}{preparing}"
    if state == "done":
        return f"{head} · {step} / {total} steps · subject **`{status['subject']}`** is in the Generate tab's list"
    return f"{head} · step {step} / {total} · {status['message']}"


def queue_text(jobs: JobQueue) -> str:
    listing = jobs.listing()
    if not listing:
        return "Queue: empty. One training runs at a time; others wait here."
    return "Queue (one training at a time):\n" + "\n".join(job_line(j, jobs.queue_position(j)) for j in listing)


def build_train_tab(gr: Any, app: Any, jobs: JobQueue, generate: dict[str, Any], readable: Callable) -> None:
    """The Train tab's widgets and events; ``generate``: the Generate tab's widgets (its dropdowns get updated)."""
    with gr.Row():
        with gr.Column(scale=1):
            photos = gr.File(file_count="multiple", file_types=["image"], type="filepath",
                             label=f"Photos of your subject ({MIN_PHOTOS}–{MAX_PHOTOS})", elem_id="train-photos")
            token = gr.Textbox(suggested_token(app), label="Token", elem_id="train-token",
                               info="A rare word that will name the subject (suggested from the base's tokenizer)")
            class_noun = gr.Textbox("", label="Class noun", placeholder="dog, person, backpack …",
                                    elem_id="train-class", info="What the subject is")
            steps = gr.Dropdown(STEP_PRESETS, value=DEFAULT_STEPS, label="Training steps", elem_id="train-steps",
                                allow_custom_value=True)
            with gr.Row():
                start = gr.Button("Start training", variant="primary", elem_id="train-start")
                cancel = gr.Button("Cancel", elem_id="train-cancel")
                resume = gr.Button("Resume", elem_id="train-resume")
        with gr.Column(scale=1):
            job = gr.Textbox("", label="Job", interactive=False, elem_id="train-job")
            progress = gr.Markdown(progress_text(jobs, None), elem_id="train-progress")
            validation = gr.Image(None, label="Latest validation picture", interactive=False, height=220,
                                  elem_id="train-validation")
            queue = gr.Markdown(queue_text(jobs), elem_id="train-queue")
    seen_version = gr.State(app.version)
    timer = gr.Timer(1.0)

    @readable
    def train(photos: list[str] | None, token: str, class_noun: str, steps: float) -> str:
        return jobs.submit(photos or [], token, class_noun, steps).id

    @readable
    def train_status(job: str) -> dict:
        return jobs.status(job)

    @readable
    def cancel_training(job: str) -> dict:
        return jobs.cancel(job).as_dict()

    @readable
    def resume_training(job: str) -> dict:
        return jobs.resume(job).as_dict()

    def on_tick(job_id: str, version: int):
        image = None
        if job_id:
            try:
                image = shown_large(jobs.status(job_id)["validation_image"])
            except (UserInputError, OSError, ValueError):  # no such job, or a picture being written: none this tick
                image = None
        subjects = subjects_update(gr, app, version)
        return (progress_text(jobs, job_id), image, queue_text(jobs), *subjects, app.version)

    start.click(train, [photos, token, class_noun, steps], [job], api_name="train")
    cancel.click(lambda j: (cancel_training(j), progress_text(jobs, j))[1], [job], [progress],
                 api_visibility="private")
    resume.click(lambda j: (resume_training(j), progress_text(jobs, j))[1], [job], [progress],
                 api_visibility="private")
    timer.tick(on_tick, [job, seen_version], [progress, validation, queue, generate["subject"],
                                              generate["mix_subject"], seen_version],
               api_visibility="private", queue=False)
    gr.api(train_status, api_name="train_status")
    gr.api(cancel_training, api_name="cancel_training")
    gr.api(resume_training, api_name="resume_training")


def shown_large(path: str | None, height: int = 200) -> Any:
    """A validation grid scaled up (pixels kept sharp) when it is smaller than ``height``, e.g. a 32 px base's."""
    if not path:
        return None
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB")
    factor = height // max(image.height, 1)
    return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST) if factor > 1 else image


def subjects_update(gr: Any, app: Any, version: int) -> tuple[Any, Any]:
    """New dropdown choices for both subject lists when the library changed since ``version``, else no change."""
    if version == app.version:
        return gr.update(), gr.update()
    choices = app.subject_choices()
    return gr.update(choices=choices), gr.update(choices=choices)
