"""The gate's mislabel flags against cleanlab, and the group fit's constants, off digits.

Four data sets that ship offline (no downloads) and are not digits, each split into a training
set with 10% of its labels flipped to a random other class (``_common.flip_labels``, the same
flips for every method) and a clean validation set:

- ``cancer``: scikit-learn's breast cancer (30 features, 2 classes), MLP 30-64-2;
- ``synthetic``: ``make_classification`` (20 features, 4 classes), MLP 20-64-4;
- ``shapes``: procedurally drawn 3x16x16 images (disc, square, horizontal or vertical stripes in
  a random colour, size and place, plus noise), a small CNN (2 conv + pool, linear head);
- ``tokens``: synthetic token sequences (length 12, vocabulary 60, 3 topics, each drawing its
  tokens from its own overlapping distribution), a small embedding model (embedding 16, mean
  pool, linear head).

Every model is trained by the same recipe (full-batch Adam, lr 1e-2 cosine-decayed, 300 steps,
weight decay 1e-3 on all parameters; ``_common.objective``): the user's one model.

Methods, all on the same flips:
- ``cleanlab``: its documented recipe, ``cleanlab.filter.find_label_issues(labels, pred_probs)``
  with out-of-sample predicted probabilities from 5-fold cross-validation (5 retrains of the
  same model class with the same recipe); ranking by ``cleanlab.rank.get_label_quality_scores``
  (self-confidence, low = issue). Its time includes the 5 retrains.
- ``gate``: what the flow flags (``tasks.score``: engine defaults, plain mode): self-influence
  and group influence on the validation set of the one trained model, calibration scores of the
  validation set (``calibration_scores``) and ``summarise``'s ``flag_mislabel``; ranking by
  self-influence. Its time is the scoring, calibration and flagging, *not* the training (the
  user trained the model anyway).
- ``loss after fit``: the same run's harmful flag (``flag_harmful``: group influence < 0 and
  the loss after the validation fit above its calibration threshold), ranked by that loss.
- ``group``: the same run's group influence ranked by harm (``-group``); flags = the harmful
  flag before the loss-after-fit rule (``-group`` above the calibration rows' conformal
  threshold); ``gate, before``: ``flag_mislabel`` with that harmful flag.
- ``loss``: the trained model's per-example training loss (no flags: a ranking only).

Columns: ``flags`` = how many the method flags itself, ``P/R`` its precision and recall;
``P/R @cl`` = precision and recall of its top-k at cleanlab's budget (k = cleanlab's flags);
``P @flips`` = precision (= recall) of its top-k at k = number of planted flips; ``AUROC`` of its
ranking against the planted flips; ``time``. Means over seeds (``--seeds``).

``--grid``: also the group fit's constants (``mirrorinf.engine.group_fit``: Adam steps and the
lr multiplier of rms(theta)) over steps {25, 50, 100} x lr {0.003, 0.01, 0.03}: AUROC of the
harm ranking ``-group`` per data set, with the self-influence and loss AUROC for reference.

``--rules``: candidate rules that would derive the fit's length from the model and data instead
of the constant 50 (each picks a step count at lr 0.01 * rms(theta), then the engine's fit runs
that many steps; AUROC of ``-group`` and the chosen step counts, per data set):
``early``: Adam on a seeded 80% of the validation set, stopping at the step where the other 20%'s
mean loss is lowest (cap 300 steps), then the fit on the whole set for that many steps (early
stopping on held-out validation loss); ``to-train``: fit the validation set until its mean loss
reaches the trained model's mean training loss ("as well fitted as a training set"; cap 300);
``to-train-median``: the same, to the median training loss; ``trust-region``: stop where the
actual loss drop falls below RULE_RHO (0.5) x the first-order prediction ``g0 . (theta0 -
theta_t)`` (where the fit leaves the region its local model describes); ``planted``: flip
every validation row to a random other class, fit 4 of 5 folds and score the fifth's rows with
both labels, and take the step where flipped and clean versions separate best (AUROC of the
loss change; a self-supervised stand-in for the harm ranking); plus the constants
50 x 0.01 (the default), 50 x 0.03 and 50 x 0.1 for scale. In brackets: the AUROC of ranking by
the loss under the fitted parameters (``loss - group``) instead of the loss change. ``--digits``
adds scikit-learn's digits (1000 / 300 rows, MLP 64-64-10, same recipe) to ``--rules``, the set
the constants came from.

Path-free rules (``--rule-names fitted fitted-median``): the same fit at the default lr run until
every validation row's loss is <= ln 2 (``fitted``) or <= the trained model's median training
loss (``fitted-median``), cap ``group_path.CAP``; AUROC of each training row's loss there
(``end``), of its rise (``change``), and of its mean along the path over steps (``mean``) and
log-steps (``logmean``), with T per seed, passes over the training set and seconds.
``--path-lrs 0.01 0.03``: one such fit per lr multiplier of rms(theta); ``--path-cap 4``: also
score each fit's ``capped`` end, the loss at the fitted step or at 4x the default's path
(200 steps at 0.01, 67 at 0.03), whichever comes first, read off the same fit. ``--paired``
(with ``50x0.01`` among the rules): per set, each path rule's ``end`` / ``capped`` and each
longer constant against the default's score on the same seeds (mean, std, paired difference
+- its standard error, seeds won, steps, seconds); ``--json PATH`` keeps the per-seed results.

Run:  python benchmarks/cleanlab.py [--seeds 3] [--sets cancer synthetic shapes tokens] [--grid]
      [--rules [--digits] [--no-cleanlab] [--rule-names early planted fitted ...]]
      [--path-lrs 0.01 0.03] [--path-cap 4] [--paired] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold
from torch import nn

# run as a script, this file's folder comes first on sys.path and would shadow the cleanlab package
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import mirrorinf.engine.group_fit as group_fit  # noqa: E402
from benchmarks._common import flip_labels, objective  # noqa: E402
from benchmarks.group_path import path_rule  # noqa: E402
from mirrorinf import ForwardInf  # noqa: E402
from mirrorinf.calibration import calibration_scores  # noqa: E402
from mirrorinf.summary import summarise  # noqa: E402

FLIP = 0.10
K_FOLDS = 5
STEPS, LR, WD = 300, 1e-2, 1e-3
GRID_STEPS = (25, 50, 100)
GRID_LR = (0.003, 0.01, 0.03)
RULE_CAP = 300  # steps at lr 0.01 * rms(theta): a path of 3, twice where the grid levels off
RULE_HOLD = 0.2  # held-out share of the validation set for ``early``
RULE_RHO = 0.5  # trust-region: actual / first-order predicted decrease below which it stops
RULES = (
    "50x0.01",
    "25x0.01",  # path 0.25: half the default's (the plateau's lower side)
    "100x0.01",  # path 1: twice the default's
    "50x0.03",
    "50x0.1",
    "200x0.01",  # path 2: the capped path rules' cap at 4x the default
    "early",
    "to-train",
    "to-train-median",
    "trust-region",
    "planted",
    "fitted",
    "fitted-median",
)
PATH_RULES = ("fitted", "fitted-median")  # the fit run until the validation set is fitted
PATH_SCORES = ("end", "change", "mean", "logmean")
DEFAULT_PATH = group_fit._GROUP_FIT_STEPS * group_fit._GROUP_FIT_LR  # 0.5 (x rms(theta))


@dataclass(frozen=True)
class PathOpts:
    """How the path rules run: Adam's lr multipliers of rms(theta) (one fit per lr) and an
    optional cap in multiples of the default's path (``capped``: the same fit's loss there)."""

    lrs: tuple[float, ...] = (group_fit._GROUP_FIT_LR,)
    cap: float | None = None

    def cap_steps(self, lr: float) -> int | None:
        """The cap in steps at ``lr``: ``cap`` x the default's path."""
        return None if self.cap is None else max(1, round(self.cap * DEFAULT_PATH / lr))


