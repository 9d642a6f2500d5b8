"""Each decay style against a table computed by hand (max 1e-3, min 1e-4, 10 warm-up
steps, decay over 100 steps; WSD anneals over the last 30)."""

import pytest

from paratron.training.lr_schedule import LRSchedule

STEPS = [0, 5, 10, 20, 35, 50, 65, 80, 100, 120]

TABLES = {
    "constant": [0.0, 5e-4, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3],
    "linear": [0.0, 5e-4, 1e-3, 9e-4, 7.5e-4, 6e-4, 4.5e-4, 3e-4, 1e-4, 1e-4],
    "cosine": [0.0, 5e-4, 1e-3, 9.728616794e-4, 8.392544244e-4, 6.2814168e-4,
               3.960909355e-4, 2.052800006e-4, 1e-4, 1e-4],
    "inverse-square-root": [0.0, 5e-4, 1e-3, 7.071067812e-4, 5.345224838e-4,
                            4.472135955e-4, 3.922322703e-4, 3.535533906e-4,
                            3.16227766e-4, 1e-4],
    "WSD": [0.0, 5e-4, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3, 7e-4, 1e-4, 1e-4],
}


@pytest.mark.parametrize("style", list(TABLES))
def test_decay_style_matches_hand_table(style):
    schedule = LRSchedule(max_lr=1e-3, min_lr=1e-4, warmup_steps=10, decay_steps=100,
                          decay_style=style, wsd_decay_steps=30, wsd_decay_style="linear")
    got = [schedule.lr_at(s) for s in STEPS]
    assert got == pytest.approx(TABLES[style], rel=1e-9, abs=1e-15)


def test_wsd_exponential_anneal():
    schedule = LRSchedule(1e-3, 1e-4, 10, 100, "WSD", wsd_decay_steps=30,
                          wsd_decay_style="exponential")
    # 2 * 0.5 ** (1/3) - 1 = 0.587401052 of the range above min at step 80.
    assert schedule.lr_at(80) == pytest.approx(1e-4 + 0.587401052 * 9e-4, rel=1e-8)
    assert schedule.lr_at(100) == pytest.approx(1e-4)


def test_warmup_starts_from_warmup_init():
    schedule = LRSchedule(1e-3, 0.0, 4, 10, "linear", init_lr=2e-4)
    assert schedule.lr_at(0) == pytest.approx(2e-4)
    assert schedule.lr_at(2) == pytest.approx(6e-4)
