"""Quality per task kind: how well the gate's score (self-influence) and its calibrated flag find
planted bad targets, on data the defaults were not tuned on (scikit-learn generators and a
synthetic token task; the defaults were set on digits, breast cancer and wine classifiers).

For each kind and seed: a small model trained the usual way (Adam, some weight decay) on data
with 5% of the training targets corrupted (regression: replaced by far values; binary and
multilabel: flipped; sequence: the labels of a whole sequence replaced by random tokens), then
the engine's default plain mode, calibration on a clean validation set and ``summarise``'s
flags. Prints AUROC of self-influence against the planted rows, and the flag's recall and
precision. Run: ``python -m benchmarks.kinds`` (about a minute on two cores).

``--gate`` adds the gate per kind at 0%, 5% and 30% corruption: the flagged, harmful and exposed
fractions (exposed against the harmful_excess limit) and the seeds whose gate fails.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import numpy as np
import torch
from sklearn.datasets import make_classification, make_friedman1, make_multilabel_classification
from sklearn.metrics import roc_auc_score
from torch import nn

from mirrorinf import ForwardInf
from mirrorinf.calibration import calibration_scores
from mirrorinf.summary import GateThresholds, summarise

N_TRAIN, N_VAL, FRACTION = 400, 200, 0.05
GATE_FRACTIONS = (0.0, 0.05, 0.3)  # --gate: clean, the default corruption, heavy
Data = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, np.ndarray]


def _mlp(d_in: int, d_out: int) -> nn.Module:
    return nn.Sequential(nn.Linear(d_in, 32), nn.Tanh(), nn.Linear(32, d_out))


def _standard(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(((x - x.mean(0)) / x.std(0)).astype(np.float32))


def regression(seed: int) -> tuple[nn.Module, Data, Callable]:
    x, y = make_friedman1(N_TRAIN + N_VAL, n_features=10, noise=0.5, random_state=seed)
    y = (y - y.mean()) / y.std()
    rng = np.random.default_rng(seed)
    bad = rng.choice(N_TRAIN, int(FRACTION * N_TRAIN), replace=False)
    y_tr = y[:N_TRAIN].copy()
    y_tr[bad] += rng.choice([-1, 1], len(bad)) * rng.uniform(3, 5, len(bad))
    xt = _standard(x)
    data = (xt[:N_TRAIN], torch.tensor(y_tr, dtype=torch.float32), xt[N_TRAIN:],
            torch.tensor(y[N_TRAIN:], dtype=torch.float32), bad)  # fmt: skip
    return _mlp(10, 1), data, lambda o, t: nn.functional.mse_loss(o[:, 0], t)


def _flipped(x: np.ndarray, y: np.ndarray, seed: int, dtype: torch.dtype) -> Data:
    """Standardised features and 0/1 targets with FRACTION of the training rows flipped."""
    rng = np.random.default_rng(seed)
    bad = rng.choice(N_TRAIN, int(FRACTION * N_TRAIN), replace=False)
    y_tr = y[:N_TRAIN].copy()
    y_tr[bad] = 1 - y_tr[bad]
    xt = _standard(x)
    yt, yv = torch.tensor(y_tr, dtype=dtype), torch.tensor(y[N_TRAIN:], dtype=dtype)
    return xt[:N_TRAIN], yt, xt[N_TRAIN:], yv, bad


def binary(seed: int) -> tuple[nn.Module, Data, Callable]:
    x, y = make_classification(N_TRAIN + N_VAL, n_features=20, n_informative=8,
                               random_state=seed)  # fmt: skip

    def bce(o: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return nn.functional.binary_cross_entropy_with_logits(o[:, 0], t.float())

    return _mlp(20, 1), _flipped(x, y, seed, torch.int64), bce


def multilabel(seed: int) -> tuple[nn.Module, Data, Callable]:
    x, y = make_multilabel_classification(N_TRAIN + N_VAL, n_features=20, n_classes=5,
                                          random_state=seed)  # fmt: skip
    data = _flipped(x, y, seed, torch.float32)
    return _mlp(20, 5), data, nn.functional.binary_cross_entropy_with_logits


class _Tagger(nn.Module):
    """Per-token tagger: embedding, a context mix, logits per position [n, T, V]."""

    def __init__(self, vocab: int = 30, d: int = 16) -> None:
        super().__init__()
        self.emb, self.mix, self.out = nn.Embedding(vocab, d), nn.Linear(d, d), nn.Linear(d, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        return self.out(torch.tanh(h + self.mix(h.mean(dim=1, keepdim=True))))


def sequence(seed: int) -> tuple[nn.Module, Data, Callable]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 30, (N_TRAIN + N_VAL, 8), generator=gen)
    labels = (ids + 1) % 30  # the rule the tagger learns
    rng = np.random.default_rng(seed)
    bad = rng.choice(N_TRAIN, int(FRACTION * N_TRAIN), replace=False)
    y_tr = labels[:N_TRAIN].clone()
    y_tr[torch.from_numpy(bad)] = torch.randint(0, 30, (len(bad), 8), generator=gen)
    data = (ids[:N_TRAIN], y_tr, ids[N_TRAIN:], labels[N_TRAIN:], bad)
    return _Tagger(), data, lambda o, t: nn.functional.cross_entropy(o.transpose(1, 2), t)


KINDS = {"regression": regression, "binary": binary, "multilabel": multilabel,
         "sequence": sequence}  # fmt: skip


def run(kind: str, seed: int, steps: int = 300, fraction: float | None = None) -> dict[str, float]:
    """Train, score, flag; AUROC of self-influence vs planted rows, flag recall/precision, and
    the gate's fraction checks (``fraction``: corrupt this share instead of FRACTION)."""
    global FRACTION
    saved, FRACTION = FRACTION, FRACTION if fraction is None else fraction
    try:
        torch.manual_seed(seed)
        model, (x, y, xv, yv, bad), loss = KINDS[kind](seed)
    finally:
        FRACTION = saved
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        loss(model(x), y).backward()
        opt.step()
    model.eval()
    fi = ForwardInf(model, kind=kind)
    s_inf = fi.self_influence((x, y)).double().numpy()
    group = fi.group((x, y), (xv, yv)).double().numpy()
    assert fi.last_report is not None
    after = fi.last_report.loss_after_fit
    calib = calibration_scores(fi, (xv, yv))
    tables = summarise(np.zeros((len(y), 0)), s_inf, group, query_self_drop=np.zeros(0),
                       calib_self_inf=calib.self_influence,
                       calib_group_inf=calib.group_influence,
                       loss_after_fit=after, calib_loss_after_fit=calib.loss_after_fit)  # fmt: skip
    planted = np.zeros(len(y), dtype=bool)
    planted[bad] = True
    flagged = tables.train["flag_mislabel"].to_numpy(dtype=bool)
    c, th = tables.counts, GateThresholds()
    return {
        "flagged": c["flagged_fraction"],
        "harmful": c["harmful_fraction"],
        "exposed": c["exposed_fraction"],
        "exposed_limit": c["max_exposed_fraction"],
        "gate_fails": float(
            c["flagged_fraction"] > th.max_flagged_fraction
            or c["harmful_fraction"] > th.max_harmful_fraction
            or c["exposed_fraction"] > c["max_exposed_fraction"]
        ),
        "auroc": float(roc_auc_score(planted, s_inf)) if planted.any() else float("nan"),
        "recall": float((flagged & planted).sum() / max(1, planted.sum())),
        "precision": float((flagged & planted).sum() / max(1, flagged.sum())),
        "flagged_clean": float((flagged & ~planted).sum() / (~planted).sum()),
        "recall_defined": float(planted.any()),
    }