def path_key(rule: str, lr: float) -> str:
    """The results key of a path rule at an lr: its name at the default lr, else name@lr."""
    return rule if lr == group_fit._GROUP_FIT_LR else f"{rule}@{lr:g}"


@dataclass
class Case:
    """A data set: clean training labels, a clean validation set, a model factory."""

    x: torch.Tensor
    y: torch.Tensor
    xv: torch.Tensor
    yv: torch.Tensor
    n_classes: int
    make: Callable[[], nn.Module]


def _standard(x: np.ndarray, n_train: int) -> torch.Tensor:
    mu, sd = x[:n_train].mean(0), x[:n_train].std(0) + 1e-6
    return torch.tensor((x - mu) / sd, dtype=torch.float32)


def _mlp(d_in: int, n_out: int) -> Callable[[], nn.Module]:
    return lambda: nn.Sequential(nn.Linear(d_in, 64), nn.ReLU(), nn.Linear(64, n_out))


def _tabular(x: np.ndarray, y: np.ndarray, n_train: int, n_val: int, seed: int) -> Case:
    perm = np.random.default_rng(seed).permutation(len(y))[: n_train + n_val]
    x, y = x[perm], y[perm]
    xs, yt = _standard(x, n_train), torch.tensor(y, dtype=torch.long)
    c = int(y.max()) + 1
    return Case(xs[:n_train], yt[:n_train], xs[n_train:], yt[n_train:], c, _mlp(x.shape[1], c))


