"""Anchored mode (one Lanczos basis of the training Hessian, filtered directions, forward-pass
measurement) against references computed another way: an exact Hessian, exact leave-one-out."""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from benchmarks._common import digits_split, exact_loo, train_logreg
from mirrorinf import ForwardInf, ForwardInfConfig
from mirrorinf.engine import as_examples, cross_entropy
from mirrorinf.metrics import loo_correlation, spearman

WD = 1e-3


@lru_cache(maxsize=1)
def _tiny_mlp() -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A trained 10-32-4 tanh MLP (484 parameters: more than the basis cap of 300) on
    synthetic data, float64, with its training set and 6 queries."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(126, 10, generator=gen, dtype=torch.float64)
    w = torch.randn(10, 4, generator=gen, dtype=torch.float64)
    y = (x @ w + 0.5 * torch.randn(126, 4, generator=gen, dtype=torch.float64)).argmax(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 4)).double()
    opt = torch.optim.Adam(model.parameters(), lr=0.01, weight_decay=WD)
    for _ in range(300):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[:120]), y[:120]).backward()
        opt.step()
    return model.eval(), x[:120], y[:120], x[120:], y[120:]


def _flat_setup(model: nn.Module) -> tuple[list[str], list[torch.Size], torch.Tensor]:
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    return names, shapes, torch.cat([p.detach().flatten() for p in model.parameters()])


