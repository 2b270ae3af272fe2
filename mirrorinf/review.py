"""Review artifacts of one influence analysis: PNG plots and a short markdown report.

Pure numpy / pandas / matplotlib (``matplotlib.figure.Figure`` on the Agg canvas, never pyplot's
global state, so it is safe in worker threads). :func:`write_report` writes, under a folder:

- ``plots/self_influence.png``: histogram of self-influence (log x), mislabel threshold marked;
- ``plots/group_influence.png``: group influence on the validation set, helpful vs harmful,
  harmful threshold marked (symmetric-log x: scores span orders of magnitude on both sides);
- ``plots/top_harmful.png``: ranked bars of the most harmful training examples;
- ``plots/mislabels.png``: the top suspected mislabels (given label, predicted label, score);
- ``plots/leaks.png``: each suspected leak, query next to the training example;
- ``plots/query_influence.png``: for a few queries, their top proponents and opponents;
- ``report.md``: what was found, why the gate decided as it did, links to the tables;
- ``checks/gx_result.md``: the gate checks as a table.

Image inputs ``[n, C, H, W]`` with 1 or 3 channels (an image folder) are drawn as images (RGB
in colour; the loader's ``data.image`` mean/std normalisation undone exactly when it is given,
``ReviewInputs.image_norm``, else each channel min-max scaled over the training set; clipped to
[0, 1]); so are rows whose feature count is a square
(64 -> 8x8, grayscale). Other (tabular) rows are a one-row heat strip of their features, and
the report lists their first feature values. Each gallery (mislabels, leaks, query
influence) is one mosaic: the examples' pixels tiled into one RGB array at the PNG's resolution
(images at an integer zoom) with the titles laid over it, not a matplotlib axes per example.
Labels show their class names when the source has them (image folders: the class folder
names). Token inputs (``train_text`` / ``query_text``
set: decoded by the model's tokenizer, else the ids) are shown as text, in the plots, the report
and the flagged table; for a sequence model the predicted tokens (``pred_text``: for a causal LM
the predicted next tokens) beside them.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import matplotlib
import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.image import imsave
from matplotlib.ticker import NullLocator

from mirrorinf.summary import (
    InfluenceTables,
    flag_rule_masks,
    flag_rules,
    head_positions,
    ranked_rows,
    suspect_noun,
    target_labels,
)
from mirrorinf.text import markdown_code, markdown_inline, printable

__all__ = [
    "PLOTS",
    "ReviewInputs",
    "checks_markdown",
    "image_scale",
    "image_shape",
    "normalisation_scale",
    "write_report",
]

PLOTS = (
    "self_influence.png",
    "group_influence.png",
    "top_harmful.png",
    "mislabels.png",
    "leaks.png",
    "query_influence.png",
)
TABLES = {
    "top_k_per_query": "tables/top_k_per_query.json",
    "flagged_train": "tables/flagged_train.json",
    "leaks": "tables/leaks_table.json",
}
_RED, _GREEN, _GREY, _ORANGE = "#c0392b", "#27ae60", "#95a5a6", "#e67e22"
_DPI = 90
_SHOWN_FEATURES = 8  # feature values listed per tabular row in the report


class Rows(Protocol):
    """Rows indexable like a numpy array (``rows[i]``, ``rows[positions]``, ``rows[a:b]``): an
    array, or a view that reads or decodes only the rows indexed (the review shows a few)."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: Any) -> Any: ...


class FeatureRows(Rows, Protocol):
    """:class:`Rows` of flattened features, with their array attributes."""

    shape: tuple[int, ...]
    ndim: int
    dtype: Any


@dataclass
class ReviewInputs:
    """What the report needs besides the tables (arrays in file order, numpy).

    ``train_pred`` are the model's predicted labels of the training examples (None: unknown);
    ``checks`` the gate results (``CheckResult.results``: check, success, observed, threshold).
    """

    tables: InfluenceTables
    train_x: FeatureRows  # [n, features]: an array, or a view reading only the rows indexed
    query_x: FeatureRows
    query_ids: np.ndarray
    query_labels: np.ndarray
    train_pred: np.ndarray | None
    checks: list[dict[str, Any]]
    verdict: str
    reasons: list[str]
    title: str = "Influence review"
    kind: str = "classification"  # the task kind: names flags (suspect targets) and predictions
    n_queries_shown: int = 4
    n_gallery: int = 16
    scale: tuple[np.ndarray, np.ndarray] | None = None  # display scaling; set by write_report
    x_shape: tuple[int, ...] | None = None  # one example's input shape before flattening
    class_names: Sequence[str] | None = None  # class name by label index (image folders)
    train_text: Rows | None = None  # token inputs as text, one string per row
    query_text: Rows | None = None
    pred_text: Rows | None = None  # sequence: the predicted tokens as text, per row
    # image inputs: the (mean, std) per channel they were normalised with (data.image), undone
    # for display; None: each channel min-max scaled
    image_norm: tuple[Sequence[float] | None, Sequence[float] | None] | None = None


