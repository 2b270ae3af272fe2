"""The embedded demo: scikit-learn's bundled digits with planted label noise and leaks.

``make_demo`` builds standardised train / validation / query splits, flips a fraction of the
training labels and makes some query points exact copies of (clean) training images, and keeps
the planted ids as ground truth so the pipeline's findings can be scored. ``DemoMLP`` is the small
demo model, registered by architecture name so it can be rebuilt from a state_dict alone (no
pickle), and ``train_demo_model`` trains it deterministically on CPU in about a second.

Pure numpy + torch (+ scikit-learn for the bundled data); no orchestration imports.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = [
    "ARCHITECTURES",
    "DEMO_ARCH",
    "DemoData",
    "DemoMLP",
    "Split",
    "build_model",
    "evaluate_findings",
    "make_demo",
    "model_spec",
    "train_demo_model",
]

DEMO_ARCH = "mirrorinf-demo-mlp"
N_CLASSES = 10


@dataclass(frozen=True)
class Split:
    """One split: features [n, d] float32, integer labels [n], integer ids [n]."""

    x: np.ndarray
    y: np.ndarray
    ids: np.ndarray


@dataclass(frozen=True)
class DemoData:
    """Demo splits plus what was planted in them.

    Attributes:
        flipped_ids: training ids whose label was changed.
        original_labels: the true labels of ``flipped_ids`` (same order).
        leak_pairs: [n_leaks, 2] rows (query id, training id) of exact duplicates.
    """

    train: Split
    val: Split
    query: Split
    flipped_ids: np.ndarray
    original_labels: np.ndarray
    leak_pairs: np.ndarray

    def ground_truth(self) -> dict[str, Any]:
        """JSON-ready ground truth (what the pipeline should find)."""
        return {
            "flipped_ids": [int(i) for i in self.flipped_ids],
            "original_labels": [int(i) for i in self.original_labels],
            "leak_pairs": [[int(q), int(t)] for q, t in self.leak_pairs],
        }


def make_demo(
    n_train: int = 800,
    n_val: int = 200,
    n_query: int = 40,
    flip_fraction: float = 0.1,
    n_leaks: int = 5,
    seed: int = 0,
) -> DemoData:
    """Build the digits demo.

    Features are standardised with the training split's per-pixel mean and std (constant pixels
    keep std 1). ``round(flip_fraction * n_train)`` training labels move to a random other class.
    ``n_leaks`` query points are exact copies (image and true label) of training points whose
    label was not flipped; ids of leak queries start after the digits row indices, all other ids
    are the row index in ``sklearn.datasets.load_digits``. Deterministic in ``seed``.
    """
    from sklearn.datasets import load_digits  # slow import; only the demo needs it

    digits = load_digits()
    x_all = digits.data.astype(np.float64)
    y_all = digits.target.astype(np.int64)
    n_all = len(y_all)
    n_fresh = n_query - n_leaks
    if min(n_train, n_val, n_query) < 1 or not 0 <= n_leaks <= min(n_query, n_train):
        raise ValueError(
            f"invalid demo sizes: n_train={n_train}, n_val={n_val}, n_query={n_query}, "
            f"n_leaks={n_leaks}"
        )
    if n_train + n_val + n_fresh > n_all:
        raise ValueError(f"n_train + n_val + n_query - n_leaks exceeds the {n_all} digits images")
    if not 0.0 <= flip_fraction < 1.0:
        raise ValueError(f"flip_fraction must be in [0, 1), got {flip_fraction}")

    rng = np.random.default_rng(seed)
    perm = rng.permutation(n_all)
    tr, va = perm[:n_train], perm[n_train : n_train + n_val]
    qu = perm[n_train + n_val : n_train + n_val + n_fresh]

    mean = x_all[tr].mean(axis=0)
    std = x_all[tr].std(axis=0)
    std[std == 0] = 1.0
    x_std = ((x_all - mean) / std).astype(np.float32)

    y_train = y_all[tr].copy()
    n_flip = round(flip_fraction * n_train)
    flip_pos = np.sort(rng.choice(n_train, size=n_flip, replace=False))
    original = y_train[flip_pos].copy()
    y_train[flip_pos] = (original + rng.integers(1, N_CLASSES, size=n_flip)) % N_CLASSES

    clean_pos = np.setdiff1d(np.arange(n_train), flip_pos)
    leak_pos = np.sort(rng.choice(clean_pos, size=n_leaks, replace=False))
    leak_ids = n_all + np.arange(n_leaks, dtype=np.int64)

    qx = np.concatenate([x_std[qu], x_std[tr][leak_pos]])
    qy = np.concatenate([y_all[qu], y_train[leak_pos]])
    qids = np.concatenate([qu.astype(np.int64), leak_ids])
    order = rng.permutation(n_query)

    return DemoData(
        train=Split(x_std[tr], y_train, tr.astype(np.int64)),
        val=Split(x_std[va], y_all[va].copy(), va.astype(np.int64)),
        query=Split(qx[order], qy[order], qids[order]),
        flipped_ids=tr[flip_pos].astype(np.int64),
        original_labels=original,
        leak_pairs=np.stack([leak_ids, tr[leak_pos].astype(np.int64)], axis=1).reshape(-1, 2),
    )


class DemoMLP(nn.Module):
    """One-hidden-layer ReLU MLP: the demo model (64 -> hidden -> 10 on digits)."""

    def __init__(self, in_features: int = 64, hidden: int = 64, n_classes: int = N_CLASSES):
        super().__init__()
        self.in_features, self.hidden, self.n_classes = in_features, hidden, n_classes
        self.net = nn.Sequential(
            nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, n_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def spec(self) -> dict[str, Any]:
        """Architecture name and constructor arguments: enough to rebuild it."""
        return {
            "arch": DEMO_ARCH,
            "in_features": self.in_features,
            "hidden": self.hidden,
            "n_classes": self.n_classes,
        }


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {DEMO_ARCH: DemoMLP}


def model_spec(model: nn.Module) -> dict[str, Any] | None:
    """The rebuild spec of a model from :data:`ARCHITECTURES`, or None for any other model."""
    spec = getattr(model, "spec", None)
    return spec() if callable(spec) else None


def build_model(spec: dict[str, Any]) -> nn.Module:
    """Rebuild an untrained model from a spec ``{"arch": name, **kwargs}``.

    Raises:
        ValueError: unknown architecture name or arguments it does not take.
    """
    kwargs = dict(spec)
    arch = kwargs.pop("arch", None)
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")
    try:
        return ARCHITECTURES[arch](**kwargs)
    except TypeError as err:
        raise ValueError(f"bad arguments for architecture {arch!r}: {err}") from None


def train_demo_model(
    x: torch.Tensor | np.ndarray,
    y: torch.Tensor | np.ndarray,
    *,
    hidden: int = 64,
    epochs: int = 150,
    lr: float = 0.01,
    weight_decay: float = 0.01,
    seed: int = 0,
    n_classes: int | None = None,
    threads: int | None = 1,
) -> tuple[DemoMLP, dict[str, float]]:
    """Train the demo MLP with full-batch Adam on CPU; deterministic in ``seed``.

    Full batch keeps it deterministic and fast (150 steps on 800 x 64 take well under a second).
    ``threads`` caps torch's CPU threads while training (restored after): the model is tiny, and
    on busy shared cores more threads made it 50x slower here; None leaves torch's setting.
    Returns the model in eval mode and a few training facts (final loss, accuracy, seconds).
    """
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _train(x, y, hidden, epochs, lr, weight_decay, seed, n_classes)
    finally:
        torch.set_num_threads(before)


def _train(
    x: torch.Tensor | np.ndarray,
    y: torch.Tensor | np.ndarray,
    hidden: int,
    epochs: int,
    lr: float,
    weight_decay: float,
    seed: int,
    n_classes: int | None,
) -> tuple[DemoMLP, dict[str, float]]:
    t0 = time.perf_counter()
    xt = torch.as_tensor(np.asarray(x), dtype=torch.float32)
    yt = torch.as_tensor(np.asarray(y), dtype=torch.long)
    if xt.ndim != 2 or yt.ndim != 1 or len(xt) != len(yt):
        raise ValueError(f"need x [n, d] and y [n], got {tuple(xt.shape)} and {tuple(yt.shape)}")
    k = int(n_classes) if n_classes is not None else max(N_CLASSES, int(yt.max()) + 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DemoMLP(xt.shape[1], hidden, k)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in range(epochs):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(xt), yt)
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        logits = model(xt)
        final = float(loss_fn(logits, yt))
        acc = float((logits.argmax(1) == yt).float().mean())
    return model, {
        "final_loss": final,
        "train_accuracy": acc,
        "train_seconds": time.perf_counter() - t0,
    }


def evaluate_findings(
    train_ids: Any,
    self_influence: Any,
    flagged_ids: Any,
    scored_query_ids: Any,
    leaks: Any,
    truth: dict[str, Any],
) -> dict[str, float]:
    """How well the findings recover planted ground truth (flipped labels, leaks).

    Args:
        train_ids, self_influence: per training example, in the same order.
        flagged_ids: training ids flagged as suspected mislabels.
        scored_query_ids: ids of the queries that were scored (leaks outside them are not
            counted).
        leaks: (query id, training id) pairs reported as suspected leaks.
        truth: :meth:`DemoData.ground_truth` (``flipped_ids``, ``leak_pairs``).

    Returns (keys present only when the truth has something to find):
        mislabel_recall_at_k: flipped ids among the k = #flipped highest self-influences,
            over #flipped (equal to precision at k; random ranking gives the flip fraction);
        mislabel_auroc; flagged_recall / flagged_precision of the mislabel flags;
        leak_recall (planted pairs reported with the right training id) and leak_precision.
    """
    from mirrorinf.metrics import mislabel_auroc

    ids = np.asarray(train_ids)
    scores = np.asarray(self_influence, dtype=np.float64)
    flipped = set(int(i) for i in truth.get("flipped_ids", []))
    out: dict[str, float] = {}
    if flipped:
        is_flipped = np.isin(ids, list(flipped))
        k = int(is_flipped.sum())
        if 0 < k < len(ids):
            top = np.argsort(-np.nan_to_num(scores, nan=-np.inf), kind="stable")[:k]
            out["mislabel_recall_at_k"] = float(is_flipped[top].mean())
            out["mislabel_auroc"] = float(mislabel_auroc(np.nan_to_num(scores), is_flipped))
        flagged = set(int(i) for i in np.asarray(flagged_ids).ravel())
        hit = len(flagged & flipped)
        out["flagged_recall"] = hit / len(flipped)
        out["flagged_precision"] = hit / len(flagged) if flagged else 0.0
    scored = set(int(q) for q in np.asarray(scored_query_ids).ravel())
    planted = {(int(q), int(t)) for q, t in truth.get("leak_pairs", []) if int(q) in scored}
    found = {(int(q), int(t)) for q, t in leaks}
    if planted:
        out["leak_recall"] = len(planted & found) / len(planted)
    if found:
        out["leak_precision"] = len(planted & found) / len(found)
    return out
