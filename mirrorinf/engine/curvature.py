"""Curvature of the training objective: one Lanczos basis of its Hessian, built once per model
and training set, and the spectral filter anchored mode applies to every query's gradient.

The objective is J(theta) = mean_i loss_i(theta) + wd/2 ||theta - theta0||^2 over the curvature
rows (every training row up to _CURVATURE_ROWS, else a content-chosen subsample). Its Hessian H
is touched only through Hessian-vector products by double backward (the graph is built once).

Defaults, and where each comes from:

* damping delta. Convex case (every Ritz value above sqrt(machine eps) * lambda_max, e.g. an
  L2-regularised logistic regression): delta = 0, the L2 term already damps and leave-one-out
  needs the exact inverse. Otherwise delta = _DAMPING_MULT * tr(H) / P, with tr(H) / P the
  mean eigenvalue (Hutchinson, _PROBES Gaussian probes). Scaling by the mean eigenvalue makes
  delta follow the model's curvature scale (it moves with the loss scale, the width, the
  weight decay) instead of a constant. The multiplier is empirical: on digits MLPs (small,
  wide) and a digits CNN (held-out LDS), 4 beat 8 and 16; off digits
  (benchmarks/anchored_defaults.py: breast cancer, wine, iris, synthetic MLPs) no value wins
  everywhere (breast cancer and iris prefer 16, wine 4, synthetic is flat), and the mean LDS
  over the four is 0.595 / 0.610 / 0.605 for 4 / 8 / 16, each above plain mode on every set.
  Over 3 seeds of each (12 cases, ``--seeds 3 --mults 1,2,4,8,16,32 --rules``) the best
  multiplier moves between seeds of one set (iris 16 / 2 / 2) and 4 and 8 are a plateau: mean
  LDS 0.547 / 0.588 / 0.611 / 0.614 / 0.600 / 0.569 at 1 / 2 / 4 / 8 / 16 / 32, mean regret
  against each case's best 0.019 at 4 (max 0.073). Two rules deriving delta without a
  multiplier were measured and are not better: the Rayleigh quotient of the trained model's
  remaining training gradient (the curvature of the directions training had not finished;
  0.610, underdamps the synthetic set) and the delta at which the spectrum's effective
  dimension is n/2 (0.598). So the multiplier is not derived; within a factor 2 of 4 it
  moves the mean LDS by at most 0.023.
* filter. f(theta) = 1 / (|theta| + delta) on the Ritz values (the saddle-free inverse:
  negative curvature is treated by its magnitude, continuous at 0 so rounding cannot flip a
  near-zero eigenvalue between two answers; the prototype measured it equal to clipping
  negative curvature to 0, LDS 0.731 vs 0.731), and c = 1 / (max(rho, 0) + delta) for the part
  of a gradient outside the basis, where rho is the Rayleigh quotient of the complement.
* basis size k (the stopping rule). Lanczos from a seeded random start, full
  reorthogonalisation, grown in chunks of _CHUNK vectors. After each chunk, rho is measured on
  _PROBES gradient-like probes (seeded mixtures of normalised per-example training gradients:
  what queries look like; measured from the Lanczos relation, no extra products). It stops
  when the complement's curvature no longer matters next to the damping, rho <= delta / 4
  (then 1 / (rho + delta) is within 20% of the 1/delta every complement direction gets), or in
  the convex case when rho <= 1.25 * theta_min (the complement is as flat as the flattest
  direction found, so 1 / rho is its inverse to within 25%). Off digits, stopping at
  rho <= delta / 8 or delta / 2 instead moved LDS by at most 0.005 at the default multiplier
  (0.03 at 8 or 16; anchored_defaults.py). Cap: min(P, _MAX_BASIS, STACK_BUDGET / P): the
  basis holds k * P float64 numbers, at most STACK_BUDGET (512 MB), and _MAX_BASIS = 300 is
  where LDS stopped improving in the prototype (small MLP: 0.72 / 0.78 / 0.79 at k = 100 /
  200 / 300). Off digits the cap does not decide: at the default multiplier the stopping rule
  ends the basis first in all 12 cases of ``anchored_defaults.py --seeds 3`` (k = 25-275); it
  binds only at multipliers 1 and 2, where the damping is too small anyway (LDS 0.547 / 0.588).

Cost: (k + 2 * _PROBES) Hessian-vector products on the curvature rows, plus O(k^2 P); memory:
the basis (k P float64) and the double-backward graph of the curvature rows, held while the
basis grows.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from mirrorinf.engine.examples import Examples, Inputs, parts, read_batches, rows
from mirrorinf.engine.execution import STACK_BUDGET, Params

_CURVATURE_ROWS = 2048  # rows of the Hessian estimate (a subsample of larger training sets)
_PROBES = 8  # Hutchinson probes of tr(H), and gradient-like probes of the complement
PROBE_ROWS = 64  # training rows whose normalised gradients the complement probes mix
_CHUNK = 25  # Lanczos vectors between two checks of the stopping rule
_MAX_BASIS = 300
_DAMPING_MULT = 4.0  # delta = 4 tr(H)/P on indefinite Hessians (empirical; see the module doc)
_STOP = 0.25  # stop when rho <= delta / 4

Apply = Callable[[torch.Tensor], torch.Tensor]


class Flat:
    """Flattening of a parameter dict into one float64 vector [P] (stacked: [k, P]) and back."""

    def __init__(self, params: Params) -> None:
        self.names = list(params)
        self.shapes = [params[n].shape for n in self.names]
        self.sizes = [params[n].numel() for n in self.names]
        self.dtypes = [params[n].dtype for n in self.names]
        self.size = sum(self.sizes)

    def flat(self, d: Params, stacked: bool = False) -> torch.Tensor:
        if stacked:
            return torch.cat([d[n].flatten(1).double() for n in self.names], dim=1)
        return torch.cat([d[n].reshape(-1).double() for n in self.names])

    def unflat(self, v: torch.Tensor, stacked: bool = False) -> Params:
        parts = torch.split(v, self.sizes, dim=-1)
        lead = (v.shape[0],) if stacked else ()
        return {
            n: p.reshape(*lead, *sh).to(dt)
            for n, p, sh, dt in zip(self.names, parts, self.shapes, self.dtypes, strict=True)
        }


def hvp_operator(
    objective: Callable[[Params], torch.Tensor], params: Params, wd: float
) -> Callable[[torch.Tensor], torch.Tensor]:
    """v [P] -> (Hessian of objective + wd I) v, by double backward on a graph built once."""
    fl = Flat(params)
    leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    loss = objective(leaves)
    grads = torch.autograd.grad(loss, list(leaves.values()), create_graph=True, allow_unused=True)
    live = [
        (i, g) for i, g in enumerate(grads) if g is not None and g.requires_grad
    ]  # a gradient constant in theta has no curvature
    inputs = [leaves[fl.names[i]] for i, _ in live]

    def apply(v: torch.Tensor) -> torch.Tensor:
        pieces = fl.unflat(v)
        out = wd * v
        if not live:
            return out
        hv = torch.autograd.grad(
            [g for _, g in live],
            inputs,
            grad_outputs=[pieces[fl.names[i]] for i, _ in live],
            retain_graph=True,
            allow_unused=True,
        )
        full = {n: torch.zeros_like(params[n]) for n in fl.names}
        for (i, _), h in zip(live, hv, strict=True):
            if h is not None:
                full[fl.names[i]] = h.detach()
        return out + fl.flat(full)

    return apply


def basis_cap(numel: int) -> int:
    """Largest basis: min(P, _MAX_BASIS, STACK_BUDGET / P) vectors (see the module doc)."""
    return max(1, min(numel, _MAX_BASIS, STACK_BUDGET // max(1, numel)))


@dataclass
class KrylovBasis:
    """A Lanczos basis Q [k, P] of the training Hessian (T = Q H Q^T tridiagonal: alpha on the
    diagonal, beta off it), the damping, and the probes that measure the complement."""

    q: torch.Tensor  # [k + 1, P]: the basis and the next Lanczos vector
    alpha: list[float]
    beta: list[float]  # beta[j] couples q_j and q_{j+1}; beta[k - 1] the residual
    probes: torch.Tensor  # [_PROBES, P] gradient-like vectors
    h_probes: torch.Tensor  # H applied to them
    mean_eig: float  # tr(H) / P
    delta: float
    k: int
    dim: int
    hvps: int

    def ritz(self, m: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Eigenvalues and eigenvectors of T_m (the Ritz values of the first m vectors)."""
        m = self.k if m is None else m
        t = torch.diag(torch.tensor(self.alpha[:m], dtype=torch.float64))
        if m > 1:
            off = torch.tensor(self.beta[: m - 1], dtype=torch.float64)
            t += torch.diag(off, 1) + torch.diag(off, -1)
        ev, vec = torch.linalg.eigh(t)
        return ev, vec

    def rho(self, m: int | None = None) -> float:
        """Rayleigh quotient of the probes' part outside the first m vectors (0 if none),
        from r^T H r = r^T H z - beta_m (r . q_{m+1}) (Q z)_m, r = z - Q^T Q z."""
        m = self.k if m is None else m
        qm = self.q[:m]
        c = self.probes @ qm.T
        r = self.probes - c @ qm
        rr = float((r * r).sum())
        if rr <= 1e-24 * float((self.probes * self.probes).sum()):
            return 0.0
        rhr = (r * self.h_probes).sum(1) - self.beta[m - 1] * (r @ self.q[m]) * c[:, m - 1]
        return float(rhr.sum()) / rr

    def directions(self, g: torch.Tensor, m: int | None = None) -> torch.Tensor:
        """u = Q^T f(T) Q g + c (g - Q^T Q g) for each row of g [c, P], with the first m vectors."""
        m = self.k if m is None else m
        ev, vec = self.ritz(m)
        ev, vec = ev.to(g.device), vec.to(g.device)
        qm = self.q[:m]
        a = g @ qm.T  # [c, m]
        f = 1.0 / (ev.abs() + self.delta)
        coef = ((a @ vec) * f) @ vec.T
        rest = max(self.rho(m), 0.0) + self.delta
        out = coef @ qm
        if m < self.dim and rest > 0:
            out = out + (g - a @ qm) / rest
        return out

    @property
    def full(self) -> bool:
        """The basis spans the whole parameter space (the filter is then exact)."""
        return self.k >= self.dim


