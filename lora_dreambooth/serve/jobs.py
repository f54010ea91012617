"""Training jobs started from the app: a queue, one worker process at a time, progress read from its files.

A job runs the real command line (``python -m lora_dreambooth train --config job.toml``) in its own process, so
a crash, a bad photo or an out-of-memory error ends that job only, never the server; this module never imports
the training code. Everything a job owns lives in ``<library>/.jobs/<id>/`` (hidden from the library): the
uploaded photos (names sanitised, size and count capped), the TOML config, the worker's log, the progress file,
the checkpoints. When a job finishes, its adapter moves into the library as ``<token>-<class>`` (a free name)
and the ``on_done`` callback makes the app pick it up.

Progress comes from the trainer's progress file (``progress_file``, one JSON object per line) when it writes one,
else from the progress bar and log lines in the worker's output; validation pictures from
``<output>/validation/step-*.png``. Cancel sends SIGTERM: the trainer checkpoints and exits 130, and Resume queues
the job again with ``--resume``.
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_dreambooth.config import TrainConfig
from lora_dreambooth.errors import UserInputError
from lora_dreambooth.files.atomic import write_text_atomic

log = logging.getLogger(__name__)

JOBS_DIR = ".jobs"
MIN_PHOTOS, MAX_PHOTOS = 3, 20
MAX_PHOTO_BYTES = 25 * 2**20
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
STATES = ("queued", "running", "done", "failed", "cancelled")
EXIT_INTERRUPTED = 130
_BAR = re.compile(r"(\d+)/(\d+) \[([\d:]+)<([\d:?]+)")
_LOSS = re.compile(r"loss=([-+\d.eE]+|nan|inf)")


@dataclass
class JobProgress:
    """What the worker has reported so far."""

    step: int = 0
    total_steps: int = 0
    loss: float | None = None
    eta_s: float | None = None
    phase: str = ""
    validation: Path | None = None


@dataclass
class TrainJob:
    """One training request and its state (``queued | running | done | failed | cancelled``)."""

    id: str
    token: str
    class_noun: str
    steps: int
    folder: Path
    photos: list[str]
    state: str = "queued"
    message: str = ""
    subject: str | None = None
    resume: bool = False
    progress: JobProgress = field(default_factory=JobProgress)
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    process: subprocess.Popen | None = field(default=None, repr=False)
    cancel_requested: bool = False

    @property
    def output_dir(self) -> Path:
        return self.folder / "adapter"

    @property
    def config_path(self) -> Path:
        return self.folder / "train.toml"

    @property
    def log_path(self) -> Path:
        return self.folder / "train.log"

    @property
    def progress_path(self) -> Path:
        return self.folder / "progress.jsonl"

    @property
    def title(self) -> str:
        return f"{self.token} {self.class_noun}"

    def as_dict(self, position: int | None = None) -> dict[str, Any]:
        """The job as the ``train_status`` API returns it."""
        p = self.progress
        return {"job": self.id, "state": self.state, "step": p.step, "total_steps": p.total_steps or self.steps,
                "loss": p.loss, "eta_s": p.eta_s, "phase": p.phase, "message": self.message,
                "subject": self.subject, "token": self.token, "class_noun": self.class_noun,
                "queue_position": position, "validation_image": str(p.validation) if p.validation else None,
                "resumable": self.state == "cancelled" and _has_checkpoint(self.output_dir)}


def _has_checkpoint(output_dir: Path) -> bool:
    """Whether the trainer left a finished checkpoint (``checkpoints/checkpoint-N``) that ``--resume`` reads."""
    folder = output_dir / "checkpoints"
    return folder.is_dir() and any(p.is_dir() and p.name.startswith("checkpoint-") for p in folder.iterdir())


# -- uploaded photos ------------------------------------------------------------------------------------------------
def safe_file_name(name: str, index: int) -> str:
    """A harmless file name for an upload: its stem's letters, digits, dashes and dots, prefixed by its index."""
    path = Path(str(name).replace("\\", "/").split("/")[-1])
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", path.stem).strip("._-")[:60] or "photo"
    suffix = path.suffix.lower() if re.fullmatch(r"\.[A-Za-z0-9]{1,5}", path.suffix) else ".jpg"
    return f"{index:02d}-{stem}{suffix}"