def _damped_inverse_influence(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, xq: torch.Tensor, yq: torch.Tensor
) -> torch.Tensor:
    """g_i^T (|H| + delta)^-1 g_q with the exact Hessian of the mean loss + WD/2 ||theta||^2 and
    the documented damping rule (0 if H is positive definite, else 4 tr(H) / P)."""
    names, shapes, flat = _flat_setup(model)

    def unflat(v: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = torch.split(v, [math.prod(s) for s in shapes])
        return {n: t.reshape(s) for n, t, s in zip(names, parts, shapes, strict=True)}

    def loss(v: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        return cross_entropy(functional_call(model, unflat(v), (xs,)), ys).mean()

    hess = torch.func.hessian(lambda v: loss(v, x, y))(flat) + WD * torch.eye(len(flat))
    ev, vec = torch.linalg.eigh(hess)
    convex = float(ev[0]) > math.sqrt(torch.finfo(torch.float64).eps) * float(ev[-1])
    delta = 0.0 if convex else 4.0 * float(ev.sum()) / len(ev)
    inv = (vec / (ev.abs() + delta)) @ vec.T

    def per_example(xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        return vmap(grad(lambda v, a, b: loss(v, a[None], b[None])), in_dims=(None, 0, 0))(
            flat, xs, ys
        )

    return per_example(x, y) @ inv @ per_example(xq, yq).T


def test_anchored_matches_damped_inverse_hessian_influence_on_an_mlp() -> None:
    """With more parameters than the basis holds, the Lanczos filter still ranks training rows
    as the exact damped inverse Hessian does; plain mode (no curvature) ranks them worse."""
    model, x, y, xq, yq = _tiny_mlp()
    ref = _damped_inverse_influence(model, x, y, xq, yq).numpy()
    fi = ForwardInf(model, ForwardInfConfig(mode="anchored", weight_decay=WD))
    got = fi.pairwise((x, y), (xq, yq)).double().numpy()
    rep = fi.last_report
    assert rep is not None and rep.path == "anchored" and rep.scale == "per_unit_query_weight"
    assert rep.steps < 484  # the basis did not span the space
    rho = float(np.mean(spearman(got, ref)))
    plain = ForwardInf(model).pairwise((x, y), (xq, yq)).double().numpy()
    rho_plain = float(np.mean(spearman(plain, ref)))
    assert rho > 0.9, (rho, rho_plain)
    assert rho > rho_plain + 0.05, (rho, rho_plain)


def test_anchored_reports_ritz_extremes_basis_size_and_stability() -> None:
    model, x, y, xq, yq = _tiny_mlp()
    fi = ForwardInf(model, ForwardInfConfig(mode="anchored", weight_decay=WD))
    fi.pairwise((x, y), (xq, yq))
    rep = fi.last_report
    assert rep is not None and rep.lambda_max is not None and rep.lambda_min is not None
    hess_max = _exact_max_eig(model, x, y) + WD
    assert rep.lambda_max == pytest.approx(hess_max, rel=1e-6)  # extreme Ritz values converge
    assert rep.stability is not None and 0.8 < rep.stability <= 1.0
    assert 0 < rep.steps <= 300


def _exact_max_eig(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    names, shapes, flat = _flat_setup(model)

    def loss(v: torch.Tensor) -> torch.Tensor:
        parts = torch.split(v, [math.prod(s) for s in shapes])
        p = {n: t.reshape(s) for n, t, s in zip(names, parts, shapes, strict=True)}
        return cross_entropy(functional_call(model, p, (x,)), y).mean()

    return float(torch.linalg.eigvalsh(torch.func.hessian(loss)(flat)).max())


def test_anchored_tracks_exact_loo_on_logistic_regression() -> None:
    """Convex case (damping 0: the L2 term damps): exact leave-one-out by retraining. Held out
    from the benchmark (other seed and sizes)."""
    wd = 1e-2
    s = digits_split(200, 8, seed=11)
    model = train_logreg(s.x_train, s.y_train, wd)
    loo, _ = exact_loo(model, s.x_train, s.y_train, s.x_query, s.y_query, wd)
    fi = ForwardInf(model, ForwardInfConfig(mode="anchored", weight_decay=wd))
    scores = fi.pairwise((s.x_train, s.y_train), (s.x_query, s.y_query))
    corr = loo_correlation(scores.double(), loo)
    assert corr["spearman"] >= 0.95, corr


def test_anchored_is_deterministic_and_seeded() -> None:
    model, x, y, xq, yq = _tiny_mlp()
    cfg = ForwardInfConfig(mode="anchored", weight_decay=WD, seed=3)
    a = ForwardInf(model, cfg).pairwise((x, y), (xq, yq))
    b = ForwardInf(model, cfg).pairwise((x, y), (xq, yq))
    assert torch.equal(a, b)
    c = ForwardInf(model, cfg.replace(seed=4)).pairwise((x, y), (xq, yq))
    assert not torch.equal(a, c)  # the seed reaches the Lanczos start
    assert float(np.mean(spearman(a.double().numpy(), c.double().numpy()))) > 0.9


def test_anchored_scores_do_not_depend_on_the_other_queries() -> None:
    """The basis is a property of the model and the training set: scoring queries together or
    one by one gives the same columns (batching cannot change a query's scores)."""
    model, x, y, xq, yq = _tiny_mlp()
    fi = ForwardInf(model, ForwardInfConfig(mode="anchored", weight_decay=WD))
    together = fi.pairwise((x, y), (xq, yq))
    alone = ForwardInf(model, ForwardInfConfig(mode="anchored", weight_decay=WD)).pairwise(
        (x, y), (xq[2:3], yq[2:3])
    )
    torch.testing.assert_close(alone[:, 0], together[:, 2], rtol=1e-6, atol=0)


def test_curvature_set_gives_shard_scores_equal_to_whole_set_scores() -> None:
    """A shard scored with the whole training set as its curvature set gets the whole run's
    scores for its rows (pairwise and group); without it, its own curvature differs."""
    model, x, y, xq, yq = _tiny_mlp()
    cfg = ForwardInfConfig(mode="anchored", weight_decay=WD)
    whole = ForwardInf(model, cfg).pairwise((x, y), (xq, yq))
    whole_g = ForwardInf(model, cfg).group((x, y), (xq, yq))
    for a, b in ((0, 50), (50, 120)):
        fi = ForwardInf(model, cfg)
        part = fi.pairwise((x[a:b], y[a:b]), (xq, yq), curvature=(x, y))
        torch.testing.assert_close(part, whole[a:b], rtol=1e-9, atol=1e-12)
        part_g = fi.group((x[a:b], y[a:b]), (xq, yq), curvature=(x, y))
        torch.testing.assert_close(part_g, whole_g[a:b], rtol=1e-9, atol=1e-12)
    own = ForwardInf(model, cfg).pairwise((x[:50], y[:50]), (xq, yq))
    assert not torch.allclose(own, whole[:50], rtol=1e-3)


def test_anchored_rejects_lr_and_documents_damping() -> None:
    with pytest.raises(ValueError, match=r"lr=0\.5 has no meaning in anchored mode"):
        ForwardInfConfig(mode="anchored", lr=0.5)
    with pytest.raises(ValueError, match="damping must be a number >= 0"):
        ForwardInfConfig(mode="anchored", damping=-1.0)
    assert ForwardInfConfig(mode="anchored", damping=0.1, steps=20).damping == 0.1


def test_anchored_curvature_does_not_depend_on_row_order() -> None:
    """Beyond 2048 rows the curvature rows are chosen by content, so a permuted training set
    gives the same basis (Ritz values, size, damping)."""
    torch.manual_seed(3)
    x = torch.randn(2600, 6)
    y = (x @ torch.randn(6, 3)).argmax(1)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    perm = torch.randperm(2600, generator=torch.Generator().manual_seed(1))
    cfg = ForwardInfConfig(mode="anchored", weight_decay=1e-2)
    a, b = ForwardInf(model, cfg), ForwardInf(model, cfg)
    from mirrorinf.engine.anchored import krylov_basis

    with a._rt.scoring() as ta, b._rt.scoring() as tb:
        ka = krylov_basis(a._rt, ta, as_examples((x, y), "train"))
        kb = krylov_basis(b._rt, tb, as_examples((x[perm], y[perm]), "train"))
    assert ka.k == kb.k and ka.delta == pytest.approx(kb.delta, rel=1e-9)
    torch.testing.assert_close(ka.ritz()[0], kb.ritz()[0], rtol=1e-8, atol=1e-12)
