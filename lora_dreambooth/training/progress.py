"""Machine-readable training progress: one JSON object per line in ``progress_file`` (the app's jobs read it).

Each record: ``{"step", "total_steps", "loss", "lr", "eta_s", "elapsed_s", "event"}`` plus ``validation_image``
after a validation grid. Lines are appended and flushed whole, so a reader never sees half a record except the
last line while it is written (readers skip a line that does not parse). Only the main process writes.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


class ProgressLog:
    """Appends progress records to a file; a no-op when no file is configured (or on other ranks)."""

    def __init__(self, path: str | Path | None, total_steps: int, start_step: int = 0, *, enabled: bool = True):
        self.path = Path(path) if path and enabled else None
        self.total_steps = total_steps
        self.started = time.perf_counter()
        self.rate_from = (start_step, self.started)  # (step, time) the ETA's rate counts from
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.write(start_step, event="start")

    def eta(self, step: int) -> float | None:
        """Seconds left at the mean rate since this run (or resume) started, or since `restart_rate`."""
        first_step, since = self.rate_from
        done = step - first_step
        if done <= 0:
            return None
        return (time.perf_counter() - since) / done * (self.total_steps - step)

    def restart_rate(self, step: int) -> None:
        """Count the ETA's rate from `step` on (after the CUDA-graph warm-up and capture, whose steps are slow)."""
        self.rate_from = (step, time.perf_counter())

    def window_rate(self, first_step: int, since: float, step: int) -> float:
        """Steps per second of a logging window that began after step `first_step` at time `since` and ends now at
        `step`, counting only the steps after the warm-up (`restart_rate`) when the window began before it ends."""
        first_step, since = max((first_step, since), self.rate_from)
        return (step - first_step) / max(time.perf_counter() - since, 1e-9)

    def write(self, step: int, *, event: str = "step", loss: float | None = None, lr: float | None = None,
              **extra: Any) -> None:
        """Append one record (``event``: start, step, validation, interrupted, done)."""
        if self.path is None:
            return
        record = {"event": event, "step": step, "total_steps": self.total_steps, "loss": loss, "lr": lr,
                  "eta_s": self.eta(step), "elapsed_s": round(time.perf_counter() - self.started, 3), **extra}
        with self.path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")

    def validation(self, step: int, image: str | Path) -> None:
        self.write(step, event="validation", validation_image=str(image))