def copy_photos(uploads: Sequence[str | Path], target: Path) -> list[str]:
    """Copy 3-20 uploaded files (each at most 25 MB) into ``target`` under sanitised names; returns the names."""
    uploads = [Path(u) for u in uploads if u]
    if not MIN_PHOTOS <= len(uploads) <= MAX_PHOTOS:
        raise UserInputError(f"drop {MIN_PHOTOS} to {MAX_PHOTOS} photos of your subject (got {len(uploads)})")
    for upload in uploads:
        if not upload.is_file():
            raise UserInputError(f"upload '{upload.name}' is missing")
        if upload.stat().st_size > MAX_PHOTO_BYTES:
            raise UserInputError(f"photo '{upload.name}' is larger than {MAX_PHOTO_BYTES // 2**20} MB")
        if upload.suffix.lower() not in PHOTO_SUFFIXES:
            raise UserInputError(f"'{upload.name}' is not a photo ({', '.join(PHOTO_SUFFIXES)})")
    target.mkdir(parents=True, exist_ok=True)
    names = []
    for index, upload in enumerate(uploads):
        name = safe_file_name(upload.name, index)
        shutil.copyfile(upload, target / name)
        names.append(name)
    return names


# -- progress -------------------------------------------------------------------------------------------------------
def _seconds(text: str) -> float | None:
    if "?" in text:
        return None
    parts = [int(p) for p in text.split(":")]
    return float(sum(v * 60 ** i for i, v in enumerate(reversed(parts))))


def progress_from_log(text: str, into: JobProgress) -> JobProgress:
    """Step, total, ETA and loss from the last progress-bar update; the phase from the last log line."""
    pieces = [p.strip() for p in re.split(r"[\r\n]", text) if p.strip()]
    for piece in reversed(pieces):
        bar = _BAR.search(piece)
        if bar:
            into.step, into.total_steps = int(bar.group(1)), int(bar.group(2))
            into.eta_s = _seconds(bar.group(4))
            loss = _LOSS.search(piece)
            if loss:
                into.loss = float(loss.group(1))
            break
    lines = [p for p in pieces if not _BAR.search(p)]
    if lines:
        into.phase = lines[-1][:200]
    return into


def progress_from_file(path: Path, into: JobProgress) -> bool:
    """Progress from the trainer's progress file (``progress_file``: JSON lines, the last one may be half written);
    the latest loss and validation picture are kept when a later record has none. False when there is none yet."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return False
    found = False
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line being written
            continue
        found = True
        into.step, into.total_steps = int(record.get("step", 0)), int(record.get("total_steps", 0))
        into.eta_s = record.get("eta_s")
        if record.get("loss") is not None:
            into.loss = float(record["loss"])
        if record.get("validation_image"):
            into.validation = Path(record["validation_image"])
    return found


def latest_validation(output_dir: Path) -> Path | None:
    """The newest validation grid the trainer wrote (``validation/step-NNNNNN.png``)."""
    grids = sorted((output_dir / "validation").glob("step-*.png"))
    return grids[-1] if grids else None


def tail(path: Path, size: int = 20_000) -> str:
    """The last ``size`` bytes of a (growing) log file as text ("" when it is not there yet)."""
    try:
        with path.open("rb") as fh:
            fh.seek(max(0, fh.seek(0, os.SEEK_END) - size))
            return fh.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def read_progress(job: TrainJob) -> JobProgress:
    """Refresh ``job.progress`` from its progress file, else from its log; plus the latest validation grid."""
    progress = job.progress
    text = tail(job.log_path)
    if progress_from_file(job.progress_path, progress):
        progress.phase = progress_from_log(text, JobProgress()).phase
    else:
        progress_from_log(text, progress)
    progress.validation = latest_validation(job.output_dir) or progress.validation
    if progress.validation is not None and not progress.validation.is_file():
        progress.validation = None
    return progress


def failure_message(log_text: str, returncode: int) -> str:
    """The worker's one-line ``Error: ...`` (as the CLI prints it), else its last line and exit status."""
    lines = [line.strip() for line in re.split(r"[\r\n]", log_text) if line.strip()]
    errors = [line for line in lines if line.startswith("Error:")]
    if errors:
        return errors[-1]
    last = next((line for line in reversed(lines) if not _BAR.search(line)), "")
    return f"Error: training stopped (exit {returncode}){': ' + last[:300] if last else ''}"


