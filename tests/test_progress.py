"""Training progress off a terminal (as under DVC, CI or `dvc queue`): a plain line at a steady interval between
the evaluations' lines, with a clock the test drives, so no test waits or measures time."""

import pytest

from nanogpt import progress
from nanogpt.progress import TrainProgress, plain_line


class Clock:
    """A clock that moves only when told."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def every_10_s(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress, "LINE_EVERY_S", 10.0)


def lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return capsys.readouterr().out.splitlines()


def test_a_line_every_interval_with_step_loss_speed_and_eta(capsys, every_10_s):
    clock = Clock()
    bar = TrainProgress(total_steps=100, start_step=0, tokens_per_step=1000, clock=clock)

    for step in range(1, 13):
        clock.now += 2.5  # four steps per interval
        bar.step(step, loss=lambda: 2.5)

    assert lines(capsys) == [
        "step 4/100 (4%): loss 2.5000  400 tok/s  ETA 0:04:00",
        "step 8/100 (8%): loss 2.5000  400 tok/s  ETA 0:03:50",
        "step 12/100 (12%): loss 2.5000  400 tok/s  ETA 0:03:40",
    ]


def test_the_line_gives_speed_and_eta_from_the_steps_since_the_last_one():
    line = plain_line(340, 1500, 2.13449, 8192, since=(300, 50.0), now=60.0)

    # 40 steps in 10 s: 32,768 tokens/s; 1160 steps to go at 0.25 s: 4 min 50 s
    assert line == "step 340/1500 (22%): loss 2.1345  32,768 tok/s  ETA 0:04:50"


def test_without_a_loss_the_line_leaves_it_out():
    assert plain_line(10, 20, None, 100, since=(0, 0.0), now=10.0) == "step 10/20 (50%): 100 tok/s  ETA 0:00:10"


def test_an_evaluation_restarts_the_interval(capsys, every_10_s):
    clock = Clock()
    bar = TrainProgress(total_steps=100, start_step=0, tokens_per_step=10, clock=clock)
    clock.now += 9
    bar.step(1)
    bar.report(1, "val 2.0")
    bar.start(1)  # the evaluation ended: the next interval starts now
    clock.now += 9
    bar.step(2)
    clock.now += 1
    bar.step(3)

    # steps 2 and 3 in 10 s: 2 tokens/s, 97 steps to go at 5 s each
    assert lines(capsys) == ["step 1: val 2.0", "step 3/100 (3%): 2 tok/s  ETA 0:08:05"]


def test_a_resumed_run_measures_from_where_it_resumed(capsys, every_10_s):
    clock = Clock()
    bar = TrainProgress(total_steps=1000, start_step=0, tokens_per_step=1, clock=clock)
    bar.start(900)
    clock.now += 10
    bar.step(910)

    assert lines(capsys) == ["step 910/1000 (91%): 1 tok/s  ETA 0:01:30"]


def test_nothing_is_printed_when_progress_is_off(capsys, every_10_s):
    clock = Clock()
    bar = TrainProgress(total_steps=10, start_step=0, enabled=False, tokens_per_step=1, clock=clock)
    clock.now += 100
    bar.step(5, loss=lambda: 1.0)
    bar.report(5, "val 1.0")

    assert lines(capsys) == []


def test_the_steps_that_compile_say_so_and_are_left_out_of_the_speed_and_eta(capsys, every_10_s):
    """A compiled run's first steps include the compilation: a line during them says so, not `1 tok/s ETA 3:53:44`,
    and the next line's speed and ETA count only the steps after them."""
    clock = Clock()
    bar = TrainProgress(total_steps=100, start_step=0, tokens_per_step=1000, clock=clock)
    bar.launch(0, compile_steps=2)
    clock.now += 60  # step 1 compiles
    bar.step(1, loss=lambda: 4.0)
    clock.now += 5  # step 2 records a CUDA graph
    bar.step(2)
    for step in range(3, 7):
        clock.now += 2.5
        bar.step(step)

    # steps 3 to 6 in 10 s: 400 tokens/s, 94 steps to go at 2.5 s each
    assert lines(capsys) == [
        "step 1/100 (1%): loss 4.0000  compiling, 60 s so far",
        "step 6/100 (6%): 400 tok/s  ETA 0:03:55",
    ]


def test_a_resumed_launch_compiles_again(capsys, every_10_s):
    clock = Clock()
    bar = TrainProgress(total_steps=1000, start_step=0, tokens_per_step=1, clock=clock)
    bar.launch(900, compile_steps=1)
    clock.now += 30
    bar.step(901)
    clock.now += 10
    bar.step(911)

    assert lines(capsys) == ["step 901/1000 (90%): compiling, 30 s so far", "step 911/1000 (91%): 1 tok/s  ETA 0:01:29"]