def lanczos_basis(
    apply: Apply,
    dim: int,
    grads: torch.Tensor,
    *,
    seed: int,
    cap: int,
    fixed: int | None = None,
    damping: float | None = None,
) -> KrylovBasis:
    """Grow a Lanczos basis of ``apply`` (dimension ``dim``) until the stopping rule (module
    doc) holds, ``cap`` vectors, or exactly ``fixed`` vectors when given. ``grads`` [r, P]:
    per-example training gradients the complement probes are mixed from. Raises ValueError
    when the objective has no positive curvature and no damping is given."""
    device = grads.device
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device)

    z = randn(_PROBES, dim)
    hz = torch.stack([apply(v) for v in z])
    mean_eig = float((z * hz).sum() / (z * z).sum())
    norms = grads.norm(dim=1, keepdim=True)
    unit = torch.where(norms > 0, grads / norms.clamp_min(1e-300), torch.zeros_like(grads))
    probes = randn(_PROBES, len(grads)) @ unit
    h_probes = torch.stack([apply(v) for v in probes])
    limit = min(dim, cap if fixed is None else fixed)
    q = torch.zeros(limit + 1, dim, dtype=torch.float64, device=device)
    start = randn(dim)
    q[0] = start / start.norm()
    alpha: list[float] = []
    beta: list[float] = []
    basis = KrylovBasis(q, alpha, beta, probes, h_probes, mean_eig, 0.0, 0, dim, 2 * _PROBES)
    scale = 0.0
    for j in range(limit):
        w = apply(q[j])
        a = float(w @ q[j])
        alpha.append(a)
        w = w - a * q[j] - (beta[-1] * q[j - 1] if j else 0.0)
        for _ in range(2):  # full reorthogonalisation (twice is enough)
            w = w - q[: j + 1].T @ (q[: j + 1] @ w)
        b = float(w.norm())
        scale = max(scale, abs(a), b)
        m = j + 1
        if m >= dim:
            beta.append(0.0)
        elif b > 1e-10 * scale:
            beta.append(b)
            q[m] = w / b
        else:  # an invariant subspace: restart orthogonally (T gets a zero coupling)
            beta.append(0.0)
            v = randn(dim)
            for _ in range(2):
                v = v - q[:m].T @ (q[:m] @ v)
            q[m] = v / v.norm()
        basis.k, basis.hvps = m, 2 * _PROBES + m
        if fixed is None and (m % _CHUNK == 0 or m == limit):
            basis.delta = choose_damping(basis, damping)
            if _converged(basis):
                break
    basis.delta = choose_damping(basis, damping)
    return basis


