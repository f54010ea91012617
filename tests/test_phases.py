"""Phase timing and the progress bar: the summary line parses back, warm-up is its own phase, the bar's rate
restarts after it."""
from __future__ import annotations

import time

from tqdm.auto import tqdm

from lora_dreambooth.training.lowmem import ExecutionPlan
from lora_dreambooth.training.phases import PhaseClock, loop_phases, parse_summary


def test_summary_line_parses_back_and_phases_add_up():
    clock = PhaseClock("cpu")
    with clock.phase("class images"):
        time.sleep(0.02)
    assert clock.run("text + latent caching", lambda: 1, lambda: 2) == 2
    clock.add("class images", 1.0)
    phases = parse_summary("some prefix " + clock.summary())
    assert list(phases) == ["class images", "text + latent caching", "total"]
    assert 1.0 <= phases["class images"] < 1.5 and phases["total"] >= 0.0


def test_graph_warm_up_is_its_own_phase_and_the_bar_rate_restarts_after_it(capsys):
    clock = PhaseClock("cpu")
    plan = ExecutionPlan("fast", cuda_graph=True)
    bar = tqdm(total=20, file=None, disable=False, mininterval=0)
    phases = loop_phases(clock, bar, plan, graph_warmup=3, accumulation=1, steps=(0, 20))
    assert "warm-up" in bar.desc
    for done in range(1, 21):
        time.sleep(0.3 if done <= 4 else 0.001)  # slow warm-up and capture, then fast steps
        before = bar._time()
        phases.step_done(done)
        assert bar.n == done
        if done == 4:  # the rate and ETA now count from here: the steady steps only
            assert bar.desc.startswith("train") and "warm-up" not in bar.desc
            assert bar.initial == 4 and bar.start_t >= before
    phases.finish()
    bar.close()
    assert clock.seconds["graph warm-up + capture"] >= 1.2 and "loop" in clock.seconds
    assert loop_phases(PhaseClock("cpu"), bar, ExecutionPlan("plain"), graph_warmup=3, accumulation=1,
                       steps=(0, 5)).warm_until is None
