"""Quality benchmark of the Forward-INF engine on scikit-learn's bundled digits (no downloads).

Three experiments, every engine row with DEFAULT engine settings (lr=None, steps=None) unless the
row's label says otherwise:

1. Convex: multinomial logistic regression (nn.Linear(64, 10), standardised inputs), 500 train /
   50 held-out queries, trained to convergence in float64. Ground truth = exact leave-one-out
   (LOO) influence by retraining without each training point. Metric: mean per-query Spearman /
   Pearson with LOO.
2. Non-convex: 64-128-10 ReLU MLP, 1000 train / 100 queries, full-batch Adam. Metric: linear
   datamodeling score (LDS) against models retrained from the same init on random 50% subsets.
3. Mislabel: the same MLP on 1200 train with 10% flipped labels and a clean 200-point validation
   set. Metric: AUROC and precision at #flipped for ranking flipped labels first.

Training objective convention (what ``ForwardInfConfig.weight_decay`` means)::

    J(theta) = mean_i CE(f_theta(x_i), y_i) + (weight_decay / 2) * ||theta||^2   (all parameters)

Every model here is trained with exactly that objective (see ``_common.objective``), and the
anchored rows pass the same ``weight_decay`` to the engine. Anchored mode's group influence is
the plain group fit (it measured best: mirrorinf/engine/anchored.py), so it has no row here.

Sign convention: positive score = proponent (LOO: removing the point raises the query's loss).
Engine and TracIn rows see the float32 copy of each model; the ground truth is float64 (convex).

Run:  python benchmarks/quality.py [--quick] [--seed 0] [--strict]
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    MlpRecipe,
    digits_split,
    exact_loo,
    flip_labels,
    lds_subsets,
    query_losses,
    tracin,
    train_logreg,
    train_mlp,
)

from mirrorinf import ForwardInf, ForwardInfConfig
from mirrorinf.metrics import (
    lds,
    loo_correlation,
    mislabel_auroc,
    precision_at_k,
)

LOGREG_WD = 1e-2
MLP_RECIPE = MlpRecipe(weight_decay=1e-3, lr=1e-2, steps=500)


@dataclass
class Row:
    """One method's result: metric values, wall time, and the engine's score-health report."""

    method: str
    values: dict[str, float] = field(default_factory=dict)
    seconds: float = float("nan")
    health: str = ""
    error: str | None = None


@dataclass
class Target:
    text: str
    ok: bool | None  # None = could not be evaluated (a row errored)
    detail: str


def _timed(fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def _health(fi: ForwardInf | None) -> str:
    rep = getattr(fi, "last_report", None)
    if rep is None:
        return ""
    out = (
        f"{rep.path}, steps={rep.steps}, lr={rep.lr_max:.3g}, "
        f"zeros={100 * rep.zero_fraction:.2f}%, const_q={rep.n_constant_queries}"
    )
    if getattr(rep, "stability", None) is not None:
        out += f", stability={rep.stability:.2f}"
    return out


def _engine_row(
    label: str,
    call: Callable[[ForwardInf], torch.Tensor],
    model: torch.nn.Module,
    config: ForwardInfConfig,
    metric: Callable[[torch.Tensor], dict[str, float]],
) -> Row:
    """Build the engine, run ``call`` (timed, including construction), score it with ``metric``."""
    row = Row(label)
    fi = None
    try:
        t0 = time.perf_counter()
        fi = ForwardInf(model, config=config)
        scores = call(fi)
        row.seconds = time.perf_counter() - t0
        if not torch.isfinite(scores).all():
            row.error = f"{int((~torch.isfinite(scores)).sum())} non-finite scores"
        else:
            row.values = metric(scores)
    except Exception as exc:  # report and carry on with the other rows
        traceback.print_exc(file=sys.stderr)
        row.error = f"{type(exc).__name__}: {exc}"
    row.health = _health(fi)
    return row


def _table(title: str, cols: list[str], rows: list[Row]) -> None:
    print(f"\n### {title}\n")
    print("| method | " + " | ".join(cols) + " | time (s) | engine report |")
    print("|" + "---|" * (len(cols) + 3))
    for r in rows:
        vals = ["ERROR"] * len(cols) if r.error else [f"{r.values[c]:.3f}" for c in cols]
        t = "" if np.isnan(r.seconds) else f"{r.seconds:.3f}"
        note = r.health if not r.error else f"{r.error[:120]}"
        print(f"| {r.method} | " + " | ".join(vals) + f" | {t} | {note} |")


def _get(rows: list[Row], prefix: str, col: str) -> float | None:
    for r in rows:
        if r.method.startswith(prefix) and not r.error:
            return r.values[col]
    return None


def _check(text: str, ok: Callable[..., bool], detail: str, *vals: float | None) -> Target:
    if any(v is None for v in vals):
        return Target(text, None, "not evaluated (row errored)")
    return Target(text, bool(ok(*vals)), detail.format(*vals))


# ---------------------------------------------------------------------------------- experiments


def convex(seed: int, n_query: int) -> tuple[list[Row], list[Target]]:
    sp = digits_split(500, n_query, seed=seed)
    t0 = time.perf_counter()
    model64 = train_logreg(sp.x_train, sp.y_train, LOGREG_WD)
    t_train = time.perf_counter() - t0
    loo, info = exact_loo(model64, sp.x_train, sp.y_train, sp.x_query, sp.y_query, LOGREG_WD)
    print(
        f"[convex] logreg 500 train / {n_query} queries, wd={LOGREG_WD}: trained in "
        f"{t_train:.2f}s (grad norm {model64.grad_norm:.1e}); exact LOO (500 retrains) in "
        f"{info['seconds']:.2f}s, worst LOO grad norm {info['max_grad_norm']:.1e}, "
        f"|LOO| median {loo.abs().median():.2e}"
    )
    model = model64.float()
    train = (sp.x_train.float(), sp.y_train)
    query = (sp.x_query.float(), sp.y_query)

    def metric(s: torch.Tensor) -> dict[str, float]:
        return loo_correlation(s, loo)

    rows = [
        _engine_row(
            "plain Forward-INF (default)",
            lambda fi: fi.pairwise(train, query),
            model,
            ForwardInfConfig(),
            metric,
        ),
        _engine_row(
            f"anchored Forward-INF (wd={LOGREG_WD})",
            lambda fi: fi.pairwise(train, query),
            model,
            ForwardInfConfig(mode="anchored", weight_decay=LOGREG_WD),
            metric,
        ),
    ]
    s, t = _timed(lambda: tracin(model, train, query))
    rows.append(Row("TracIn (last checkpoint)", metric(s), t))
    rng = np.random.default_rng(seed)
    rows.append(Row("random", metric(rng.normal(size=tuple(loo.shape))), 0.0))
    for r in rows:
        if r.values.get("n_skipped"):
            r.health += f" skipped_q={r.values['n_skipped']}"
    _table(
        f"Convex: logistic regression vs exact LOO (500 train, {n_query} queries)",
        ["spearman", "pearson"],
        rows,
    )
    plain, trac = _get(rows, "plain", "spearman"), _get(rows, "TracIn", "spearman")
    anch = _get(rows, "anchored", "spearman")
    targets = [
        _check(
            "convex: plain Spearman within 0.02 of TracIn",
            lambda a, b: abs(a - b) <= 0.02,
            "plain {:.3f} vs TracIn {:.3f}",
            plain,
            trac,
        ),
        _check(
            "convex: anchored LOO Spearman >= 0.97", lambda a: a >= 0.97, "anchored {:.3f}", anch
        ),
    ]
    return rows, targets


def nonconvex(seed: int, n_query: int, n_subsets: int) -> tuple[list[Row], list[Target]]:
    sp = digits_split(1000, n_query, seed=seed, dtype=torch.float32)
    t0 = time.perf_counter()
    model = train_mlp(sp.x_train, sp.y_train, init_seed=seed, recipe=MLP_RECIPE)
    t_train = time.perf_counter() - t0
    acc = float((model(sp.x_query).argmax(1) == sp.y_query).float().mean())
    masks, losses, t_sub = lds_subsets(
        sp.x_train,
        sp.y_train,
        sp.x_query,
        sp.y_query,
        n_subsets,
        frac=0.5,
        seed=seed + 1,
        init_seed=seed,
        recipe=MLP_RECIPE,
    )
    print(
        f"\n[non-convex] MLP 64-128-10, 1000 train / {n_query} queries, {MLP_RECIPE}: trained "
        f"in {t_train:.2f}s (grad norm {model.grad_norm:.1e}, query acc {acc:.3f}); "
        f"{n_subsets} retrains on 50% subsets in {t_sub:.1f}s"
    )
    train, query = (sp.x_train, sp.y_train), (sp.x_query, sp.y_query)

    def metric(s: torch.Tensor) -> dict[str, float]:
        return {"LDS": lds(s, masks, losses)}

    wd = MLP_RECIPE.weight_decay
    rows = [
        _engine_row(
            "plain Forward-INF (default)",
            lambda fi: fi.pairwise(train, query),
            model,
            ForwardInfConfig(),
            metric,
        ),
        _engine_row(
            f"anchored Forward-INF (wd={wd})",
            lambda fi: fi.pairwise(train, query),
            model,
            ForwardInfConfig(mode="anchored", weight_decay=wd),
            metric,
        ),
    ]
    s, t = _timed(lambda: tracin(model, train, query))
    rows.append(Row("TracIn (last checkpoint)", metric(s), t))
    rng = np.random.default_rng(seed)
    rows.append(Row("random", metric(rng.normal(size=(1000, n_query))), 0.0))
    _table(
        f"Non-convex: MLP LDS ({n_subsets} subsets of 50%, 1000 train, {n_query} queries)",
        ["LDS"],
        rows,
    )
    plain, trac, anch = (_get(rows, p, "LDS") for p in ("plain", "TracIn", "anchored"))
    targets = [
        _check(
            "MLP: plain LDS within 0.02 of TracIn",
            lambda a, b: abs(a - b) <= 0.02,
            "plain {:.3f} vs TracIn {:.3f}",
            plain,
            trac,
        ),
        _check(
            "MLP: anchored LDS >= TracIn + 0.15",
            lambda a, b: a >= b + 0.15,
            "anchored {:.3f} vs TracIn {:.3f} + 0.15",
            anch,
            trac,
        ),
    ]
    return rows, targets


def mislabel(seed: int) -> tuple[list[Row], list[Target]]:
    sp = digits_split(1200, 0, n_extra=200, seed=seed, dtype=torch.float32)
    y_noisy, flipped = flip_labels(sp.y_train, 0.10, seed=seed)
    t0 = time.perf_counter()
    model = train_mlp(sp.x_train, y_noisy, init_seed=seed, recipe=MLP_RECIPE)
    t_train = time.perf_counter() - t0
    train, val = (sp.x_train, y_noisy), (sp.x_extra, sp.y_extra)
    val_acc = float((model(sp.x_extra).argmax(1) == sp.y_extra).float().mean())
    print(
        f"\n[mislabel] MLP on 1200 train ({int(flipped.sum())} flipped), 200 clean validation: "
        f"trained in {t_train:.2f}s (grad norm {model.grad_norm:.1e}, val acc {val_acc:.3f})"
    )

    def metric(s: torch.Tensor) -> dict[str, float]:
        return {"AUROC": mislabel_auroc(s, flipped), "P@#flipped": precision_at_k(s, flipped)}

    cfg = ForwardInfConfig()
    rows = [
        _engine_row(
            "self-influence (default)", lambda fi: fi.self_influence(train), model, cfg, metric
        ),
        _engine_row(
            "group on clean val, -score (default)",
            lambda fi: -fi.group(train, val),
            model,
            cfg,
            metric,
        ),
    ]
    s, t = _timed(lambda: query_losses(model, *train))
    rows.append(Row("plain training loss", metric(s), t))
    rng = np.random.default_rng(seed)
    rows.append(Row("random", metric(rng.normal(size=len(flipped))), 0.0))
    _table("Mislabel detection (1200 train, 10% flipped)", ["AUROC", "P@#flipped"], rows)
    self_a, group_a, loss_a = (
        _get(rows, p, "AUROC")
        for p in ("self-influence", "group on clean val, -score (default)", "plain training loss")
    )
    targets = [
        _check("mislabel: group AUROC >= 0.95", lambda a: a >= 0.95, "group {:.3f}", group_a),
        _check(
            "mislabel: self-influence AUROC > training-loss AUROC",
            lambda a, b: a > b,
            "self {:.3f} vs loss {:.3f}",
            self_a,
            loss_a,
        ),
    ]
    return rows, targets


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--quick",
        action="store_true",
        help="fewer queries and subsets (20 convex / 40 MLP queries, 30 subsets)",
    )
    ap.add_argument("--seed", type=int, default=0, help="data split, init and label-flip seed")
    ap.add_argument("--strict", action="store_true", help="exit 1 if any target fails")
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    n_cq, n_mq, n_sub = (20, 40, 30) if args.quick else (50, 100, 50)
    print(
        f"# mirrorinf quality benchmark (digits, seed={args.seed}, "
        f"{'quick' if args.quick else 'full'}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads)"
    )
    t0 = time.perf_counter()
    targets: list[Target] = []
    for fn in (
        lambda: convex(args.seed, n_cq),
        lambda: nonconvex(args.seed, n_mq, n_sub),
        lambda: mislabel(args.seed),
    ):
        targets += fn()[1]
    print("\n### Targets\n")
    print("| target | result | status |\n|---|---|---|")
    for tg in targets:
        status = {True: "PASS", False: "FAIL", None: "ERROR"}[tg.ok]
        print(f"| {tg.text} | {tg.detail} | {status} |")
    print(f"\ntotal wall time {time.perf_counter() - t0:.1f}s")
    return 1 if args.strict and not all(tg.ok for tg in targets) else 0


if __name__ == "__main__":
    sys.exit(main())
