"""StreamBatch's per stream-frame stages over the first c steps, against sums by hand."""

import pytest

from stc.latency import batch_stages


def test_batch_stages_over_the_first_steps():
    # two runs of 4 steps of B = 2 streams: one init prompt prefill, then one entry per step
    runs = [{"vision": [1.0, 2.0, 3.0, 4.0], "projector": [0.5] * 4, "prefill": [100.0, 10.0, 20.0, 30.0, 40.0],
             "window": [0.0, 0.0, 1.0, 2.0]},
            {"vision": [2.0, 2.0, 2.0, 2.0], "projector": [0.1] * 4, "prefill": [100.0, 12.0, 12.0, 12.0, 12.0]},
            {"vision": [9.0, 9.0, 9.0, 9.0], "projector": [0.9] * 4, "prefill": [100.0, 50.0, 50.0, 50.0, 50.0],
             "window": [5.0, 5.0, 5.0, 5.0]}]
    two = batch_stages(runs, 2, batch=2)  # per stream-frame: the step sums over 2 steps x 2 streams, median of 3 runs
    assert two["vit_ms_per_frame"] == pytest.approx(4.0 / 4)  # runs: 3/4, 4/4, 18/4
    assert two["prefill_ms_per_frame"] == pytest.approx(30.0 / 4)  # 30/4, 24/4, 110/4: no init prompt, no slide yet
    assert two["window_ms_per_frame"] == 0.0
    four = batch_stages(runs, 4, batch=2)
    assert four["prefill_ms_per_frame"] == pytest.approx(103.0 / 8)  # 100 + 3 of slides, 48, 220
    assert four["window_ms_per_frame"] == pytest.approx(3.0 / 8)  # 3, 0 (none recorded), 20
    assert four["projector_ms_per_frame"] == pytest.approx(2.0 / 8)
