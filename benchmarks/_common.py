"""Ground-truth and baseline pieces shared by the quality benchmark (and reusable by tests).

Everything runs on CPU on scikit-learn's bundled digits (no downloads).

Training objective convention (the one ``ForwardInfConfig.weight_decay`` refers to)::

    J(theta) = mean_i CE(f_theta(x_i), y_i) + (weight_decay / 2) * ||theta||^2

where ``theta`` is *every* parameter of the model (weights and biases). Its gradient's decay term
is ``weight_decay * theta``, i.e. exactly what ``torch.optim.SGD/Adam(weight_decay=...)`` adds.

Influence sign convention (the product's): positive = proponent.
- exact LOO influence ``L(A(D minus z_i), q) - L(A(D), q)`` is positive when removing z_i hurts q;
- TracIn at the last checkpoint ``grad L(z_i) . grad L(q)`` is positive when a descent step on q
  lowers z_i's loss.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.func import functional_call, grad, vmap

__all__ = [
    "MlpRecipe",
    "Split",
    "digits_split",
    "exact_loo",
    "exact_loo_lbfgs",
    "flip_labels",
    "lds_subsets",
    "make_logreg",
    "make_mlp",
    "objective",
    "query_losses",
    "tracin",
    "train_logreg",
    "train_mlp",
]


@dataclass
class Split:
    """Standardised digits split: train / query (held out) / extra (held out, e.g. validation)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_query: torch.Tensor
    y_query: torch.Tensor
    x_extra: torch.Tensor
    y_extra: torch.Tensor

    def to(self, dtype: torch.dtype) -> Split:
        return Split(
            *(
                t.to(dtype) if t.is_floating_point() else t
                for t in (
                    self.x_train,
                    self.y_train,
                    self.x_query,
                    self.y_query,
                    self.x_extra,
                    self.y_extra,
                )
            )
        )