def cancer(seed: int) -> Case:
    from sklearn.datasets import load_breast_cancer

    x, y = load_breast_cancer(return_X_y=True)
    return _tabular(x, y, 400, 169, seed)


def synthetic(seed: int) -> Case:
    from sklearn.datasets import make_classification

    x, y = make_classification(
        1000, 20, n_informative=10, n_classes=4, class_sep=1.5, random_state=seed
    )
    return _tabular(x, y, 700, 300, seed)


def _draw_shapes(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """n noisy 3x16x16 images of 4 classes: disc, square, horizontal, vertical stripes."""
    y = rng.integers(0, 4, n)
    yy, xx = np.mgrid[0:16, 0:16]
    out = np.empty((n, 3, 16, 16), dtype=np.float32)
    for i, c in enumerate(y):
        cy, cx, r = rng.uniform(5, 11), rng.uniform(5, 11), rng.uniform(3, 5)
        period, phase = rng.integers(3, 6), rng.integers(0, 6)
        if c == 0:
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        elif c == 1:
            mask = (abs(yy - cy) <= r * 0.8) & (abs(xx - cx) <= r * 0.8)
        elif c == 2:
            mask = (yy + phase) % period == 0
        else:
            mask = (xx + phase) % period == 0
        colour, back = rng.uniform(0.3, 1.0, 3), rng.uniform(0.0, 0.4, 3)
        img = np.where(mask[None], colour[:, None, None], back[:, None, None])
        out[i] = img + rng.normal(0, 0.25, (3, 16, 16))
    return out, y


class _Cnn(nn.Module):
    """Two conv + ReLU + max-pool blocks and a linear head (3x16x16 -> 4)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.head = nn.Linear(16 * 4 * 4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def shapes(seed: int) -> Case:
    x, y = _draw_shapes(800, np.random.default_rng(1000 + seed))
    xt, yt = torch.from_numpy(x), torch.tensor(y, dtype=torch.long)
    return Case(xt[:600], yt[:600], xt[600:], yt[600:], 4, _Cnn)


class _Bag(nn.Module):
    """Token embedding, mean over positions, linear head."""

    def __init__(self, vocab: int = 60, d: int = 16, n_out: int = 3) -> None:
        super().__init__()
        self.emb, self.head = nn.Embedding(vocab, d), nn.Linear(d, n_out)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(ids).mean(dim=1))


def tokens(seed: int) -> Case:
    """Each topic draws its 12 tokens from its own distribution over a shared vocabulary of 60
    (softmax of 0.5 x a standard normal vector per topic): topics overlap, as words do."""
    rng = np.random.default_rng(2000 + seed)
    n, length, vocab = 800, 12, 60
    logits = 0.5 * rng.standard_normal((3, vocab))
    dist = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    y = rng.integers(0, 3, n)
    ids = np.stack([rng.choice(vocab, length, p=dist[c]) for c in y])
    xt, yt = torch.from_numpy(ids), torch.tensor(y, dtype=torch.long)
    return Case(xt[:600], yt[:600], xt[600:], yt[600:], 3, _Bag)


def digits(seed: int) -> Case:
    """The set the group fit's constants were chosen on (reference for ``--rules``)."""
    from benchmarks._common import digits_split

    s = digits_split(1000, 300, seed=seed, dtype=torch.float32)
    return Case(s.x_train, s.y_train, s.x_query, s.y_query, 10, _mlp(64, 10))


SETS: dict[str, Callable[[int], Case]] = {
    "cancer": cancer,
    "synthetic": synthetic,
    "shapes": shapes,
    "tokens": tokens,
}
ALL_SETS = {**SETS, "digits": digits}


def train(make: Callable[[], nn.Module], x: torch.Tensor, y: torch.Tensor, seed: int) -> nn.Module:
    """The one recipe for every model: full-batch Adam, cosine lr, weight decay on all params."""
    torch.manual_seed(seed)
    model = make()
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS)
    for _ in range(STEPS):
        opt.zero_grad()
        objective(model, x, y, WD).backward()
        opt.step()
        sched.step()
    return model.eval()


