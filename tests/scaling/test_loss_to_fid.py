"""FID against validation loss recovers the exponent (and the floor when there is one) and refuses to mix FID
settings."""

import numpy as np
import pytest
from fixtures_scaling import FID_EXPONENT, FID_REF, LOSS_REF
from test_powerlaw import assert_json_ready

from harness.scaling.loss_to_fid import fit_loss_to_fid, fit_loss_to_fid_table


@pytest.mark.parametrize("floor", [0.0, 5.0])
def test_loss_to_fid_recovers_the_exponent_and_says_which_form(floor):
    rng = np.random.default_rng(1)
    loss = np.repeat(np.geomspace(0.105, 0.16, 12), 3)
    fid = (floor + FID_REF * (loss / LOSS_REF) ** FID_EXPONENT) * np.exp(rng.normal(0, 0.03, len(loss)))
    fit = fit_loss_to_fid(loss, fid, np.repeat(np.arange(12), 3), n_resamples=300)
    assert fit.form == ("floor" if floor else "power"), fit.choice
    assert fit.choice.startswith(f"{fit.form} law")
    lo, hi = fit.law.exponent_ci
    assert lo <= FID_EXPONENT <= hi
    if floor:
        f_lo, f_hi = fit.law.f_inf_ci
        assert f_lo <= floor <= f_hi
    lo, hi = fit.predict_interval([0.11, 0.15])
    assert (lo <= fit.predict([0.11, 0.15])).all() and (fit.predict([0.11, 0.15]) <= hi).all()
    assert_json_ready(fit.to_dict())


def test_loss_to_fid_table_refuses_mixed_fid_settings(sweep):
    _, ev = sweep
    fit = fit_loss_to_fid_table(ev, n_resamples=50)
    assert fit.label == "FID-50K" and fit.n_cells == 12
    mixed = ev.copy()
    mixed.loc[mixed["model"] == "S", "num_samples"] = 5_000
    with pytest.raises(ValueError, match="refusing to mix"):
        fit_loss_to_fid_table(mixed, n_resamples=0)
    assert fit_loss_to_fid_table(mixed, n_resamples=0, allow_mixed=True).label.endswith("(mixed settings)")
    other_sampler = ev.assign(settings_hash=np.where(ev["model"] == "B", "89abcdef", "0123abcd"))
    with pytest.raises(ValueError, match="across evaluation settings"):
        fit_loss_to_fid_table(other_sampler, n_resamples=0)

