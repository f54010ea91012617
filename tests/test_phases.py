"""Phase timing and the progress bar: the summary line parses back, warm-up is its own phase, the bar's rate
restarts after it."""
from __future__ import annotations

import io
import logging
import time

from tqdm.auto import tqdm

from lora_dreambooth.training.lowmem import ExecutionPlan
from lora_dreambooth.training.phases import PhaseClock, loop_phases, parse_summary
from lora_dreambooth.training.progress import ProgressLog


def test_summary_line_parses_back_and_phases_add_up():
    clock = PhaseClock("cpu")
    with clock.phase("class images"):
        time.sleep(0.02)
    assert clock.run("text + latent caching", lambda: 1, lambda: 2) == 2
    clock.add("class images", 1.0)
    phases = parse_summary("some prefix " + clock.summary())
    assert list(phases) == ["class images", "text + latent caching", "total"]
    assert 1.0 <= phases["class images"] < 1.5 and phases["total"] >= 0.0


def test_an_announcing_clock_names_each_phase_as_it_starts(caplog):
    quiet, announcing = PhaseClock("cpu"), PhaseClock("cpu", announce=True)
    with caplog.at_level(logging.INFO, logger="lora_dreambooth.training.phases"):
        quiet.run("base load", lambda: caplog.records.copy())
        assert not caplog.records
        seen_inside = announcing.run("base load", lambda: [r.getMessage() for r in caplog.records])
    assert seen_inside == ["base load ..."]  # logged before the phase's work, not after it


def test_graph_warm_up_is_its_own_phase_and_the_bar_rate_restarts_after_it(capsys):
    clock = PhaseClock("cpu")
    plan = ExecutionPlan("fast", cuda_graph=True)
    screen = io.StringIO()
    bar = tqdm(total=20, file=screen, disable=False, mininterval=0, ascii=True, unit="step")
    phases = loop_phases(clock, bar, plan, graph_warmup=3, accumulation=1, steps=(0, 20))
    assert "warm-up" in bar.desc
    for done in range(1, 21):
        time.sleep(0.3 if done <= 4 else 0.001)  # slow warm-up and capture, then fast steps
        before = bar._time()
        phases.step_done(done)
        assert bar.n == done
        shown = screen.getvalue().split("\r")[-1]
        if done < 4:  # no rate or ETA from the warm-up steps (they would say minutes per step)
            assert f"{done}/20" in shown and "rate and ETA after the warm-up" in shown
            assert "s/step" not in shown and "step/s" not in shown and "<" not in shown
        if done == 4:  # the rate and ETA now count from here: the steady steps only
            assert bar.desc.startswith("train") and "warm-up" not in bar.desc
            last_draws = [line for line in screen.getvalue().split("\r") if line.strip()][-2:]
            assert "rate and ETA after the warm-up" in last_draws[0]  # straight from the warm-up bar ...
            assert "<?" in last_draws[1]  # ... to a fresh rate, never one from the warm-up steps
            assert bar.initial == 4 and bar.start_t >= before
        if done == 20:
            assert "20/20" in shown and "step/s" in shown and "warm-up" not in shown
    phases.finish()
    bar.close()
    assert clock.seconds["graph warm-up + capture"] >= 1.2 and "loop" in clock.seconds
    assert loop_phases(PhaseClock("cpu"), bar, ExecutionPlan("plain"), graph_warmup=3, accumulation=1,
                       steps=(0, 5)).warm_until is None


def test_the_app_eta_counts_from_the_steady_steps_too(tmp_path):
    """The progress file the app reads: after the warm-up its ETA uses the steady steps' rate, not the mean since
    the start (which counts the slow warm-up and capture steps, e.g. a compile, against every remaining step)."""
    progress = ProgressLog(tmp_path / "progress.jsonl", total_steps=104)
    bar = tqdm(total=104, disable=True)
    phases = loop_phases(PhaseClock("cpu"), bar, ExecutionPlan("fast", cuda_graph=True), graph_warmup=3,
                         accumulation=1, steps=(0, 104), on_steady=progress.restart_rate)
    started = time.perf_counter()
    for done in range(1, 9):
        time.sleep(0.5 if done <= 4 else 0.001)  # 2 s of warm-up, then fast steps
        phases.step_done(done)
    from_start = (time.perf_counter() - started) / 8 * 96  # what the mean since the start would say: >= 24 s
    assert progress.rate_from[0] == 4
    assert progress.eta(8) < from_start / 2


def test_the_logged_rate_of_the_first_window_skips_the_warm_up():
    """The bar's `its=` (steps per second over a logging window): a window that began before the warm-up ended
    counts only the steps after it, so the first value is the steady rate, not one dragged down by the capture."""
    progress = ProgressLog(None, total_steps=100)
    window_start = time.perf_counter()
    time.sleep(1.0)  # 4 slow warm-up steps
    progress.restart_rate(4)
    time.sleep(0.06)  # 6 fast steps
    rate = progress.window_rate(0, window_start, 10)
    assert rate > 6 / 0.5  # the 6 steady steps in about 0.06 s; counting the warm-up would give below 10/1.06
    later = time.perf_counter()
    time.sleep(0.05)
    assert progress.window_rate(10, later, 20) > 10 / 0.5  # a window after the warm-up: all its steps count