def choose_damping(basis: KrylovBasis, damping: float | None) -> float:
    """The configured damping, else 0 on a convex Hessian, else _DAMPING_MULT * tr(H)/P (at
    least that of the positive Ritz values, when negative curvature drags the trace to 0)."""
    if damping is not None:
        return damping
    ev, _ = basis.ritz()
    top = float(ev[-1])
    if top > 0 and float(ev[0]) > math.sqrt(torch.finfo(torch.float64).eps) * top:
        return 0.0
    positive = float(ev.clamp_min(0).sum()) / basis.dim
    delta = _DAMPING_MULT * max(basis.mean_eig, positive)
    if not delta > 0:
        raise ValueError(
            "the training objective has no positive curvature here; set damping to a "
            "positive number"
        )
    return delta


def _converged(basis: KrylovBasis) -> bool:
    rho = basis.rho()
    if basis.delta > 0:
        return rho <= _STOP * basis.delta
    ev, _ = basis.ritz()
    return rho <= (1.0 + _STOP) * float(ev[0])


def curvature_rows(tr: Examples, seed: int) -> torch.Tensor:
    """Which training rows estimate the curvature, in an order set by their content: those with
    the smallest seeded random projection of their content (all of them up to _CURVATURE_ROWS),
    so the estimate (and anchored scores) do not depend on the order of the rows. A row reader
    is read once, block by block, for the same keys; a streamed dataset gets a seeded random
    subset of positions (all of them up to _CURVATURE_ROWS)."""
    n = len(tr)
    gen = torch.Generator().manual_seed(seed)
    if tr.reader is not None:
        blocks: Iterator[tuple[int, Inputs, torch.Tensor]] = read_batches(tr.reader, 65536, 0, n)
    elif tr.x is not None and tr.y is not None:
        x_all, y_all = tr.x, tr.y
        blocks = (
            (s, rows(x_all, slice(s, s + 65536)), y_all[s : s + 65536]) for s in range(0, n, 65536)
        )
    else:
        if n <= _CURVATURE_ROWS:
            return torch.arange(n)
        return torch.randperm(n, generator=gen)[:_CURVATURE_ROWS].sort().values
    proj: torch.Tensor | None = None
    keys = torch.empty(n, dtype=torch.float64)
    for start, xb_in, yb_in in blocks:
        xs = parts(xb_in)
        if proj is None:
            d = sum(int(v[0].numel()) for v in xs)
            proj = torch.randn(d, generator=gen, dtype=torch.float64)
        xb = torch.cat([v.flatten(1).to("cpu", torch.float64) for v in xs], 1)
        yb = yb_in.reshape(len(xb), -1).to("cpu", torch.float64)
        keys[start : start + len(xb)] = xb @ proj + math.pi * yb.sum(dim=1)
    return torch.argsort(keys, stable=True)[:_CURVATURE_ROWS]


__all__ = [
    "PROBE_ROWS",
    "Flat",
    "KrylovBasis",
    "basis_cap",
    "choose_damping",
    "curvature_rows",
    "hvp_operator",
    "lanczos_basis",
]
