"""The laws fitted on the cheaper cells predict the largest cells, with prediction intervals that hold them."""

import pytest
from fixtures_scaling import RECORD_STEPS
from test_powerlaw import assert_json_ready

from harness.scaling.heldout import holdout_check


def test_holdout_check_predicts_the_largest_cells(sweep):
    val, ev = sweep
    hold = holdout_check(val, ev, n_holdout=2, n_resamples=100)
    assert_json_ready(hold)
    largest = sorted(val["gflops"].unique())[-2:]
    assert hold["held_out_sizes"] == largest
    assert hold["n_train_cells"] == 10
    rows = hold["joint"]["rows"]
    assert len(rows) == 2 * len(RECORD_STEPS) and {r["size"] for r in rows} == set(largest)
    for r in rows:
        assert r["rel_error"] == pytest.approx(r["predicted"] / r["measured"] - 1)
    # A prediction band holds one record's noise as well as the law's: most held-out records fall inside.
    assert hold["joint"]["fraction_inside"] >= 0.7
    assert hold["loss_to_fid"]["fraction_inside"] >= 0.7