def image_shape(n_features: int, x_shape: Sequence[int] | None = None) -> tuple[int, ...] | None:
    """How to draw a row as an image: (C, H, W) for 1- or 3-channel image inputs of at least
    4x4, (side, side) when the features form a square of at least 4x4, else None."""
    if x_shape is not None and len(x_shape) == 3:
        c, h, w = x_shape
        return (c, h, w) if c in (1, 3) and min(h, w) >= 4 else None
    side = math.isqrt(n_features)
    return (side, side) if side * side == n_features and side >= 4 else None


def channel_scale(x: FeatureRows, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (low, span) over the training set, spread to every feature: images keep
    their colours while a per-channel mean/std normalisation is undone."""
    low, high = _finite_range(x, (0, 2), shape[0], row_shape=(shape[0], -1))
    span = np.where(high - low > 1e-12, high - low, np.inf)
    spread = np.repeat(np.arange(shape[0]), shape[1] * shape[2])
    return low[spread], span[spread]


def normalisation_scale(
    mean: Sequence[float] | None, std: Sequence[float] | None, shape: tuple[int, int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """(low, span) per feature that undo ``(x - mean) / std`` per channel: pixels back in
    [0, 1] as decoded (a missing mean is 0, a missing std 1)."""
    c = shape[0]
    m = np.zeros(c) if mean is None else np.asarray(mean, dtype=float)
    s = np.ones(c) if std is None else np.asarray(std, dtype=float)
    spread = np.repeat(np.arange(c), shape[1] * shape[2])
    return (-m / s)[spread], (1.0 / s)[spread]


def image_scale(inp: ReviewInputs, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """How rows are scaled for display: the configured normalisation undone (colour images
    with ``image_norm``), else min-max per channel (images) or per feature (square rows)."""
    if len(shape) == 3:
        c, h, w = shape
        norm = inp.image_norm
        if norm is not None and all(v is None or len(v) == c for v in norm):
            return normalisation_scale(norm[0], norm[1], (c, h, w))
        return channel_scale(inp.train_x, (c, h, w))
    return display_scale(inp.train_x)


def _label(inp: ReviewInputs, value: Any) -> str:
    """A label for a title: with its class name when the source names classes."""
    names = inp.class_names
    text = _fmt(value)
    if names is not None and text.isdigit() and int(text) < len(names):
        return f"{text} {names[int(text)]}"
    return text


def _fmt(value: Any) -> str:
    if isinstance(value, (float, np.floating)):
        return "n/a" if not math.isfinite(value) else f"{value:.3g}"
    return str(value)


def _figure(width: float, height: float) -> Figure:
    """A figure on the Agg canvas laid out by constrained layout (so saving draws it once:
    no second, "tight" bounding-box pass)."""
    return Figure(figsize=(width, height), layout="constrained")


def _save(fig: Figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=_DPI)


def display_scale(x: FeatureRows) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature (low, span) over the training set, for drawing rows as images.

    Features are often standardised per pixel, which makes raw images unreadable; min-max per
    feature undoes any per-feature affine scaling (exactly, when each pixel reaches its range).
    """
    low, high = _finite_range(x, (0,), x.shape[1])
    span = high - low
    return low, np.where(span > 1e-12, span, np.inf)


def _finite_range(
    x: FeatureRows, axes: tuple[int, ...], k: int, row_shape: tuple[int, ...] = (-1,)
) -> tuple[np.ndarray, np.ndarray]:
    """(min, max) of the finite values of ``x`` (each row as ``row_shape``) over ``axes`` (row
    axis first), in row blocks of ~16 MB: the training features (memory-mapped, or read by a
    lazy view) are never held whole. A feature with no finite value gets 0 (and 1 when the
    set is empty)."""
    if not len(x):
        return np.zeros(k), np.ones(k)
    step = max(1, (16 << 20) // max(1, np.asarray(x[:1]).nbytes * 2))
    dtype = x.dtype if np.dtype(x.dtype).kind == "f" else np.dtype(np.float64)
    low, high = np.full(k, np.inf, dtype), np.full(k, -np.inf, dtype)
    for start in range(0, len(x), step):
        block = np.asarray(x[start : start + step], dtype=dtype)
        block = block.reshape(len(block), *row_shape)
        finite = np.isfinite(block)
        low = np.minimum(low, np.where(finite, block, np.inf).min(axis=axes))
        high = np.maximum(high, np.where(finite, block, -np.inf).max(axis=axes))
    return np.where(np.isfinite(low), low, 0.0), np.where(np.isfinite(high), high, 0.0)


def _tile_pixels(
    row: np.ndarray,
    shape: tuple[int, ...] | None,
    scale: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """One example as RGB pixels in [0, 1] (``[h, w, 3]``): an image when ``shape`` is set
    (channels first: RGB in colour, one channel in gray; a square row in reversed gray), else a
    one-row heat strip of its features (coolwarm, symmetric around 0). Missing values are white.
    Without ``scale`` a gray image is min-max scaled on its own (as imshow would)."""
    row = np.asarray(row, dtype=np.float64)
    if shape is None:
        lim = float(np.nanmax(np.abs(row))) if np.isfinite(row).any() else 0.0
        rgb = colormaps["coolwarm"](np.clip((row / (lim or 1.0) + 1) / 2, 0, 1))[None, :, :3]
        rgb[0, ~np.isfinite(row)] = 1.0
        return rgb
    img = row if scale is None else np.clip((row - scale[0]) / scale[1], 0, 1)
    if len(shape) == 3 and shape[0] == 3:  # RGB
        pic = img.reshape(shape).transpose(1, 2, 0)
        return np.where(np.isfinite(pic), np.clip(pic, 0, 1), 1.0)
    gray = img.reshape(shape[-2:])
    finite = np.isfinite(gray)
    if scale is None and finite.any():
        low, high = gray[finite].min(), gray[finite].max()
        gray = (gray - low) / (high - low) if high > low else np.zeros_like(gray)
    gray = gray if len(shape) == 3 else 1.0 - gray  # one channel: gray; a square row: gray_r
    return np.repeat(np.where(finite, gray, 1.0)[..., None], 3, axis=-1)


@dataclass(frozen=True)
class _Tile:
    """A gallery cell: training (``split`` "train") or query example ``pos`` under ``title``."""

    split: str
    pos: int
    title: str
    color: str = "black"


Box = tuple[int, int, int, int]  # (top, left, bottom, right) in the saved PNG's pixels
Placed = list[tuple[str, int, Box]]  # (split, row position, box) of each tile drawn


def _gallery(
    inp: ReviewInputs,
    shape: tuple[int, ...] | None,
    grid: Sequence[Sequence[_Tile | None]],
    cell: tuple[float, float],
    title: str,
    path: Path,
    fontsize: float = 7.0,
) -> Placed:
    """Draw a grid of examples as one mosaic: their pixels (images, heat strips) tiled into
    one RGB array at the PNG's own resolution and drawn by a single imshow; titles, feature
    values and token text are text on the same axes. ``cell`` is (width, height) in inches of
    one tile's box; each grid row gets a title band as high as its longest title. Returns where
    each tile was drawn (its pixels at integer zoom: 1 input pixel = a block of PNG pixels)."""
    px = _DPI
    pad, top = round(0.12 * px), round(0.45 * px)
    cw, ch = round(cell[0] * px), round(cell[1] * px)
    line = fontsize * 1.4 / 72 * px
    bands = [
        round(max((t.title.count("\n") + 1 for t in r if t is not None), default=0) * line) + 4
        for r in grid
    ]
    cols = max((len(r) for r in grid), default=1)
    width = max(cols * (cw + pad) + pad, round(4 * px))
    height = top + sum(b + ch + pad for b in bands) + pad
    canvas = np.ones((height, width, 3))
    texts: list[tuple[float, float, str, dict[str, Any]]] = [
        (width / 2, top / 2, title, {"fontsize": 10, "ha": "center", "va": "center"})
    ]
    placed: Placed = []
    y = top
    for r, band in zip(grid, bands, strict=True):
        y += band
        for c, tile in enumerate(r):
            if tile is None:
                continue
            left = pad + c * (cw + pad)
            box = _place(canvas, inp, shape, tile, (y, left, y + ch, left + cw), texts)
            placed.append((tile.split, tile.pos, box))
            texts.append(((box[1] + box[3]) / 2, box[0] - 3, tile.title,
                          {"fontsize": fontsize, "color": tile.color, "ha": "center",
                           "va": "bottom", "linespacing": 1.25}))  # fmt: skip
        y += ch + pad
    fig = Figure(figsize=((width + 0.5) / px, (height + 0.5) / px), dpi=px)
    fig.patch.set_alpha(0.0)  # the text alone, laid over the canvas below
    ax = fig.add_axes((0, 0, 1, 1))  # axes in the canvas' pixel coordinates
    ax.axis("off")
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    for x, ty, s, kw in texts:
        ax.text(x, ty, s, **kw)
    agg = FigureCanvasAgg(fig)
    agg.draw()
    ink = np.asarray(agg.buffer_rgba())[:height, :width] / 255.0  # straight (not premultiplied)
    alpha = ink[..., 3:]
    canvas = canvas * (1 - alpha) + ink[..., :3] * alpha
    path.parent.mkdir(parents=True, exist_ok=True)
    imsave(path, (canvas * 255).round().astype(np.uint8), dpi=px)
    return placed


def _place(
    canvas: np.ndarray,
    inp: ReviewInputs,
    shape: tuple[int, ...] | None,
    tile: _Tile,
    cell: Box,
    texts: list[tuple[float, float, str, dict[str, Any]]],
) -> Box:
    """Write one example into ``canvas`` inside ``cell`` (framed in black, centred at the top)
    and queue its text; return the box its pixels fill."""
    top, left, bottom, right = cell
    text = inp.train_text if tile.split == "train" else inp.query_text
    if text is not None:  # tokens: their text in a frame
        box = cell
        shown = "\n".join(textwrap.wrap(str(text[tile.pos]), 48)[:4]) or "(empty)"
        texts.append((left + 4, (top + bottom) / 2, shown, {"fontsize": 6, "va": "center"}))
    else:
        row = (inp.train_x if tile.split == "train" else inp.query_x)[tile.pos]
        pix = _tile_pixels(row, shape, inp.scale)
        h, w = pix.shape[:2]
        if shape is None:  # a heat strip fills the cell
            box = cell
        else:  # an image at integer zoom (or shrunk to fit), centred
            zoom = min((bottom - top) / h, (right - left) / w)
            zoom = math.floor(zoom) if zoom >= 1 else zoom
            th, tw = max(1, round(h * zoom)), max(1, round(w * zoom))
            x0 = left + (right - left - tw) // 2
            box = (top, x0, top + th, x0 + tw)
        th, tw = box[2] - box[0], box[3] - box[1]
        canvas[box[0] : box[2], box[1] : box[3]] = pix[
            (np.arange(th) * h // th)[:, None], (np.arange(tw) * w // tw)[None, :]
        ]
        if shape is None and w <= 10:
            for j, v in enumerate(row):
                x = box[1] + (j + 0.5) * tw / w
                texts.append((x, (box[0] + box[2]) / 2, f"{v:.2g}",
                              {"fontsize": 6, "ha": "center", "va": "center"}))  # fmt: skip
    t, le, b, ri = box
    canvas[t - 1, le - 1 : ri + 1] = canvas[b, le - 1 : ri + 1] = 0.0  # the frame
    canvas[t - 1 : b + 1, le - 1] = canvas[t - 1 : b + 1, ri] = 0.0
    return box


def _empty(path: Path, title: str, text: str) -> None:
    fig = _figure(5, 1.6)
    ax = fig.subplots()
    ax.axis("off")
    ax.set_title(title)
    ax.text(0.5, 0.4, text, ha="center", va="center", fontsize=11)
    _save(fig, path)


def plot_self_influence(train: pd.DataFrame, counts: dict[str, Any], path: Path) -> None:
    """Histogram of self-influence (log x), flagged examples stacked in red, threshold line."""
    s = train["self_influence"].to_numpy(dtype=float)
    flag = train["flag_mislabel"].to_numpy(dtype=bool)
    pos = np.isfinite(s) & (s > 0)
    fig = _figure(7, 3.6)
    ax = fig.subplots()
    if pos.any():
        lo, hi = s[pos].min(), s[pos].max()
        bins = np.geomspace(lo, hi * 1.0001, 40) if hi > lo else np.array([lo * 0.9, lo * 1.1])
        ax.hist(
            [s[pos & ~flag], s[pos & flag]],
            bins=bins,
            stacked=True,
            color=[_GREY, _RED],
            label=[
                f"not flagged ({int((pos & ~flag).sum())})",
                f"flagged ({int(flag.sum())}; left of the line: harmful and atypical)",
            ],
        )
        ax.set_xscale("log")
    thr = counts.get("mislabel_threshold", float("nan"))
    if isinstance(thr, float) and math.isfinite(thr) and thr > 0:
        alpha = counts.get("mislabel_alpha_eff", float("nan"))
        ax.axvline(thr, color="k", ls="--", label=f"flag threshold {thr:.3g} (alpha {alpha:.2g})")
    n_bad = int((~pos).sum())
    note = f"; {n_bad} non-positive or non-finite not shown" if n_bad else ""
    ax.set_title(f"Self-influence of {len(s)} training examples{note}", fontsize=10)
    ax.set_xlabel("self-influence (log scale; large = atypical / hard to fit)")
    ax.set_ylabel("training examples")
    ax.legend(fontsize=8)
    _save(fig, path)


def _group_threshold(counts: dict[str, Any]) -> float:
    """The harmful flag's threshold on the group-influence scale (NaN when the flag thresholds
    the loss after the validation fit instead, or has no threshold)."""
    thr = counts.get("harmful_threshold", float("nan"))
    if counts.get("harmful_by_loss_after_fit") or not isinstance(thr, float):
        return float("nan")
    return thr


def plot_group_influence(train: pd.DataFrame, counts: dict[str, Any], path: Path) -> None:
    """Group influence on the validation set: helpful, harmful-but-not-flagged, flagged."""
    g = train["group_influence"].to_numpy(dtype=float)
    flag = train["flag_harmful"].to_numpy(dtype=bool)
    ok = np.isfinite(g)
    fig = _figure(7, 3.6)
    ax = fig.subplots()
    if ok.any():
        mags = np.abs(g[ok & (g != 0)])
        lin = float(np.quantile(mags, 0.02)) if len(mags) else 1.0
        hi = float(np.abs(g[ok]).max()) or 1.0
        edges = np.geomspace(lin, hi * 1.0001, 25) if hi > lin else np.array([lin, hi * 1.01])
        bins = np.unique(np.concatenate([-edges[::-1], [0.0], edges]))
        groups = [g[ok & (g >= 0)], g[ok & (g < 0) & ~flag], g[ok & flag]]
        labels = [
            f"helpful ({len(groups[0])})",
            f"harmful, not flagged ({len(groups[1])})",
            f"harmful, flagged ({len(groups[2])})",
        ]
        ax.hist(groups, bins=bins, stacked=True, color=[_GREEN, _ORANGE, _RED], label=labels)
        ax.set_xscale("symlog", linthresh=lin, linscale=0.5)
        decades = 10.0 ** np.arange(math.ceil(math.log10(lin)) + 1, math.ceil(math.log10(hi)) + 1)
        ax.set_xticks(np.concatenate([-decades[::-1], [0.0], decades]))
        ax.xaxis.set_minor_locator(NullLocator())
    thr = _group_threshold(counts)
    if math.isfinite(thr):
        ax.axvline(thr, color="k", ls="--", label=f"harmful threshold {thr:.3g}")
    ax.axvline(0.0, color=_GREY, lw=0.8)
    ax.set_title("Influence of each training example on the validation set", fontsize=10)
    ax.set_xlabel("group influence (symlog; < 0 hurts held-out performance)")
    ax.set_ylabel("training examples")
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_top_harmful(
    train: pd.DataFrame,
    counts: dict[str, Any],
    path: Path,
    pred: np.ndarray | None = None,
    n: int = 20,
    text: Rows | None = None,
) -> None:
    """Ranked horizontal bars of the most negative group influence (flagged in red); rows are
    named by id, label and prediction, or by id and the start of their ``text`` (tokens)."""
    g = train["group_influence"].to_numpy()
    with np.errstate(invalid="ignore"):
        hurts = np.flatnonzero(g < 0)
    worst = train.iloc[head_positions(g, n, ascending=True, rows=hurts, stable=True)]
    if worst.empty:
        _empty(path, "Most harmful training examples", "no training example hurts validation")
        return
    fig = _figure(7, 1.0 + 0.28 * len(worst))
    ax = fig.subplots()
    names = []
    for pos, row in worst.iterrows():
        if text is not None:
            shown = printable(text[pos])
            names.append(
                f"id {printable(row['id'])}: {shown[:40]}{'...' if len(shown) > 40 else ''}"
            )
            continue
        extra = "" if pred is None else f", pred {pred[pos]}"
        names.append(f"id {printable(row['id'])} (label {row['label']}{extra})")
    colors = [_RED if f else _ORANGE for f in worst["flag_harmful"]]
    ax.barh(range(len(worst)), -worst["group_influence"].to_numpy(dtype=float), color=colors)
    ax.set_yticks(range(len(worst)), names, fontsize=8)
    ax.invert_yaxis()
    thr = _group_threshold(counts)
    if math.isfinite(thr) and thr < 0:
        ax.axvline(-thr, color="k", ls="--", label=f"flag threshold {-thr:.3g}")
        ax.legend(fontsize=8, loc="lower right")
    ax.set_xlabel("harm = -(group influence on the validation set)")
    ax.set_title(f"{len(worst)} most harmful training examples (red: flagged)", fontsize=10)
    _save(fig, path)


def _mislabel_rows(inp: ReviewInputs) -> tuple[pd.DataFrame, str]:
    n_flagged = int(inp.tables.train["flag_mislabel"].sum())
    where = "flag_mislabel" if n_flagged else None
    rows = ranked_rows(inp.tables, "self_influence", inp.n_gallery, ascending=False, where=where)
    rows = rows.drop(columns="flag_rule")
    if n_flagged:
        return rows, f"Top {suspect_noun(inp.kind)}s ({n_flagged} flagged)"
    return rows, "Highest self-influence (none flagged)"


_VALUED = ("regression", "multilabel")  # targets are values, not one class label


def _short(pred: np.ndarray | None, pos: int) -> str:
    """A predicted value for a small title."""
    if pred is None:
        return "?"
    v = pred[pos]
    if np.ndim(v):
        return ",".join(_fmt(x) for x in np.ravel(v)[:8])
    return _fmt(v)


def _differs(pred: Any, label: Any) -> bool:
    """The prediction is another label (classes, 0/1 rows); values are never "another label"."""
    if np.ndim(pred) or isinstance(pred, (float, np.floating)):
        if np.ndim(pred) and np.asarray(pred).dtype.kind in "iub":
            return ",".join(str(int(v)) for v in np.ravel(pred)) != str(label).split(",...")[0]
        return False
    return str(pred) != str(label)


def plot_mislabels(inp: ReviewInputs, shape: tuple[int, ...] | None, path: Path) -> Placed:
    """Gallery: image (or feature strip), given label, predicted label, self-influence."""
    rows, title = _mislabel_rows(inp)
    tiles = []
    for pos, row in rows.iterrows():
        wrong = (
            inp.train_pred is not None
            and inp.kind != "sequence"
            and _differs(inp.train_pred[pos], row["label"])
        )
        if inp.pred_text is not None:  # a sequence: its labels are its own next tokens
            given = f"next: {inp.pred_text[pos][:36]}"
        else:
            given = (
                f"given {_label(inp, row['label'])} pred {_label(inp, _short(inp.train_pred, pos))}"
            )
        text = f"id {printable(row['id'])}\n{given}\nself {row['self_influence']:.2g}"
        tiles.append(_Tile("train", int(pos), text, _RED if wrong else "black"))
    cols = 8 if shape is not None else 2
    grid = [tiles[i : i + cols] for i in range(0, max(1, len(tiles)), cols)]
    cell = (1.45, 1.45) if shape is not None else (3.0, 0.6)
    suptitle = f"{title}; red title: the model predicts another label"
    return _gallery(inp, shape, grid, cell, suptitle, path)


def plot_leaks(inp: ReviewInputs, shape: tuple[int, ...] | None, path: Path, n: int = 8) -> Placed:
    """Each suspected leak: the query next to its most aligned training example."""
    leaks = inp.tables.leaks.sort_values("cosine", ascending=False).head(n)
    if leaks.empty:
        _empty(path, "Suspected leaks", "no suspected leaks")
        return []
    t_pos = _positions(inp.tables.train["id"], leaks["train_id"])
    q_pos = _positions(pd.Series(inp.query_ids), leaks["query_id"])
    grid = [
        [
            _Tile("query", q_pos[row.query_id], f"query {printable(row.query_id)}"),
            _Tile(
                "train",
                t_pos[row.train_id],
                f"train {printable(row.train_id)}  cos {row.cosine:.4f}",
            ),
        ]
        for row in leaks.itertuples(index=False)
    ]
    cell = (1.45, 1.45) if shape else (3.3, 0.6)
    title = f"Suspected leaks ({len(inp.tables.leaks)}): query | training"
    return _gallery(inp, shape, grid, cell, title, path, fontsize=8)


def _positions(ids: pd.Series, wanted: Any) -> dict[Any, int]:
    """Row position of each wanted id: only the few rows drawn, not a dict of every training
    id (a million Python objects at 1M rows)."""
    want = pd.unique(pd.Series(list(wanted), dtype=object))
    out: dict[Any, int] = {}
    for w in want.tolist():  # one [n] boolean per id drawn (isin's hash or sort took ~40 B/row)
        hit = np.flatnonzero((ids == w).to_numpy(dtype=bool, na_value=False))
        out.update({ids.iloc[i]: i for i in hit.tolist()})
    return out


def _shown_queries(inp: ReviewInputs) -> list[Any]:
    """Leak queries first (the most telling), then the first queries in file order."""
    chosen = list(dict.fromkeys(inp.tables.leaks["query_id"].tolist()))[:1]
    for q in inp.query_ids.tolist():
        if len(chosen) >= inp.n_queries_shown:
            break
        if q not in chosen:
            chosen.append(q)
    return chosen


def plot_query_influence(
    inp: ReviewInputs, shape: tuple[int, ...] | None, path: Path, k: int = 4
) -> Placed:
    """Per shown query: the query, its top-k proponents (green) and top-k opponents (red)."""
    queries = _shown_queries(inp)
    table = inp.tables.queries
    if not queries or table.empty:
        _empty(path, "Proponents and opponents", "no queries scored")
        return []
    t_pos = _positions(
        inp.tables.train["id"], table.loc[table["query_id"].isin(queries), "train_id"]
    )
    q_pos = _positions(pd.Series(inp.query_ids), queries)
    labels = inp.tables.train["label"]
    grid: list[list[_Tile | None]] = []
    for q in queries:
        qi = q_pos[q]
        cells: list[_Tile | None] = [
            _Tile("query", qi, f"query {printable(q)}\nlabel {_label(inp, inp.query_labels[qi])}")
        ]
        for kind, color in (("proponent", _GREEN), ("opponent", _RED)):
            rows = table[(table["query_id"] == q) & (table["kind"] == kind)].head(k)
            for row in rows.itertuples(index=False):
                pos = t_pos[row.train_id]
                y_text = _label(inp, labels.iloc[pos])
                text = f"{printable(row.train_id)} (y={y_text})\n{row.score:.2g}"
                cells.append(_Tile("train", pos, text, color))
            cells += [None] * (k - len(rows))
        grid.append(cells)
    cell = (1.35, 1.35) if shape else (2.2, 0.6)
    title = f"Queries: top {k} proponents (green) | top {k} opponents (red)"
    return _gallery(inp, shape, grid, cell, title, path)


def checks_markdown(checks: Sequence[dict[str, Any]]) -> str:
    """The gate checks as a markdown table (check, result, observed, allowed)."""
    lines = ["| check | result | observed | allowed |", "|---|---|---:|---:|"]
    for r in checks:
        result = "pass" if r.get("success") else "**FAIL**"
        lines.append(
            f"| {r.get('check')} | {result} | {_fmt(r.get('observed'))} | "
            f"{_fmt(r.get('threshold'))} |"
        )
    return "\n".join(lines) + "\n"


def _feature_text(row: np.ndarray) -> str:
    shown = ", ".join(f"{v:.3g}" for v in row[:_SHOWN_FEATURES])
    return shown + (", ..." if len(row) > _SHOWN_FEATURES else "")


def _findings(inp: ReviewInputs, shape: tuple[int, ...] | None) -> list[str]:
    c = inp.tables.counts
    train = inp.tables.train
    out = [
        f"- Scored {c.get('n_train')} training examples against {c.get('n_query')} queries and "
        "the validation set.",
        f"- **{suspect_noun(inp.kind).capitalize()}s: {c.get('n_flagged_mislabel')}** "
        f"({100 * float(c.get('flagged_fraction', 0)):.1f}%); self-influence threshold "
        f"{_fmt(c.get('mislabel_threshold'))} (conformal, alpha_eff "
        f"{_fmt(c.get('mislabel_alpha_eff'))}), or harmful and atypical.",
    ]
    if c.get("n_flagged_mislabel"):
        masks = flag_rule_masks(train, c)  # booleans: no string per training row
        for rule, mask in zip(("self-influence", "harmful and atypical"), masks, strict=True):
            out.append(f"  - flagged by the {rule} rule: {int(mask.sum())}")
    comparable = inp.kind not in _VALUED and inp.kind != "sequence"  # one label per example
    if inp.train_pred is not None and c.get("n_flagged_mislabel") and comparable:
        flagged = np.flatnonzero(train["flag_mislabel"].to_numpy(dtype=bool))
        labels = train["label"].to_numpy()[flagged]
        differ = inp.train_pred[flagged].astype(str) != labels.astype(str)
        out.append(
            f"  - the model predicts a different label for {int(differ.sum())} of them "
            "(see plots/mislabels.png)."
        )
    rule = (
        f"group influence on the validation set < 0 and loss after the fit on it above "
        f"{_fmt(c.get('harmful_threshold'))}"
        if c.get("harmful_by_loss_after_fit")
        else f"group influence on the validation set below {_fmt(c.get('harmful_threshold'))}"
    )
    out.append(
        f"- **Harmful examples: {c.get('n_harmful')}** "
        f"({100 * float(c.get('harmful_fraction', 0)):.1f}%): {rule}."
    )
    if c.get("n_exposed") is not None and c.get("harmful_by_loss_after_fit"):
        out.append(
            f"- **Exposed by the validation fit: {c.get('n_exposed')}** "
            f"({100 * float(c.get('exposed_fraction', 0)):.1f}%; limit "
            f"{100 * float(c.get('max_exposed_fraction', 1)):.1f}%): group influence < 0 and "
            f"loss after the fit above {_fmt(c.get('exposed_threshold'))}, the clean "
            f"validation rows' upper {100 * float(c.get('exposed_tail', 0)):.0f}% (gate check "
            "harmful_excess: more rows up there than clean data explains means label noise)."
        )
    out.append(
        f"- **Suspected leaks: {c.get('n_leaks')}** of {c.get('n_query')} queries: a training "
        "example's gradient is (nearly) identical to the query's (cosine >= the leak threshold)."
    )
    shown = inp.tables.leaks.head(10)
    q_pos = _positions(pd.Series(inp.query_ids), shown["query_id"])
    t_pos = _positions(train["id"], shown["train_id"])
    for row in shown.itertuples(index=False):
        q, t = markdown_inline(row.query_id), markdown_inline(row.train_id)
        out.append(f"  - query {q} <- train {t} (cosine {row.cosine:.4f})")
        if inp.query_text is not None and inp.train_text is not None:
            out.append(f"    - query: {markdown_code(inp.query_text[q_pos[row.query_id]])}")
            out.append(f"    - train: {markdown_code(inp.train_text[t_pos[row.train_id]])}")
    if inp.train_text is not None and c.get("n_flagged_mislabel"):
        rows, _ = _mislabel_rows(inp)
        out.append(f"- Text of the top {suspect_noun(inp.kind)}s:")
        for pos, row in rows.head(5).iterrows():
            label = "" if inp.kind == "sequence" else f" label {_fmt(row['label'])}"
            shown = markdown_code(inp.train_text[pos])
            out.append(f"  - id {markdown_inline(row['id'])}{label}: {shown}")
            if inp.pred_text is not None:
                out.append(f"    - predicted next tokens: {markdown_code(inp.pred_text[pos])}")
    elif shape is None and c.get("n_flagged_mislabel"):
        rows, _ = _mislabel_rows(inp)
        out.append(f"- First features of the top {suspect_noun(inp.kind)}s:")
        for pos, row in rows.head(5).iterrows():
            out.append(
                f"  - id {markdown_inline(row['id'])} "
                f"{'target' if inp.kind in _VALUED else 'label'} "
                f"{_fmt(row['label'])}: {_feature_text(inp.train_x[pos])}"
            )
    return out


def report_markdown(inp: ReviewInputs, shape: tuple[int, ...] | None) -> str:
    """``report.md``: verdict, findings in words, the gate checks, links to plots and tables."""
    verdict = inp.verdict.upper()
    lines = [f"# {inp.title}", "", f"## Gate: **{verdict}**", ""]
    failed = [r for r in inp.checks if not r.get("success")]
    if failed:
        lines.append(f"The gate failed because {len(failed)} of {len(inp.checks)} checks failed:")
    else:
        lines.append(f"The gate passed: all {len(inp.checks)} checks passed.")
    lines += [f"- {reason}" for reason in inp.reasons if failed]
    lines += ["", "## What was found", "", *_findings(inp, shape), ""]
    lines += ["## Gate checks (Great Expectations)", "", checks_markdown(inp.checks)]
    lines += ["## Plots", ""]
    lines += [f"- [{name}](plots/{name})" for name in PLOTS]
    lines += ["", "## Tables", ""]
    lines += [
        "- [top-k proponents and opponents per query](tables/top_k_per_query.json)",
        "- [flagged training examples](tables/flagged_train.json)",
        "- [suspected leaks](tables/leaks_table.json)",
        "- full tables: [train](tables/train.parquet), [queries](tables/queries.parquet), "
        "[leaks](tables/leaks.parquet); scores under `scores/`",
        "",
        "Sign convention: positive = proponent; group influence < 0 hurts the validation set.",
    ]
    return "\n".join(lines) + "\n"


UI_TABLE_ROWS = 1000  # rows per table logged for the MLflow UI (full tables: parquet)


def review_tables(inp: ReviewInputs, max_rows: int = UI_TABLE_ROWS) -> dict[str, pd.DataFrame]:
    """The tables logged for the UI, keyed like :data:`TABLES`, each capped at ``max_rows``
    and ranked so the cap keeps what matters: flagged rows by self-influence (highest first),
    leaks by cosine, top-k rows of whole queries in query order. The full tables are the
    parquet files under ``tables/``."""
    train = inp.tables.train
    flagged = train[train["flag_mislabel"] | train["flag_harmful"]]
    flagged = flagged.sort_values("self_influence", ascending=False, kind="stable")
    flagged = flagged.head(max_rows).copy()
    if inp.train_pred is not None:
        rows = flagged.index.to_numpy()
        if inp.pred_text is not None:
            pred = np.asarray(inp.pred_text[rows])
        else:  # [n, L] predictions as one string per shown row
            pred = target_labels(np.asarray(inp.train_pred)[rows])
        flagged.insert(2, "predicted", pred)
    if inp.class_names is not None and "label" in flagged.columns:
        at = flagged.columns.get_loc("label") + 1
        flagged.insert(at, "class", [_label(inp, v).partition(" ")[2] for v in flagged["label"]])
    if inp.train_text is not None:
        flagged.insert(2, "text", np.asarray(inp.train_text[flagged.index.to_numpy()]))
    flagged.insert(len(flagged.columns), "flag_rule", flag_rules(flagged, inp.tables.counts))
    queries = inp.tables.queries
    per_query = int(queries["query_id"].value_counts().max()) if len(queries) else 1
    leaks = inp.tables.leaks
    if "cosine" in leaks:
        leaks = leaks.sort_values("cosine", ascending=False, kind="stable")
    return {
        "top_k_per_query": queries.head(max(per_query, max_rows // per_query * per_query)),
        "flagged_train": flagged.reset_index(drop=True),
        "leaks": leaks.head(max_rows).reset_index(drop=True),
    }


def write_report(out_dir: str | Path, inp: ReviewInputs) -> list[str]:
    """Write the plots, ``report.md`` and ``checks/gx_result.md``; return their relative paths."""
    out = Path(out_dir)
    shape = image_shape(inp.train_x.shape[1], inp.x_shape) if inp.train_x.ndim == 2 else None
    if inp.train_text is not None:
        shape = None  # tokens are text, not pixels
    if shape is not None and inp.scale is None:
        inp = replace(inp, scale=image_scale(inp, shape))
    train, counts = inp.tables.train, inp.tables.counts
    plots = out / "plots"
    # ids and token text are the user's data: "$...$" in them is text, not mathtext to parse
    with matplotlib.rc_context({"text.parse_math": False}):
        plot_self_influence(train, counts, plots / "self_influence.png")
        plot_group_influence(train, counts, plots / "group_influence.png")
        text = inp.train_text if inp.kind == "sequence" else None  # a label per token
        plot_top_harmful(train, counts, plots / "top_harmful.png", inp.train_pred, text=text)
        plot_mislabels(inp, shape, plots / "mislabels.png")
        plot_leaks(inp, shape, plots / "leaks.png")
        plot_query_influence(inp, shape, plots / "query_influence.png")
    (out / "report.md").write_text(report_markdown(inp, shape))
    (out / "checks").mkdir(parents=True, exist_ok=True)
    verdict = f"# Gate: {inp.verdict.upper()}\n\n"
    (out / "checks" / "gx_result.md").write_text(verdict + checks_markdown(inp.checks))
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