def digits_split(
    n_train: int, n_query: int, n_extra: int = 0, seed: int = 0, dtype: torch.dtype = torch.float64
) -> Split:
    """Random disjoint split of the 1,797 digits; features standardised with train statistics."""
    x, y = load_digits(return_X_y=True)
    if n_train + n_query + n_extra > len(y):
        raise ValueError(f"digits has {len(y)} points, asked for {n_train + n_query + n_extra}")
    perm = np.random.default_rng(seed).permutation(len(y))
    idx = np.split(perm[: n_train + n_query + n_extra], [n_train, n_train + n_query])
    mu = x[idx[0]].mean(0)
    sd = x[idx[0]].std(0) + 1e-6  # some border pixels are constant: keep them 0, not NaN
    xs = (x - mu) / sd

    def part(i: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.tensor(xs[i], dtype=dtype), torch.tensor(y[i], dtype=torch.long)

    return Split(*part(idx[0]), *part(idx[1]), *part(idx[2]))


def flip_labels(
    y: torch.Tensor, frac: float, seed: int, n_classes: int = 10
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip ``round(frac * n)`` labels (chosen by ``seed``) to a uniformly random *other* class."""
    rng = np.random.default_rng(seed)
    n = len(y)
    which = rng.choice(n, size=round(frac * n), replace=False)
    y_noisy = y.clone()
    shift = torch.tensor(rng.integers(1, n_classes, size=len(which)), dtype=torch.long)
    y_noisy[which] = (y[which] + shift) % n_classes
    is_flipped = torch.zeros(n, dtype=torch.bool)
    is_flipped[which] = True
    return y_noisy, is_flipped


def objective(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, weight_decay: float
) -> torch.Tensor:
    """Mean cross-entropy + (weight_decay / 2) * ||theta||^2 (all parameters)."""
    loss = F.cross_entropy(model(x), y)
    if weight_decay:
        loss = loss + 0.5 * weight_decay * sum((p * p).sum() for p in model.parameters())
    return loss


@torch.no_grad()
def query_losses(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example cross-entropy, float64."""
    return F.cross_entropy(model(x), y, reduction="none").double()


# ------------------------------------------------------------------ convex: logistic regression


def make_logreg(dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(64, 10).to(dtype)


def _lbfgs(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    weight_decay: float,
    max_iter: int,
    tol: float,
) -> float:
    """Full-batch L-BFGS (strong Wolfe) to gradient tolerance ``tol``; returns final grad norm."""
    opt = torch.optim.LBFGS(
        model.parameters(),
        lr=1.0,
        max_iter=max_iter,
        history_size=50,
        tolerance_grad=tol,
        tolerance_change=0.0,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = objective(model, x, y, weight_decay)
        loss.backward()
        return loss

    opt.step(closure)
    opt.zero_grad()
    objective(model, x, y, weight_decay).backward()
    gnorm = float(torch.sqrt(sum((p.grad**2).sum() for p in model.parameters())))
    opt.zero_grad()
    return gnorm


def _flat(model: nn.Linear) -> torch.Tensor:
    """Parameters as one [10, 65] matrix: weight columns, then the bias column."""
    return torch.cat([model.weight.detach(), model.bias.detach()[:, None]], dim=1)


def _set_flat(model: nn.Linear, w: torch.Tensor) -> None:
    with torch.no_grad():
        model.weight.copy_(w[:, :-1])
        model.bias.copy_(w[:, -1])


def _aug(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)


def _softmax_cov(p: torch.Tensor) -> torch.Tensor:
    """[..., c] probabilities -> [..., c, c] Hessian of CE w.r.t. logits: diag(p) - p p^T."""
    return torch.diag_embed(p) - p[..., :, None] * p[..., None, :]


def _logreg_hessian(w: torch.Tensor, xa: torch.Tensor, weight_decay: float) -> torch.Tensor:
    """Exact Hessian [650, 650] of the objective at ``w`` (index = class * 65 + feature)."""
    c = _softmax_cov(torch.softmax(xa @ w.T, dim=1))
    h = torch.einsum("nab,nk,nl->akbl", c, xa, xa) / len(xa)
    d = w.numel()
    return h.reshape(d, d) + weight_decay * torch.eye(d, dtype=w.dtype)


def train_logreg(
    x: torch.Tensor,
    y: torch.Tensor,
    weight_decay: float,
    max_iter: int = 2000,
    newton_steps: int = 3,
) -> nn.Linear:
    """Multinomial logistic regression trained to convergence in float64.

    Full-batch L-BFGS (strong Wolfe), then ``newton_steps`` exact Newton steps that take the
    gradient norm to ~1e-15 (L-BFGS alone stalls near 1e-9, too coarse for LOO differences of
    ~1e-5). The final gradient norm is stored on the model as ``grad_norm``.
    """
    model = make_logreg(torch.float64)
    x = x.double()
    _lbfgs(model, x, y, weight_decay, max_iter, tol=1e-12)
    xa = _aug(x)
    onehot = F.one_hot(y, 10).double()
    w = _flat(model)
    for _ in range(newton_steps):
        g = (torch.softmax(xa @ w.T, 1) - onehot).T @ xa / len(x) + weight_decay * w
        h = _logreg_hessian(w, xa, weight_decay)
        w = w - torch.linalg.solve(h, g.reshape(-1)).reshape(w.shape)
    g = (torch.softmax(xa @ w.T, 1) - onehot).T @ xa / len(x) + weight_decay * w
    _set_flat(model, w)
    model.grad_norm = float(g.norm())  # type: ignore[attr-defined]  # recorded for the report
    return model


def exact_loo(
    model: nn.Linear,
    x: torch.Tensor,
    y: torch.Tensor,
    xq: torch.Tensor,
    yq: torch.Tensor,
    weight_decay: float,
    tol: float = 1e-12,
    max_iter: int = 300,
    batch: int = 100,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Exact leave-one-out influence of every training point on every query, by retraining.

    Returns ``loo [n_train, n_query]`` float64 with ``loo[i, j] = L(A(D minus z_i), q_j) -
    L(A(D), q_j)`` (positive = proponent) and ``{"max_grad_norm", "iterations", "seconds"}``.

    Each LOO objective ``mean_{j != i} CE_j + (wd/2)||theta||^2`` is minimised to gradient norm
    < ``tol`` (the objective is strongly convex, so that pins the exact minimiser to ~tol/wd),
    warm-started at the full-data optimum ``model``. The solver is a Newton-type iteration whose
    matrix is the exact LOO Hessian at the full optimum, ``H_-i = A - V_i M_i V_i^T`` (the
    full-data Hessian rescaled to n-1 points, minus point i's rank-9 term), applied in O(d^2)
    per problem by the Woodbury identity; it converges linearly (tens of iterations, about 1 s
    for 500 x 50 on 2 cores) and runs batched over training points. ``model`` must be the
    float64 optimum from :func:`train_logreg`. The result does not depend on the solver (any
    exact minimiser gives it); :func:`exact_loo_lbfgs` cross-checks rows with L-BFGS.
    """
    t0 = time.perf_counter()
    xa, xqa = _aug(x.double()), _aug(xq.double())
    n, k = xa.shape
    w0 = _flat(model).double()
    onehot = F.one_hot(y, 10).double()
    p0 = torch.softmax(xa @ w0.T, 1)
    c0 = _softmax_cov(p0)  # [n, 10, 10]
    h_ce = torch.einsum("nab,nk,nl->akbl", c0, xa, xa).reshape(10 * k, 10 * k)
    a_inv = torch.linalg.inv(h_ce / (n - 1) + weight_decay * torch.eye(10 * k, dtype=xa.dtype))
    a_inv4 = a_inv.reshape(10, k, 10, k)
    base = F.cross_entropy(xqa @ w0.T, yq, reduction="none")
    loo = torch.empty(n, len(yq), dtype=torch.float64)
    worst, iters = 0.0, 0
    for lo in range(0, n, batch):
        idx = torch.arange(lo, min(lo + batch, n))
        b = len(idx)
        xi = xa[idx]  # [b, k]
        av = torch.einsum("akcl,il->iakc", a_inv4, xi)  # A^-1 V_i : [b, 10, k, 10]
        vav = torch.einsum("iakc,ik->iac", av, xi)  # V_i^T A^-1 V_i : [b, 10, 10]
        m = c0[idx] / (n - 1)  # M_i
        small = torch.eye(10, dtype=xa.dtype) - m @ vav  # I - M V^T A^-1 V
        w = w0.expand(b, 10, k).clone()
        keep = torch.ones(b, n, 1, dtype=xa.dtype)
        keep[torch.arange(b), idx] = 0.0
        for it in range(1, max_iter + 1):  # noqa: B007  (it is read after the loop)
            r = (torch.softmax(torch.einsum("nk,bak->bna", xa, w), 2) - onehot) * keep
            g = torch.einsum("bna,nk->bak", r, xa) / (n - 1) + weight_decay * w
            gn = g.flatten(1).norm(dim=1).max().item()
            if gn < tol:
                break
            u = (g.reshape(b, -1) @ a_inv).reshape(b, 10, k)  # A^-1 g
            vu = torch.einsum("bak,bk->ba", u, xi)  # V^T A^-1 g
            z = torch.linalg.solve(small, (m @ vu[..., None]))[..., 0]
            w = w - (u + torch.einsum("bakc,bc->bak", av, z))
        else:
            raise RuntimeError(f"exact_loo did not reach grad norm {tol} (at {gn:.2e})")
        worst, iters = max(worst, gn), max(iters, it)
        lq = torch.einsum("qk,bak->bqa", xqa, w)
        loo[idx] = (
            F.cross_entropy(lq.reshape(-1, 10), yq.repeat(b), reduction="none").reshape(b, -1)
            - base
        )
    return loo, {"max_grad_norm": worst, "iterations": iters, "seconds": time.perf_counter() - t0}


def exact_loo_lbfgs(
    model: nn.Linear,
    x: torch.Tensor,
    y: torch.Tensor,
    xq: torch.Tensor,
    yq: torch.Tensor,
    weight_decay: float,
    indices: list[int],
) -> torch.Tensor:
    """Reference LOO rows for ``indices`` by warm-started L-BFGS + Newton (slow; cross-check)."""
    x, xq = x.double(), xq.double()
    base = query_losses(model, xq, yq)
    rows = []
    for i in indices:
        keep = torch.arange(len(y)) != i
        rows.append(query_losses(train_logreg(x[keep], y[keep], weight_decay), xq, yq) - base)
    return torch.stack(rows)


# ------------------------------------------------------------------ non-convex: MLP


def make_mlp(
    seed: int = 0,
    hidden: int = 128,
    dtype: torch.dtype = torch.float32,
    arch: str = "mlp",
    d_in: int = 64,
    n_out: int = 10,
) -> nn.Sequential:
    """The ``d_in``-``hidden``-``n_out`` ReLU MLP, or with ``arch="cnn"`` a small CNN on the 8x8
    digits (conv 1->8 3x3, ReLU, conv 8->16 3x3, ReLU, flatten, linear 256->10)."""
    torch.manual_seed(seed)
    if arch == "cnn":
        return nn.Sequential(
            nn.Unflatten(1, (1, 8, 8)),
            nn.Conv2d(1, 8, 3),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(256, 10),
        ).to(dtype)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, n_out)).to(dtype)


@dataclass(frozen=True)
class MlpRecipe:
    """Full-batch Adam on the objective above, cosine-decayed lr to (near) convergence."""

    weight_decay: float = 1e-3
    lr: float = 1e-2
    steps: int = 400


def train_mlp(
    x: torch.Tensor,
    y: torch.Tensor,
    init_seed: int = 0,
    recipe: MlpRecipe = MlpRecipe(),
    hidden: int = 128,
    arch: str = "mlp",
    n_out: int = 10,
) -> nn.Sequential:
    """Train the 64-``hidden``-10 ReLU MLP from the init given by ``init_seed`` with ``recipe``.

    Deterministic: the same data, seed and recipe give the same weights.
    """
    model = make_mlp(
        init_seed, hidden=hidden, dtype=x.dtype, arch=arch, d_in=x.shape[1], n_out=n_out
    )
    opt = torch.optim.Adam(model.parameters(), lr=recipe.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=recipe.steps)
    for _ in range(recipe.steps):
        opt.zero_grad()
        objective(model, x, y, recipe.weight_decay).backward()
        opt.step()
        sched.step()
    opt.zero_grad()
    objective(model, x, y, recipe.weight_decay).backward()
    model.grad_norm = float(
        torch.sqrt(  # type: ignore[attr-defined]
            sum((p.grad**2).sum() for p in model.parameters())
        )
    )
    model.zero_grad()
    return model


def lds_subsets(
    x: torch.Tensor,
    y: torch.Tensor,
    xq: torch.Tensor,
    yq: torch.Tensor,
    n_subsets: int,
    frac: float = 0.5,
    seed: int = 0,
    init_seed: int = 0,
    recipe: MlpRecipe = MlpRecipe(),
    hidden: int = 128,
    arch: str = "mlp",
    n_out: int = 10,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Retrain the MLP on ``n_subsets`` random subsets of size ``round(frac * n)``.

    Same init (``init_seed``), width (``hidden``) and recipe as the full model. Returns
    ``masks [n_subsets, n_train]`` bool, ``losses [n_subsets, n_query]`` float64 (query
    cross-entropy of each retrained model) and the total retraining time in seconds.
    """
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    n = len(y)
    masks = np.zeros((n_subsets, n), dtype=bool)
    losses = np.zeros((n_subsets, len(yq)))
    for s in range(n_subsets):
        masks[s, rng.choice(n, size=round(frac * n), replace=False)] = True
        idx = torch.from_numpy(np.flatnonzero(masks[s]))
        model = train_mlp(
            x[idx],
            y[idx],
            init_seed=init_seed,
            recipe=recipe,
            hidden=hidden,
            arch=arch,
            n_out=n_out,
        )
        losses[s] = query_losses(model, xq, yq).numpy()
    return masks, losses, time.perf_counter() - t0


# ------------------------------------------------------------------ TracIn baseline


def _per_example_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[n, n_params] per-example gradients of the cross-entropy (no decay term)."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, p, (xi[None],))
        return F.cross_entropy(out, yi[None])

    g = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    return torch.cat([g[k].reshape(len(x), -1) for k in params], dim=1)


def tracin(
    model: nn.Module,
    train: tuple[torch.Tensor, torch.Tensor],
    query: tuple[torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """TracIn at the final checkpoint: ``grad L(z_i) . grad L(q_j)`` -> [n_train, n_query].

    Per unit learning rate; positive = proponent (a descent step on q lowers z_i's loss).
    """
    gi = _per_example_grads(model, *train)
    gq = _per_example_grads(model, *query)
    return (gi.double() @ gq.double().T).float()
