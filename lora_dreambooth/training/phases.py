"""Where a run's time goes: named phases timed on the wall clock (device work finished at each boundary), one line
at the end; and a progress bar whose rate and ETA are the loop's real ones from the first steps on.

`PhaseClock` knows nothing about the recipe: the recipe names its phases. The summary line is meant for people and
for `scripts/bench_e2e.py`, which parses it: `phases: base load 2.1 s, class images 7.9 s, ..., total 58.3 s`.
"""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch

log = logging.getLogger(__name__)
SUMMARY_PREFIX = "phases: "


class PhaseClock:
    """Wall time per named phase (a phase entered twice adds up), measured from device-synchronised boundaries.

    With `announce`, each phase logs its name as it starts: a run's first phases (library imports, the base's load)
    print nothing of their own for seconds, which should not look like a hang."""

    def __init__(self, device: torch.device | str | None = None, *, announce: bool = False):
        self.device = torch.device(device) if device is not None else None
        self.announce = announce
        self.seconds: dict[str, float] = {}
        self.started = time.perf_counter()

    def _sync(self) -> None:
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the block as `name` (the device's queued work is waited for at both ends)."""
        if self.announce:
            log.info("%s ...", name)
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.add(name, time.perf_counter() - start)

    def run(self, name: str, *steps: Callable[[], Any]) -> Any:
        """Run `steps` one after the other as phase `name`; the last one's result."""
        result = None
        with self.phase(name):
            for step in steps:
                result = step()
        return result

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def summary(self) -> str:
        """`phases: a 1.0 s, b 2.5 s, total 3.9 s` (total = wall time since the clock started)."""
        parts = [f"{name} {seconds:.1f} s" for name, seconds in self.seconds.items()]
        parts.append(f"total {time.perf_counter() - self.started:.1f} s")
        return SUMMARY_PREFIX + ", ".join(parts)


    def log_summary(self, main_process: bool = True) -> None:
        """Log `summary()` (on the main process only)."""
        if main_process:
            log.info(self.summary())


def parse_summary(line: str) -> dict[str, float]:
    """The phases of a `summary()` line, e.g. {'base load': 2.1, ..., 'total': 58.3}."""
    text = line[line.index(SUMMARY_PREFIX) + len(SUMMARY_PREFIX):]
    phases = {}
    for part in text.split(", "):
        name, _, value = part.rstrip().removesuffix(" s").rpartition(" ")
        phases[name] = float(value)
    return phases


class StepPacer:
    """Keep the host at most `lag` steps ahead of the device, without stalling it.

    CUDA-graph replays are queued instantly, so a progress bar updated on the host would count steps the GPU has
    not run yet (and show a false rate until the queue fills). Waiting on an event recorded `lag` steps earlier
    keeps the count honest while the device always has the next steps queued. No-op off CUDA.
    """

    def __init__(self, device: torch.device, lag: int = 2):
        self.enabled = device.type == "cuda"
        self.lag = lag
        self.events: list[torch.cuda.Event] = []

    def step_done(self) -> None:
        if not self.enabled:
            return
        event = torch.cuda.Event()
        event.record()
        self.events.append(event)
        if len(self.events) > self.lag:
            self.events.pop(0).synchronize()


def restart_rate(bar) -> None:
    """Forget the steps so far in the bar's rate and ETA (graph warm-up and capture are not the loop's speed)."""
    if getattr(bar, "disable", True):
        return
    now = bar._time()
    bar.start_t = bar.last_print_t = now
    bar.initial = bar.last_print_n = bar.n
    for name in ("_ema_dn", "_ema_dt"):  # tqdm's smoothed rate: start it afresh too
        ema = getattr(bar, name, None)
        if ema is not None:
            setattr(bar, name, type(ema)(bar.smoothing))
    bar.refresh()


# The bar during warm-up: progress and elapsed time, no rate or ETA (tqdm's default format without them).
WARM_UP_BAR = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}, rate and ETA after the warm-up{postfix}]"


class LoopPhases:
    """The training loop's share of a :class:`PhaseClock`: the first `warm_steps` steps (CUDA-graph warm-up and
    capture, and compilation if any) as their own announced phase, then the loop; a paced, honest progress bar."""

    def __init__(self, clock: PhaseClock, device: torch.device, *, warm_steps: int, warm_name: str, bar,
                 start_step: int, on_steady: Callable[[int], None] | None = None):
        self.clock, self.bar, self.warm_name, self.on_steady = clock, bar, warm_name, on_steady
        self.pacer = StepPacer(device)
        self.warm_until = start_step + warm_steps if warm_steps else None
        self.start = time.perf_counter()
        if self.warm_until is not None:
            log.info("%s: the first %d step(s) run before the loop's speed is steady", warm_name, warm_steps)
            bar.bar_format = WARM_UP_BAR  # a rate or ETA from these steps would be false (e.g. 30 min for 1 min)
            bar.set_description("train (" + warm_name + ")")

    def step_done(self, done: int) -> None:
        """After optimizer step `done` (1-based) was queued: pace the host, advance the bar, and end the warm-up
        phase when it is over (the bar's rate then starts afresh)."""
        self.pacer.step_done()
        self.bar.update(1)
        if done == self.warm_until:
            self.clock._sync()
            now = time.perf_counter()
            self.clock.add(self.warm_name, now - self.start)
            log.debug("%s took %.1f s", self.warm_name, now - self.start)
            self.start = now
            self.bar.bar_format = None  # tqdm's own: steps, elapsed, ETA and rate, counted from here
            self.bar.set_description("train", refresh=False)  # drawn by restart_rate, never with the warm-up's rate
            restart_rate(self.bar)
            if self.on_steady is not None:
                self.on_steady(done)

    def finish(self) -> None:
        self.clock._sync()
        self.clock.add("loop", time.perf_counter() - self.start)


def loop_phases(clock: PhaseClock, bar, plan, *, graph_warmup: int, accumulation: int, steps: tuple[int, int],
                on_steady: Callable[[int], None] | None = None) -> LoopPhases:
    """The loop's phases for a run of `plan` (an ExecutionPlan) over steps [start, total): a CUDA graph is steady
    after its warm-up calls and the capturing call (counted in micro-steps), a compiled eager step after two steps;
    anything else from the first step on. `on_steady(step)` is called when the warm-up is over (e.g. to restart
    another ETA's rate)."""
    cuda_graph, compiled = plan.cuda_graph, plan.compile
    warm = -(-(graph_warmup + 1) // accumulation) if cuda_graph else (2 if compiled else 0)
    name = " + ".join(n for n, on in (("compile", compiled), ("graph warm-up + capture", cuda_graph)) if on)
    start, total = steps
    return LoopPhases(clock, clock.device or torch.device("cpu"), warm_steps=min(warm, total - start),
                      warm_name=name or "warm-up", bar=bar, start_step=start, on_steady=on_steady)