# -- the queue -------------------------------------------------------------------------------------------------------
class JobQueue:
    """Training jobs of one app: queued in order, run one at a time in a worker process by a background thread."""

    def __init__(self, library_folder: str | Path, base: str, *, defaults: dict[str, Any] | None = None,
                 on_done: Callable[[TrainJob], None] | None = None, poll_s: float = 0.5):
        self.library = Path(library_folder)
        self.base = base
        self.defaults = dict(defaults or {})
        self.on_done = on_done
        self.poll_s = poll_s
        self.jobs: dict[str, TrainJob] = {}
        self._order: list[str] = []
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._closed = False
        self._ids = itertools.count(1)
        self._thread = threading.Thread(target=self._run_forever, name="train-jobs", daemon=True)
        self._thread.start()

    # -- requests -----------------------------------------------------------------------------------------------
    def submit(self, photos: Sequence[str | Path], token: str, class_noun: str, steps: int) -> TrainJob:
        """Validate the request, keep the photos, write the job's config and queue it; returns the job."""
        token, class_noun = (token or "").strip(), (class_noun or "").strip()
        steps = _whole_steps(steps)
        job_id = f"job-{time.strftime('%Y%m%d-%H%M%S')}-{next(self._ids)}"
        folder = self.library / JOBS_DIR / job_id
        config = self.job_config(folder, token, class_noun, steps)  # one-line errors before anything is written
        try:
            names = copy_photos(photos, folder / "photos")
        except UserInputError:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        write_text_atomic(folder / "train.toml", config.to_toml())
        job = TrainJob(id=job_id, token=token, class_noun=class_noun, steps=steps, folder=folder, photos=names)
        job.progress.total_steps = steps
        with self._lock:
            self.jobs[job_id] = job
            self._order.append(job_id)
        log.info("training job %s queued: %s, %d photos, %d steps", job_id, job.title, len(names), steps)
        self._wake.set()
        return job

    def job_config(self, folder: Path, token: str, class_noun: str, steps: int) -> TrainConfig:
        """The job's TrainConfig: the app's defaults (``--train-config``), then this request's fields."""
        data: dict[str, Any] = {"validation_prompts": ["a photo of {token} {class}"],
                                "validation_every": max(1, steps // 4), "log_every": max(1, min(10, steps // 6)),
                                **self.defaults}
        data.update(instance_dir=str(folder / "photos"), base=self.base, token=token, class_noun=class_noun,
                    output_dir=str(folder / "adapter"), steps=steps, overwrite=True,
                    progress_file=str(folder / "progress.jsonl"))
        if data.get("validation_every", 0) and not data.get("validation_prompts"):
            data["validation_every"] = 0
        return TrainConfig.from_dict(data, source="training request")

    def get(self, job_id: str) -> TrainJob:
        with self._lock:
            job = self.jobs.get(str(job_id or "").strip())
        if job is None:
            raise UserInputError(f"unknown job '{str(job_id)[:80]}'")
        return job

    def status(self, job_id: str) -> dict[str, Any]:
        """``train_status``: the job's state, progress and (once done) its subject."""
        job = self.get(job_id)
        if job.state == "running":
            read_progress(job)
        return job.as_dict(self.queue_position(job))

    def queue_position(self, job: TrainJob) -> int | None:
        """1 for the next job to start, ... (None unless queued)."""
        with self._lock:
            waiting = [j for j in self._order if self.jobs[j].state == "queued"]
        return waiting.index(job.id) + 1 if job.id in waiting else None

    def listing(self) -> list[TrainJob]:
        with self._lock:
            return [self.jobs[j] for j in self._order]

    def cancel(self, job_id: str) -> TrainJob:
        """A queued job is dropped; a running one gets SIGTERM (it checkpoints and stops)."""
        job = self.get(job_id)
        with self._lock:
            if job.state == "queued":
                job.state, job.message = "cancelled", "cancelled before it started"
                job.finished = time.time()
            elif job.state == "running":
                job.cancel_requested = True
                if job.process is not None and job.process.poll() is None:
                    job.process.send_signal(signal.SIGTERM)
            else:
                raise UserInputError(f"job {job.id} is already {job.state}")
        return job

    def resume(self, job_id: str) -> TrainJob:
        """Queue a cancelled job again; it continues from its last checkpoint."""
        job = self.get(job_id)
        with self._lock:
            if job.state != "cancelled":
                raise UserInputError(f"job {job.id} is {job.state}; only a cancelled job can be resumed")
            job.state, job.message, job.resume, job.cancel_requested = "queued", "", True, False
            self._order.remove(job.id)
            self._order.append(job.id)
        self._wake.set()
        return job

    def close(self) -> None:
        """Stop the runner; a running worker gets SIGTERM (and checkpoints)."""
        self._closed = True
        self._wake.set()
        for job in self.listing():
            if job.process is not None and job.process.poll() is None:
                job.process.send_signal(signal.SIGTERM)

    # -- the runner ---------------------------------------------------------------------------------------------
    def _next(self) -> TrainJob | None:
        with self._lock:
            for job_id in self._order:
                job = self.jobs[job_id]
                if job.state == "queued":
                    job.state, job.started = "running", time.time()
                    return job
        return None

    def _run_forever(self) -> None:
        while not self._closed:
            job = self._next()
            if job is None:
                self._wake.wait(1.0)
                self._wake.clear()
                continue
            try:
                self._run(job)
            except Exception as exc:  # the runner must outlive any job
                log.exception("training job %s failed", job.id)
                job.state, job.message = "failed", f"Error: {type(exc).__name__}: {exc}"
            job.finished = time.time()

    def _run(self, job: TrainJob) -> None:
        command = [sys.executable, "-m", "lora_dreambooth", "train", "--config", str(job.config_path)]
        if job.resume:
            command.append("--resume")
        env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"), "PYTHONUNBUFFERED": "1",
               "TQDM_MININTERVAL": "0.5"}
        with open(job.log_path, "a") as log_file:
            job.process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env,
                                           stdin=subprocess.DEVNULL, start_new_session=True)
            if job.cancel_requested:  # cancelled between start and here
                job.process.send_signal(signal.SIGTERM)
            while job.process.poll() is None:
                time.sleep(self.poll_s)
                read_progress(job)
        read_progress(job)
        self._finish(job, job.process.returncode)

    def _finish(self, job: TrainJob, returncode: int) -> None:
        text = tail(job.log_path)
        if returncode == 0:
            job.subject = self._publish(job)
            job.progress.step = job.progress.total_steps = job.steps
            if self.on_done is not None:  # the subject is in the app before the job reads "done"
                self.on_done(job)
            job.state, job.message = "done", f"added to the library as '{job.subject}'"
            log.info("training job %s done: subject '%s'", job.id, job.subject)
        elif job.cancel_requested and returncode in (EXIT_INTERRUPTED, -signal.SIGTERM):
            resumable = _has_checkpoint(job.output_dir)
            job.state = "cancelled"
            job.message = (f"cancelled at step {job.progress.step}; checkpoint kept, Resume continues from it"
                           if resumable else "cancelled before the first step")
        else:
            job.state, job.message = "failed", failure_message(text, returncode)
            log.warning("training job %s failed: %s", job.id, job.message)

    def _publish(self, job: TrainJob) -> str:
        """Move the finished adapter folder into the library under a free ``<token>-<class>`` name."""
        stem = re.sub(r"[^A-Za-z0-9_-]+", "-", f"{job.token}-{job.class_noun}").strip("-")[:80] or "subject"
        name = next(n for n in (stem if i == 0 else f"{stem}-{i + 1}" for i in itertools.count())
                    if not (self.library / n).exists() and not (self.library / f"{n}.safetensors").exists())
        source = job.output_dir
        kept = self.library / JOBS_DIR / job.id / "kept"
        kept.mkdir(exist_ok=True)
        for extra in [p for p in source.iterdir() if p.name in ("checkpoints", "logs", "validation")]:
            shutil.move(str(extra), kept / extra.name)  # the library folder gets the adapter, not the run's state
        last = latest_validation(kept)
        if last is not None:
            job.progress.validation = last
            shutil.copyfile(last, source / "preview.png")  # the app's subject preview
        os.replace(source, self.library / name)
        return name


def _whole_steps(steps: Any) -> int:
    try:
        value = float(steps)
    except (TypeError, ValueError):
        raise UserInputError(f"steps must be a number, got {str(steps)[:40]!r}") from None
    if not value.is_integer() or not 1 <= value <= 20_000:
        raise UserInputError(f"steps must be a whole number from 1 to 20000, got {steps}")
    return int(value)
