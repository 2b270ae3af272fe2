"""Plain group influence: one update on the whole query set, scored over the training set.

Default (no steps, no lr given): really fit the set: _GROUP_FIT_STEPS Adam steps of lr
_GROUP_FIT_LR * rms(theta) on the set's mean loss. Adam's step is in parameter units, so this is
scale-aware and insensitive to the set's curvature (which a few misfit points can make 50x the
training set's). Mislabel AUROC on a digits MLP: 0.998 vs 0.90 for one first-order step.

How the constants are set: Adam moves each coordinate by about lr per step, so steps * lr /
rms(theta) is how far the fit may move a typical weight, in units of its own size. What matters
is that path, not its split into steps and lr: over steps {25, 50, 100} x lr {0.003, 0.01, 0.03}
(``python benchmarks/cleanlab.py --grid``: breast cancer, a synthetic 4-class set, 3x16x16
shape images with a CNN, token sequences; 10% flips, 3 seeds) the harmful-mislabel AUROC rises
with the path (synthetic 0.77 at 0.075, 0.86 at 0.5, 0.90 at 1.5; shapes 0.86 / 0.92 / 0.93)
and levels off from about 1.5 on; cancer and tokens are flat from 0.15 on. The default path is
0.5 (50 steps of 0.01, set on digits) and stays so: a path of 1.5 (50 of 0.03) ranks better on
two of four sets and the same on digits (0.998 / 0.980 / 0.967 vs 0.998 / 0.982 / 0.962, three
seeds), but in ``benchmarks/gate_calibration.py`` it made one of 18 clean runs fail the gate
(wine, 110 rows, early-stopped: 7% of clean rows flagged harmful against 1% at 0.5), presumably
because a longer fit moves the training rows' group influence away from the held-out
calibration scores that the harmful threshold comes from. Not derived, then: measured, with
this trade-off.
With steps or lr given: the configured plain update.
"""

from __future__ import annotations

import math

import torch

from mirrorinf.engine.examples import Examples, Inputs
from mirrorinf.engine.execution import Params
from mirrorinf.engine.runtime import ModelState, Runtime
from mirrorinf.engine.scores import Scores, plain_scores, rescale
from mirrorinf.engine.updates import direction, mean_grad, stack_norm, step_lr

_GROUP_FIT_LR = 0.01  # x rms(theta) per Adam step; path steps * lr = 0.5 (module doc)
_GROUP_FIT_STEPS = 50


def group_fit(rt: Runtime, state: ModelState, tr: Examples, xq: Inputs, yq: torch.Tensor) -> Scores:
    """Scores [n_train, 1] after one update on the mean loss of the whole query set."""
    base = rt.base_losses(state, tr)
    fit = rt.config.steps is None and rt.config.lr is None
    if fit:
        rms = state.norm / math.sqrt(max(1, state.numel))
        lr, steps = _GROUP_FIT_LR * max(rms, 1e-3), _GROUP_FIT_STEPS
        params, _ = group_update(rt, state, xq, yq, lr, steps, optimizer="adam")
    else:
        steps = rt.steps
        params, lr = group_update(rt, state, xq, yq, None, steps, rt.config.optimizer)
    col = (base - rt.losses_over(state, params, tr)).unsqueeze(1)
    q_base = rt.query_losses(state, state.params, xq, yq)
    drop = (q_base - rt.query_losses(state, params, xq, yq)).mean().reshape(1)
    lrs = torch.tensor([lr])  # default dtype, as the report always had it
    if not fit:
        return plain_scores(rt.config, col, drop, lrs, "generic")
    col, scaled_drop = rescale(rt.config, col, drop, None)  # a real fit: raw loss drops
    return Scores(col, scaled_drop, "loss", "generic", lrs, steps)


def group_update(
    rt: Runtime,
    state: ModelState,
    xq: Inputs,
    yq: torch.Tensor,
    lr: float | None,
    steps: int,
    optimizer: str,
) -> tuple[Params, float]:
    """One parameter set after ``steps`` updates on the mean loss of the whole query set."""
    p = {k: v.clone() for k, v in state.params.items()}
    adam: dict[tuple[str, str], torch.Tensor] = {}
    q = Examples("queries", x=xq, y=yq, n=len(yq))
    for t in range(steps):
        g = mean_grad(rt, state, p, q)
        d = direction(g, adam, t, optimizer)
        if lr is None:
            lr = float(step_lr(rt, state, stack_norm({k: v.unsqueeze(0) for k, v in d.items()}))[0])
        p = {k: v - rt.sign * lr * d[k] for k, v in p.items()}
    assert lr is not None
    return p, lr
