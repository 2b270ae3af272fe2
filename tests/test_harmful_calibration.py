"""The harmful flag on a real model trained to convergence on clean labels: about alpha flagged.

Breast cancer (scikit-learn's bundled copy), a 128-unit ReLU MLP trained with full-batch Adam to
convergence on 350 clean rows, the default engine, 150 clean validation rows as the calibration
set: the recipe of ``benchmarks/gate_calibration.py`` (converged, 0% flips, seed 4).
"""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mirrorinf import ForwardInf
from mirrorinf.calibration import calibration_scores
from mirrorinf.summary import GateThresholds, conformal_threshold, summarise

SEED = 4  # gate_calibration.py: the old rule's worst clean cancer run (2.9% flagged)


def _clean_converged_case() -> tuple[np.ndarray, dict, dict]:
    """(group influence, the loss-rule arrays, the calibration arrays) of the clean model."""
    from sklearn.datasets import load_breast_cancer

    x, y = load_breast_cancer(return_X_y=True)
    perm = np.random.default_rng(SEED).permutation(len(y))
    tr, va = perm[:350], perm[350:500]
    mu, sd = x[tr].mean(0), x[tr].std(0) + 1e-6
    xs, yt = torch.tensor((x - mu) / sd, dtype=torch.float32), torch.tensor(y)
    torch.manual_seed(SEED)
    model = nn.Sequential(nn.Linear(x.shape[1], 128), nn.ReLU(), nn.Linear(128, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=400)
    for _ in range(400):
        opt.zero_grad()
        loss = F.cross_entropy(model(xs[tr]), yt[tr])
        (loss + 5e-4 * sum((p * p).sum() for p in model.parameters())).backward()
        opt.step()
        sched.step()
    model.eval()
    assert float((model(xs[tr]).argmax(1) == yt[tr]).float().mean()) == 1.0  # converged
    fi = ForwardInf(model)
    group = fi.group((xs[tr], yt[tr]), (xs[va], yt[va])).numpy()
    assert fi.last_report is not None and fi.last_report.loss_after_fit is not None
    after = fi.last_report.loss_after_fit.numpy()
    calib = calibration_scores(fi, (xs[va], yt[va]), seed=SEED)
    assert calib.loss_after_fit is not None and len(calib.loss_after_fit) == 150
    losses = {"loss_after_fit": after, "calib_loss_after_fit": calib.loss_after_fit}
    return group, losses, {"calib_group_inf": calib.group_influence}


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_clean_converged_model_flags_about_alpha_harmful(caplog: pytest.LogCaptureFixture) -> None:
    """With 150 calibration rows alpha_eff = 1/151; the loss-after-fit rule flags at most about
    twice that (5 of 350 rows); thresholding the group influence itself (the rule before) flags
    10 here: fitted training rows have base loss ~0, so their group influence is ~ -(loss after
    the fit), while held-out rows' large base losses cancel part of theirs."""
    torch.set_num_threads(1)
    group, losses, calib = _clean_converged_case()
    n = len(group)
    common = {"pairwise": np.zeros((n, 0)), "self_inf": np.ones(n), "query_self_drop": []}
    with caplog.at_level(logging.ERROR):
        new = summarise(**common, group_inf=group, **calib, **losses)
        old = summarise(**common, group_inf=group, **calib)
    alpha = GateThresholds().harmful_alpha
    _, alpha_eff, m = conformal_threshold(losses["calib_loss_after_fit"], alpha)
    assert m == 150 and alpha_eff == pytest.approx(1 / 151)
    assert new.counts["harmful_by_loss_after_fit"] == 1
    assert new.counts["harmful_fraction"] <= 5 / n, new.counts
    # the premise of this case: thresholding the group influence is not calibrated here
    assert old.counts["harmful_fraction"] > 5 / n, old.counts


@pytest.mark.parametrize("mode", ["plain", "anchored"])
def test_group_reports_each_rows_loss_after_the_fit(mode: str) -> None:
    """``last_report.loss_after_fit`` is each training row's loss under the fitted parameters:
    with the default fit, loss before - group influence (anchored: the plain twin's fit)."""
    torch.manual_seed(0)
    x, y = torch.randn(60, 5), torch.randint(0, 3, (60,))
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    fi = ForwardInf(model, {"mode": mode, "precision": "float64"})
    group = fi.group((x, y), (x[40:] + 0.1, y[40:])).double()
    assert fi.last_report is not None and fi.last_report.loss_after_fit is not None
    after = fi.last_report.loss_after_fit
    assert after.dtype == torch.float64 and after.shape == (60,)
    assert "loss_after_fit" not in fi.last_report.to_dict()
    with torch.no_grad():
        before = F.cross_entropy(copy.deepcopy(model).double()(x.double()), y, reduction="none")
    # anchored: the plain twin runs in float32 (precision auto)
    torch.testing.assert_close(before - after, group, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(after, before)  # the fit moved the losses
    calib = calibration_scores(fi, (x[40:], y[40:]), seed=0)
    assert calib.loss_after_fit is not None and calib.loss_after_fit.shape == (20,)
    assert np.isfinite(calib.loss_after_fit).all()