def run_cleanlab(case: Case, y: torch.Tensor, seed: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Cleanlab's recipe: K-fold out-of-sample pred_probs -> find_label_issues; (flags, issue
    score (high = issue), seconds including the K retrains)."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    t0 = time.perf_counter()
    labels = y.numpy()
    probs = np.zeros((len(labels), case.n_classes))
    folds = StratifiedKFold(K_FOLDS, shuffle=True, random_state=seed)
    for fit_idx, held in folds.split(np.zeros(len(labels)), labels):
        fit_t, held_t = torch.from_numpy(fit_idx), torch.from_numpy(held)
        model = train(case.make, case.x[fit_t], y[fit_t], seed)
        with torch.no_grad():
            probs[held] = F.softmax(model(case.x[held_t]).double(), dim=1).numpy()
    flags = find_label_issues(labels, probs)
    score = -get_label_quality_scores(labels, probs)
    return flags, score, time.perf_counter() - t0


def run_gate(model: nn.Module, case: Case, y: torch.Tensor) -> dict[str, np.ndarray | float]:
    """The flow's flags with engine defaults (tasks.score + summarise), timed without training."""
    t0 = time.perf_counter()
    fi = ForwardInf(model)
    self_inf = fi.self_influence((case.x, y)).double().numpy()
    group = fi.group((case.x, y), (case.xv, case.yv)).double().numpy()
    assert fi.last_report is not None and fi.last_report.loss_after_fit is not None
    after = fi.last_report.loss_after_fit.numpy()
    calib = calibration_scores(fi, (case.xv, case.yv))
    common = {
        "query_self_drop": np.zeros(0),
        "calib_self_inf": calib.self_influence,
        "calib_group_inf": calib.group_influence,
    }
    t = summarise(
        np.zeros((len(y), 0)),
        self_inf,
        group,
        **common,
        loss_after_fit=after,
        calib_loss_after_fit=calib.loss_after_fit,
    )
    seconds = time.perf_counter() - t0
    before = summarise(np.zeros((len(y), 0)), self_inf, group, **common)  # group threshold
    return {
        "self": self_inf,
        "group": group,
        "after": after,
        "mislabel": t.train["flag_mislabel"].to_numpy(dtype=bool),
        "harmful": t.train["flag_harmful"].to_numpy(dtype=bool),
        "mislabel_before": before.train["flag_mislabel"].to_numpy(dtype=bool),
        "harmful_before": before.train["flag_harmful"].to_numpy(dtype=bool),
        "seconds": seconds,
    }


def planted_steps(model: nn.Module, case: Case, folds: int = 5) -> int:
    """``planted``: flip every validation row's label to a random other class; per fold, fit the
    other folds and score the fold's rows with both labels by their loss change; the step whose
    pooled AUROC (flipped above clean) is highest, mean over folds' curves, ties to the first."""
    import copy

    n = len(case.yv)
    shift = torch.randint(1, case.n_classes, (n,), generator=torch.Generator().manual_seed(1))
    y_flip = (case.yv + shift) % case.n_classes
    perm = np.random.default_rng(0).permutation(n)
    clean, flip = np.zeros((RULE_CAP, n)), np.zeros((RULE_CAP, n))
    for fold in np.array_split(perm, folds):
        rest = torch.from_numpy(np.setdiff1d(np.arange(n), fold))
        idx = torch.from_numpy(fold)
        m = copy.deepcopy(model)
        params = [p for p in m.parameters() if p.requires_grad]
        rms = float(
            torch.sqrt(
                sum(p.detach().pow(2).sum() for p in params) / sum(p.numel() for p in params)
            )
        )
        opt = torch.optim.Adam(params, lr=0.01 * max(rms, 1e-3))

        def fold_losses(m: nn.Module = m, idx: torch.Tensor = idx) -> tuple[np.ndarray, ...]:
            with torch.no_grad():
                out = m(case.xv[idx])
                return tuple(
                    F.cross_entropy(out, lab[idx], reduction="none").numpy()
                    for lab in (case.yv, y_flip)
                )

        base_c, base_f = fold_losses()
        for t in range(RULE_CAP):
            opt.zero_grad()
            F.cross_entropy(m(case.xv[rest]), case.yv[rest]).backward()
            opt.step()
            after_c, after_f = fold_losses()
            clean[t, fold], flip[t, fold] = after_c - base_c, after_f - base_f
    truth = np.r_[np.zeros(n), np.ones(n)]
    auc = [roc_auc_score(truth, np.r_[clean[t], flip[t]]) for t in range(RULE_CAP)]
    return int(np.argmax(auc)) + 1


