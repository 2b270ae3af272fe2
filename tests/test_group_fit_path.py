"""The group fit's path scores (benchmarks/group_path.py, a benchmark rule, not the default):
each equals a hand computation with torch.optim.Adam on a tiny float64 model."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.group_path import path_rule
from mirrorinf import ForwardInf


def _hand(model: nn.Module, x, y, xq, yq, target: str, lr: float = 0.01) -> dict:
    """Adam at lr * rms(theta) on the query mean loss until every query loss is below the
    target; each training row's loss at steps 1, 2, 4, ..., T, at 50 and at every step."""
    m = copy.deepcopy(model).double()
    params = list(m.parameters())
    rms = math.sqrt(
        sum(float(p.detach().pow(2).sum()) for p in params) / sum(p.numel() for p in params)
    )
    opt = torch.optim.Adam(params, lr=lr * max(rms, 1e-3))
    with torch.no_grad():
        base = F.cross_entropy(m(x), y, reduction="none")
    goal = math.log(2.0) if target == "half" else float(base.median())
    ts, at, at50, steps, t, every = [], [], None, -1, 0, []
    while True:
        with torch.no_grad():
            lq = F.cross_entropy(m(xq), yq, reduction="none")
            now = F.cross_entropy(m(x), y, reduction="none")
        every.append(now)
        if steps < 0:
            fitted = bool((lq <= goal).all())
            if t > 0 and (t & (t - 1) == 0 or fitted):
                ts.append(t), at.append(now)
            if fitted:
                steps = t
        if t == 50:
            at50 = now
        if steps >= 0 and t >= 50:
            break
        opt.zero_grad()
        F.cross_entropy(m(xq), yq).backward()
        opt.step()
        t += 1
    tt = torch.tensor([0.0, *ts], dtype=torch.float64)
    mean = torch.trapezoid(torch.stack([base, *at]), tt, dim=0) / tt[-1]
    lt = torch.log(tt[1:])
    logmean = torch.trapezoid(torch.stack(at), lt, dim=0) / lt[-1]
    return {"end": at[-1], "mean": mean, "logmean": logmean, "at50": at50, "base": base,
            "steps": steps, "every": every}  # fmt: skip


@pytest.mark.parametrize("target", ["half", "median"])
def test_path_scores_equal_a_hand_computation(target: str) -> None:
    torch.manual_seed(0)
    w = torch.randn(4, 3, dtype=torch.float64)  # labels from a linear rule: the queries fit
    x, xq = torch.randn(40, 4, dtype=torch.float64), torch.randn(12, 4, dtype=torch.float64)
    y, yq = (x @ w).argmax(1), (xq @ w).argmax(1)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    hand = _hand(model, x, y, xq, yq, target)
    assert 2 < hand["steps"] < 200, hand["steps"]  # a real path, checkpoints besides the end
    fi = ForwardInf(model, {"precision": "float64"})
    for score in ("end", "mean", "logmean"):
        with path_rule(score, target) as seen:
            group = fi.group((x, y), (xq, yq)).double()
        assert fi.last_report is not None and fi.last_report.loss_after_fit is not None
        torch.testing.assert_close(
            fi.last_report.loss_after_fit, hand[score], rtol=1e-9, atol=1e-12
        )
        assert seen.last[0].steps == hand["steps"]
        # the group column stays the default's: loss change after 50 steps
        torch.testing.assert_close(group, (hand["base"] - hand["at50"]).float().double())


def test_lr_and_cap() -> None:
    """At another lr the path is that lr's (steps and scores); ``capped`` is the loss at the
    cap when the fit runs past it, and the end when it stops first."""
    torch.manual_seed(0)
    w = torch.randn(4, 3, dtype=torch.float64)
    x, xq = torch.randn(40, 4, dtype=torch.float64), torch.randn(12, 4, dtype=torch.float64)
    y, yq = (x @ w).argmax(1), (xq @ w).argmax(1)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    hand = _hand(model, x, y, xq, yq, "median", lr=0.03)
    steps = hand["steps"]
    assert 4 < steps < 200, steps
    assert steps != _hand(model, x, y, xq, yq, "median")["steps"]  # the lr reached the fit
    fi = ForwardInf(model, {"precision": "float64"})
    for cap, want in ((steps // 2 + 1, hand["every"][steps // 2 + 1]), (steps + 5, hand["end"])):
        with path_rule("end", "median", lr=0.03, cap=cap) as seen:
            fi.group((x, y), (xq, yq))
        path = seen.last[0]
        assert path.steps == steps
        torch.testing.assert_close(path.end(), hand["end"], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(path.capped(), want, rtol=1e-9, atol=1e-12)