def main(seeds: tuple[int, ...] = (0, 1, 2)) -> None:
    print("| kind | AUROC (self-influence vs planted) | flag recall | flag precision | "
          "clean rows flagged |")  # fmt: skip
    print("|---|---|---|---|---|")
    for kind in KINDS:
        t0 = time.perf_counter()
        rows = [run(kind, s) for s in seeds]

        def span(key: str, rows: list[dict[str, float]] = rows) -> str:
            vals = [r[key] for r in rows]
            return f"{min(vals):.2f}-{max(vals):.2f}"

        print(f"| {kind} | {span('auroc')} | {span('recall')} | {span('precision')} | "
              f"{span('flagged_clean')} |  ({time.perf_counter() - t0:.0f}s)")  # fmt: skip


def gate_table(
    seeds: tuple[int, ...] = (0, 1, 2), fractions: tuple[float, ...] = GATE_FRACTIONS
) -> None:
    """The gate per kind at clean, default and heavy corruption: flagged / harmful / exposed
    fractions (exposed against the harmful_excess limit, mean over seeds) and the seeds whose
    gate fails (any of the three fraction checks)."""
    print()
    print(
        "| kind | "
        + " | ".join(f"{f:.0%}: flagged, harmful, exposed / limit, gate fails" for f in fractions)
        + " |"
    )
    print("|---|" + "---|" * len(fractions))
    for kind in KINDS:
        cells = []
        for f in fractions:
            rows = [run(kind, s, fraction=f) for s in seeds]
            m = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
            fails = int(sum(r["gate_fails"] for r in rows))
            cells.append(f"{m['flagged']:.3f}, {m['harmful']:.3f}, {m['exposed']:.3f} / "
                         f"{m['exposed_limit']:.3f}, {fails} of {len(rows)}")  # fmt: skip
        print(f"| {kind} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
    if "--gate" in sys.argv:
        gate_table()