def rule_steps(model: nn.Module, case: Case, train_loss: np.ndarray, rule: str) -> int:
    """Steps of the group fit (Adam, lr 0.01 * rms(theta), the engine's) a candidate rule picks."""
    import copy

    if rule == "planted":
        return planted_steps(model, case)

    m = copy.deepcopy(model)
    params = [p for p in m.parameters() if p.requires_grad]
    numel = sum(p.numel() for p in params)
    rms = float(torch.sqrt(sum(p.detach().pow(2).sum() for p in params) / numel))
    opt = torch.optim.Adam(params, lr=0.01 * max(rms, 1e-3))
    n = len(case.yv)
    fit, held = torch.arange(n), torch.arange(0)
    if rule == "early":
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
        n_h = max(1, round(RULE_HOLD * n))
        held, fit = perm[:n_h], perm[n_h:]
    target = float(np.mean(train_loss) if rule == "to-train" else np.median(train_loss))

    def mean_loss(idx: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(m(case.xv[idx]), case.yv[idx])

    theta0 = [p.detach().clone() for p in params]
    if rule == "trust-region":
        loss0 = mean_loss(fit)
        g0 = [gi.detach() for gi in torch.autograd.grad(loss0, params)]
        loss0 = float(loss0.detach())
    best, best_t = float("inf"), 0
    for t in range(RULE_CAP + 1):
        with torch.no_grad():
            if rule == "trust-region" and t > 0:
                pred = sum(
                    float((g * (a - p)).sum()) for g, a, p in zip(g0, theta0, params, strict=True)
                )
                if loss0 - float(mean_loss(fit)) < RULE_RHO * pred:
                    return t
            elif rule == "early":
                h = float(mean_loss(held))
                if h < best:
                    best, best_t = h, t
            elif float(mean_loss(fit)) <= target:
                return t
        if t == RULE_CAP:
            break
        opt.zero_grad()
        mean_loss(fit).backward()
        opt.step()
    return max(1, best_t) if rule == "early" else RULE_CAP


def run_rules(
    model: nn.Module,
    case: Case,
    y: torch.Tensor,
    truth: np.ndarray,
    rules: list[str],
    opts: PathOpts = PathOpts(),
) -> dict:
    """AUROC of ``-group`` (and of the loss after the fit) and the steps, per candidate rule."""
    fi = ForwardInf(model)
    with torch.no_grad():
        loss = F.cross_entropy(model(case.x), y, reduction="none").double().numpy()
    saved = group_fit._GROUP_FIT_STEPS, group_fit._GROUP_FIT_LR
    out = {}
    try:
        for rule in rules:
            if rule in PATH_RULES:  # at the default steps, whatever rule ran before
                group_fit._GROUP_FIT_STEPS, group_fit._GROUP_FIT_LR = saved
                for lr in opts.lrs:
                    out[path_key(rule, lr)] = run_path(
                        fi, case, y, truth, rule, lr, opts.cap_steps(lr)
                    )
                continue
            if "x" in rule:
                steps, lr = int(rule.split("x")[0]), float(rule.split("x")[1])
            else:
                steps, lr = rule_steps(model, case, loss, rule), 0.01
            group_fit._GROUP_FIT_STEPS, group_fit._GROUP_FIT_LR = steps, lr
            t0 = time.perf_counter()
            gi = fi.group((case.x, y), (case.xv, case.yv)).double().numpy()
            sec = time.perf_counter() - t0
            out[rule] = (roc_auc_score(truth, -gi), roc_auc_score(truth, loss - gi), steps, sec)
    finally:
        group_fit._GROUP_FIT_STEPS, group_fit._GROUP_FIT_LR = saved
    return out


def run_path(
    fi: ForwardInf,
    case: Case,
    y: torch.Tensor,
    truth: np.ndarray,
    rule: str,
    lr: float = group_fit._GROUP_FIT_LR,
    cap: int | None = None,
) -> dict:
    """One path fit at ``lr`` x rms(theta) to the fitted validation set: AUROC of each path score
    (``end``: the loss where fitted, ``change``: its rise over the trained model's, ``mean`` /
    ``logmean``: the loss averaged over steps / log-steps, ``capped``: the loss at the fitted
    step or ``cap``, whichever is first), the fitted step, forward passes and seconds."""
    target = "half" if rule == "fitted" else "median"
    with path_rule("end", target, lr=lr, cap=cap) as seen:
        t0 = time.perf_counter()
        fi.group((case.x, y), (case.xv, case.yv))
        sec = time.perf_counter() - t0
    path = seen.last[0]
    scores = {
        "end": path.end(),
        "change": path.end() - path.base,
        "mean": path.mean(),
        "logmean": path.logmean(),
    }
    if cap is not None:
        scores["capped"] = path.capped()
    out = {k: roc_auc_score(truth, v.double().numpy()) for k, v in scores.items()}
    out.update(steps=path.steps, forwards=path.forwards, seconds=sec, cap=cap)
    return out


def _at(score: np.ndarray, truth: np.ndarray, k: int) -> tuple[float, float]:
    """Precision and recall of the top-k of ``score``."""
    if k == 0:
        return float("nan"), 0.0
    hits = truth[np.argsort(-score, kind="stable")[:k]].sum()
    return hits / k, hits / truth.sum()


def _row(flags: np.ndarray | None, score: np.ndarray, truth: np.ndarray, k_cl: int, sec: float):
    """One method's numbers: flags, P, R, P@cl, R@cl, P@flips, AUROC, seconds."""
    if flags is None:
        n, p, r = float("nan"), float("nan"), float("nan")
    else:
        n = float(flags.sum())
        p = float((flags & truth).sum() / max(1, flags.sum()))
        r = float((flags & truth).sum() / truth.sum())
    p_cl, r_cl = _at(score, truth, k_cl)
    p_fl, _ = _at(score, truth, int(truth.sum()))
    return np.array([n, p, r, p_cl, r_cl, p_fl, roc_auc_score(truth, score), sec])


def one(
    name: str,
    seed: int,
    grid: bool,
    rules: list[str] | None = None,
    with_cl: bool = True,
    opts: PathOpts = PathOpts(),
) -> tuple[dict[str, np.ndarray], dict]:
    case = ALL_SETS[name](seed)
    y, flipped = flip_labels(case.y, FLIP, seed=100 + seed, n_classes=case.n_classes)
    truth = flipped.numpy()
    t0 = time.perf_counter()
    model = train(case.make, case.x, y, seed)
    train_s = time.perf_counter() - t0
    if not with_cl:
        return {}, {"train_s": train_s, "rules": run_rules(model, case, y, truth, rules, opts)}
    cl_flags, cl_score, cl_s = run_cleanlab(case, y, seed)
    k_cl = int(cl_flags.sum())
    g = run_gate(model, case, y)
    with torch.no_grad():
        loss = F.cross_entropy(model(case.x), y, reduction="none").double().numpy()
    rows = {
        "cleanlab": _row(cl_flags, cl_score, truth, k_cl, cl_s),
        "gate (self-influence)": _row(g["mislabel"], g["self"], truth, k_cl, g["seconds"]),
        "gate, before": _row(g["mislabel_before"], g["self"], truth, k_cl, float("nan")),
        "loss after fit (harm)": _row(g["harmful"], g["after"], truth, k_cl, float("nan")),
        "group influence (harm)": _row(g["harmful_before"], -g["group"], truth, k_cl, float("nan")),
        "training loss": _row(None, loss, truth, k_cl, float("nan")),
    }
    extra: dict = {"train_s": train_s}
    if grid:
        fi = ForwardInf(model)
        saved = group_fit._GROUP_FIT_STEPS, group_fit._GROUP_FIT_LR
        cells = {}
        try:
            for steps in GRID_STEPS:
                for lr in GRID_LR:
                    group_fit._GROUP_FIT_STEPS, group_fit._GROUP_FIT_LR = steps, lr
                    gi = fi.group((case.x, y), (case.xv, case.yv)).double().numpy()
                    cells[(steps, lr)] = roc_auc_score(truth, -gi)
        finally:
            group_fit._GROUP_FIT_STEPS, group_fit._GROUP_FIT_LR = saved
        extra["grid"] = cells
        extra["self_auroc"] = roc_auc_score(truth, g["self"])
        extra["loss_auroc"] = roc_auc_score(truth, loss)
    if rules:
        extra["rules"] = run_rules(model, case, y, truth, rules, opts)
    return rows, extra


def _fmt(v: float, spec: str) -> str:
    return "" if np.isnan(v) else format(v, spec)


def _print_rules(grids: dict[str, list[dict]], rules: list[str], opts: PathOpts) -> None:
    """The --rules table: AUROC of -group [of the loss after the fit] (steps per seed)."""
    path_rules = [(r, lr) for r in rules if r in PATH_RULES for lr in opts.lrs]
    rules = [r for r in rules if r not in PATH_RULES]
    print(
        "\n# length of the group fit: AUROC of -group [ranked by the loss after the fit] "
        "(steps per seed; lr 0.01 * rms(theta) unless the rule names it)\n"
        "| data set | " + " | ".join(rules) + " |\n|---|" + "---:|" * len(rules)
    )
    for name, extras in grids.items():
        cells = []
        for rule in rules:
            r = [e["rules"][rule] for e in extras]
            steps = "/".join(str(x[2]) for x in r) if "x" not in rule else ""
            cells.append(
                f"{np.mean([x[0] for x in r]):.3f} [{np.mean([x[1] for x in r]):.3f}]"
                + (f" ({steps})" if steps else "")
                + f" {np.mean([x[3] for x in r]):.2f} s"
            )
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    for rule, lr in path_rules:
        cap = opts.cap_steps(lr)
        scores = PATH_SCORES + (("capped",) if cap is not None else ())
        print(
            f"\n# {rule}: Adam at lr {lr:g} * rms(theta) until every validation row is fitted"
            + (f" (capped: or {cap} steps)" if cap is not None else "")
            + "; AUROC of each path score (steps per seed; forward passes over the training set; s)"
            "\n| data set | " + " | ".join(scores) + " | steps | forwards | seconds |\n"
            "|---|" + "---:|" * (len(scores) + 3)
        )
        for name, extras in grids.items():
            r = [e["rules"][path_key(rule, lr)] for e in extras]
            cells = [f"{np.mean([x[k] for x in r]):.3f}" for k in scores]
            steps = "/".join(str(x["steps"]) for x in r)
            fw = "/".join(str(x["forwards"]) for x in r)
            sec = np.mean([x["seconds"] for x in r])
            print(
                f"| {name} | " + " | ".join(cells) + f" | {steps} | {fw} | {sec:.2f} |", flush=True
            )


def _paired(grids: dict[str, list[dict]], rules: list[str], opts: PathOpts) -> list[dict]:
    """Per set and path rule/score: AUROC over seeds against the default's (the harmful flag's
    score, the loss after the 50x0.01 fit; the same seeds, so the difference is paired)."""
    rows = []
    for name, extras in grids.items():
        ref = np.array([e["rules"]["50x0.01"][1] for e in extras])
        ref_s = np.array([e["rules"]["50x0.01"][3] for e in extras])
        rows.append(
            dict(
                set=name,
                rule="loss after 50x0.01 (default)",
                auc=ref,
                T=[50] * len(ref),
                seconds=ref_s,
                diff=None,
            )
        )
        # longer constants, and the rules that pick a step count (to-train-median, ...)
        for rule in (r for r in rules if r != "50x0.01" and r not in PATH_RULES):
            r = [e["rules"][rule] for e in extras]
            auc = np.array([x[1] for x in r])
            rows.append(
                dict(
                    set=name,
                    rule=f"loss after {rule}",
                    auc=auc,
                    T=[x[2] for x in r],
                    seconds=np.array([x[3] for x in r]),
                    diff=auc - ref,
                )
            )
        for rule in (r for r in rules if r in PATH_RULES):
            for lr in opts.lrs:
                r = [e["rules"][path_key(rule, lr)] for e in extras]
                sec = np.array([x["seconds"] for x in r])
                steps = [x["steps"] for x in r]
                for score in ("end", "capped") if r[0].get("cap") is not None else ("end",):
                    auc = np.array([x[score] for x in r])
                    if score == "capped":  # the same fit's per-step cost, up to the cap
                        t = [min(s, x["cap"]) for s, x in zip(steps, r, strict=True)]
                        s_ = sec * np.array(t) / np.maximum(1, np.array(steps))
                    else:
                        t, s_ = steps, sec
                    label = f"{rule} {score} @ lr {lr:g}" + (
                        f" (cap {r[0]['cap']})" if score == "capped" else ""
                    )
                    rows.append(
                        dict(set=name, rule=label, auc=auc, T=t, seconds=s_, diff=auc - ref)
                    )
    return rows


def _print_paired(rows: list[dict]) -> None:
    """The --paired table: mean and std over seeds, the paired difference against the default
    (mean +- its standard error, seeds where the rule is higher), steps and fit seconds."""
    n = len(rows[0]["auc"])
    print(
        f"\n# paired over {n} seeds: AUROC mean, std (ddof 1), difference against the default "
        "on the same seed (mean +- SE; wins = seeds where the rule is higher), steps T (mean, "
        "min-max), fit seconds (mean; capped: the same fit's per-step cost up to the cap)\n"
        "| data set | rule | AUROC mean | std | diff +- SE | wins | T | seconds |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|"
    )
    for r in rows:
        auc, d, t = r["auc"], r["diff"], r["T"]
        sd = float(np.std(auc, ddof=1)) if n > 1 else float("nan")
        if d is None:
            diff, wins = "", ""
        else:
            se = float(np.std(d, ddof=1) / np.sqrt(n)) if n > 1 else float("nan")
            diff, wins = f"{d.mean():+.4f} +- {se:.4f}", f"{int((d > 0).sum())}/{n}"
        print(
            f"| {r['set']} | {r['rule']} | {auc.mean():.4f} | {sd:.4f} | {diff} | {wins} "
            f"| {np.mean(t):.0f} ({min(t)}-{max(t)}) | {np.mean(r['seconds']):.2f} |",
            flush=True,
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    ap.add_argument("--grid", action="store_true", help="also the group fit's constants")
    ap.add_argument("--rules", action="store_true", help="also candidate rules for its length")
    ap.add_argument("--digits", action="store_true", help="add digits to --rules")
    ap.add_argument("--rule-names", nargs="+", choices=RULES, default=list(RULES))
    ap.add_argument("--no-cleanlab", action="store_true", help="only --rules (no comparison)")
    ap.add_argument(
        "--path-lrs",
        nargs="+",
        type=float,
        default=[group_fit._GROUP_FIT_LR],
        help="path rules: Adam lr multipliers of rms(theta), one fit each",
    )
    ap.add_argument(
        "--path-cap",
        type=float,
        default=None,
        help="path rules: also score at this many times the default's path (capped)",
    )
    ap.add_argument(
        "--paired",
        action="store_true",
        help="path rules against the default, paired over seeds (needs 50x0.01 in --rule-names)",
    )
    ap.add_argument("--json", type=Path, default=None, help="write the per-seed --rules results")
    args = ap.parse_args(argv)
    opts = PathOpts(tuple(args.path_lrs), args.path_cap)
    if args.paired and "50x0.01" not in args.rule_names:
        ap.error("--paired compares against the default: add 50x0.01 to --rule-names")
    if args.no_cleanlab:
        args.rules = True
    torch.set_num_threads(1)
    logging.disable(logging.WARNING)
    print(
        f"# {int(FLIP * 100)}% flipped training labels, {args.seeds} seeds, 1 torch thread; "
        "cleanlab time includes its 5 retrains, the gate's excludes the one training"
    )
    print(
        "| data set | method | flags | P | R | P @cl | R @cl | P @flips | AUROC | time |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    grids: dict[str, list[dict]] = {}
    names = args.sets + (["digits"] if args.digits else [])
    for name in names:
        with_cl = not args.no_cleanlab and name != "digits"
        rules = args.rule_names if args.rules else None
        runs = [one(name, s, args.grid, rules, with_cl, opts) for s in range(args.seeds)]
        grids[name] = [e for _, e in runs]
        if not with_cl:
            continue
        train_s = np.mean([e["train_s"] for _, e in runs])
        for method in runs[0][0]:
            m = np.nanmean([r[method] for r, _ in runs], axis=0)
            n, p, r, p_cl, r_cl, p_fl, auc, sec = m
            print(
                f"| {name} | {method} | {_fmt(n, '.1f')} | {_fmt(p, '.2f')} | {_fmt(r, '.2f')} "
                f"| {p_cl:.2f} | {r_cl:.2f} | {p_fl:.2f} | {auc:.3f} | {_fmt(sec, '.2f')}"
                f"{'' if np.isnan(sec) else ' s'} |",
                flush=True,
            )
        print(f"| {name} | (one training, for scale) | | | | | | | | {train_s:.2f} s |")
    if args.rules:
        _print_rules(grids, args.rule_names, opts)
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {k: [e["rules"] for e in v] for k, v in grids.items()}, default=float, indent=1
            )
        )
    if args.paired:
        _print_paired(_paired(grids, args.rule_names, opts))
    if args.grid:
        print(
            "\n# group fit constants: AUROC of -group against the flips (mean over seeds); "
            "self-influence and training loss for reference\n"
            "| data set | self | loss | "
            + " | ".join(f"{s} x {lr:g}" for s in GRID_STEPS for lr in GRID_LR)
            + " |\n|---|---:|---:|"
            + "---:|" * (len(GRID_STEPS) * len(GRID_LR))
        )
        for name, extras in grids.items():
            cells = [
                np.mean([e["grid"][(s, lr)] for e in extras]) for s in GRID_STEPS for lr in GRID_LR
            ]
            s_auc = np.mean([e["self_auroc"] for e in extras])
            l_auc = np.mean([e["loss_auroc"] for e in extras])
            print(
                f"| {name} | {s_auc:.3f} | {l_auc:.3f} | "
                + " | ".join(f"{c:.3f}" for c in cells)
                + " |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
