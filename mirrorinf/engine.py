"""The Forward-INF engine: mirrored influence from forward passes.

score(i, q) = loss(z_i; theta) - loss(z_i; theta_q), theta_q = theta after fitting q.
Positive = proponent (fitting q lowers z_i's loss). Base losses are computed once per
(model, training set) and reused; loss differences are always taken in float64.
"""

from __future__ import annotations

import functools
import logging
import math
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from mirrorinf._lowrank import LowRankSGD, Unsupported, linear_modules
from mirrorinf.config import ForwardInfConfig
from mirrorinf.curvature import hessian_extremes
from mirrorinf.data import DataLike, Examples, as_examples
from mirrorinf.errors import ResourceError
from mirrorinf.metrics import spearman

log = logging.getLogger(__name__)

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Params = dict[str, torch.Tensor]

# Anchored runs on an indefinite Hessian follow gradient flow: lr = _FIT_LR / lambda_max, a tenth
# of the stability limit (positive definite: 1 / lambda_max, where the Neumann series is exact).
# Measured on a digits MLP (lambda_max 0.16), larger steps at the same lr*steps were far less
# faithful (LDS 0.49 at lr 3 vs 0.67 at lr 0.5 for lr*steps = 100): discretisation matters.
_FIT_LR = 0.1
# Default group fit: 50 Adam steps of lr 0.01 * rms(theta) on the set's mean loss. Adam's step is
# in parameter units, so this is scale-aware and insensitive to the set's curvature (which a few
# misfit points can make 50x the training set's). Mislabel AUROC on a digits MLP: 0.998 vs 0.90
# for one first-order step; 0.991-0.998 across lr 1e-3..2e-2.
_GROUP_FIT_LR = 0.01
_ANCHOR_STEPS = 300
_GROUP_FIT_STEPS = 50
_STACK_BUDGET = 2**26  # floats held by stacked per-example parameter sets at once (256 MB fp32)


def cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-example cross-entropy for integer class labels (the default loss).

    Computed as softplus(logsumexp_{k != y}(x_k - x_y)), which equals the usual formula but keeps
    full relative precision for well-fit examples (loss ~1e-20 instead of an exact 0), so loss
    *differences* of confident predictions do not vanish.
    """
    t = targets.long().unsqueeze(1)
    z = (outputs - outputs.gather(1, t)).scatter(1, t, float("-inf"))
    lse = torch.logsumexp(z, dim=1)
    return lse.clamp_min(0) + torch.log1p(torch.exp(-lse.abs()))


@dataclass
class ScoreReport:
    """What the last call computed and how healthy its scores are (saved beside results)."""

    kind: str
    mode: str
    n_train: int
    n_query: int
    scale: str  # "per_unit_lr": loss drop / lr (lr chosen automatically); "loss": raw drop
    steps: int
    path: str  # lowrank | generic | anchored
    lr_min: float
    lr_max: float
    zero_fraction: float
    n_constant_queries: int
    seconds: float
    lambda_max: float | None = None
    lambda_min: float | None = None
    stability: float | None = None
    upcast: int = 0  # queries (pairwise) or rows (self) recomputed in float64
    query_self_drop: torch.Tensor | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "query_self_drop"}
        if self.query_self_drop is not None:
            out["query_self_drop"] = [float(v) for v in self.query_self_drop]
        return out


_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}
# smallest automatic step (relative to ||theta||) a format resolves: bf16 keeps 8 mantissa bits
# (relative spacing 2^-8 = 4e-3), fp16 11 (5e-4); a step below that leaves the weights as they were
_AUTOCAST_MIN_STEP = {"bf16": 1e-2, "fp16": 2e-3}


def _oom_retry(method: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Rerun a scoring call with halved batch sizes after an out-of-memory error (any device
    torch reports it for), until it fits or both sizes are 1 (then a ResourceError)."""

    @functools.wraps(method)
    def run(self: ForwardInf, *args: Any, **kwargs: Any) -> torch.Tensor:
        while True:
            try:
                return method(self, *args, **kwargs)
            except torch.OutOfMemoryError as err:
                self._shrink_batches(err)

    return run


class ForwardInf:
    """Mirrored influence of training examples on queries, for any ``nn.Module``.

    ``pairwise`` gives [n_train, n_query], ``group`` one column for a whole query set,
    ``self_influence`` each training point's own loss drop. The caller's model is never changed
    (after a call). Not thread-safe: during a call the model's modules run with the engine's
    tensors swapped in (torch.func.functional_call); score one model object from one thread at
    a time, or give each thread its own copy.
    """

    def __init__(
        self,
        model: nn.Module,
        config: ForwardInfConfig | dict[str, Any] | None = None,
        loss_fn: LossFn | None = None,
        device: str | torch.device = "auto",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if isinstance(config, dict):
            config = ForwardInfConfig.from_dict(config)
        if config is not None and not isinstance(config, ForwardInfConfig):
            raise ValueError(
                f"config must be a ForwardInfConfig or mapping, got {type(config).__name__}"
            )
        self.model = model
        self.config = config or ForwardInfConfig()
        self.loss_fn: LossFn = loss_fn or cross_entropy
        self._default_loss = loss_fn is None
        self.device = _resolve_device(device)
        prec = self.config.precision
        if prec == "auto":
            prec = "float64" if self.config.mode == "anchored" else "float32"
        self.dtype = torch.float64 if prec == "float64" else torch.float32
        # rows per forward pass: big on a GPU, where per-call overhead dominates small batches
        self.train_batch = self.config.train_batch or (
            131072 if self.device.type == "cuda" else 8192
        )
        self.query_batch = self.config.query_batch  # both halve on out-of-memory (_oom_retry)
        self._autocast = _AUTOCAST.get(self.config.autocast)
        self._compiled: Callable[..., torch.Tensor] | bool | None = None  # False: failed
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        if not trainable:
            raise ValueError(
                "model has no trainable parameters (requires_grad=True); nothing to update"
            )
        self._trainable = trainable
        self._lowrank: LowRankSGD | None = None
        if (
            self.config.fast_path == "auto"
            and self.config.optimizer == "sgd"
            and not self.config.bn_update
        ):
            mods = linear_modules(model, trainable)
            if mods is not None:
                self._lowrank = LowRankSGD(mods, trainable)
        self._lowrank_verified: bool | None = None
        self._cache: dict[tuple, torch.Tensor] = {}
        self.last_report: ScoreReport | None = None

    # ================================================================== public API
    @_oom_retry
    def pairwise(self, train: DataLike, queries: DataLike) -> torch.Tensor:
        """Scores [n_train, n_query]: how much fitting each query lowers each training loss."""
        tr, qs = self._resident(as_examples(train, "train")), as_examples(queries, "queries")
        t0 = time.perf_counter()
        with self._scoring() as theta:
            self._check_train(theta, tr)
            xq, yq = self._prepare_queries(theta, qs)
            if self.config.mode == "anchored":
                scores, drop, extra = self._anchored_pairwise(theta, tr, xq, yq)
                path = "anchored"
            else:
                extra = {}
                base = self._base_losses(theta, tr)
                if self._use_lowrank(theta, tr, xq, yq, base):
                    scores, drop, lrs = self._lowrank_pairwise(theta, tr, xq, yq, base)
                    path = "lowrank"
                else:
                    scores, drop, lrs = self._generic_pairwise(theta, tr, xq, yq, base)
                    path = "generic"
                extra["lrs"] = lrs
        if path != "anchored":
            bad = ((scores == 0).double().mean(dim=0) > 0.01) | (
                scores.max(dim=0).values == scores.min(dim=0).values
            )
            hi = self._upcast_engine() if bool(bad.any()) and len(tr) > 1 else None
            if hi is not None:
                idx = bad.nonzero().flatten()
                scores[:, idx] = hi.pairwise(tr, (xq[idx], yq[idx])).double()
                drop[idx] = hi.last_report.query_self_drop.double()  # type: ignore[union-attr]
                extra["upcast"] = len(idx)
        return self._finish("pairwise", scores, drop, path, t0, len(tr), len(xq), extra)

    @_oom_retry
    def group(self, train: DataLike, queries: DataLike) -> torch.Tensor:
        """Scores [n_train] for one update on the whole query set (negative = harmful to it)."""
        tr, qs = self._resident(as_examples(train, "train")), as_examples(queries, "queries")
        t0 = time.perf_counter()
        with self._scoring() as theta:
            self._check_train(theta, tr)
            xq, yq = self._prepare_queries(theta, qs)
            if self.config.mode == "anchored":
                scores, drop, extra = self._anchored_pairwise(theta, tr, xq, yq, group=True)
                path = "anchored"
            else:
                base = self._base_losses(theta, tr)
                fit = self.config.steps is None and self.config.lr is None
                if fit:  # default: really fit the set, not a first-order probe (see _GROUP_FIT)
                    rms = theta.norm / math.sqrt(max(1, theta.numel))
                    lr, steps = _GROUP_FIT_LR * max(rms, 1e-3), _GROUP_FIT_STEPS
                    params, _ = self._group_update(theta, xq, yq, lr, steps, optimizer="adam")
                else:
                    params, lr = self._group_update(theta, xq, yq)
                    steps = self._steps()
                col = base - self._losses_over(params, tr)
                q_base = self._batched_losses(theta.params, xq, yq)
                drop = (q_base - self._batched_losses(params, xq, yq)).mean().reshape(1)
                scores, path = col.unsqueeze(1), "generic"
                extra = {"lrs": torch.tensor([lr]), "steps": steps}
                if fit:
                    extra.update(scale="loss")
                    scores, drop = self._sign() * scores, self._sign() * drop
                    if self.config.score == "abs":
                        scores, drop = scores.abs(), drop.abs()
                else:
                    scores, drop = self._apply_scale(scores, drop, torch.tensor([lr]))
        out = self._finish("group", scores, drop, path, t0, len(tr), 1, extra)
        return out[:, 0]

    @_oom_retry
    def self_influence(self, train: DataLike) -> torch.Tensor:
        """Scores [n_train]: each training point's loss drop after fitting that point alone.

        Always the plain update with its automatic step (anchored self-influence would need
        n_train anchored runs), so it is on the same per-unit-lr scale as plain pairwise scores
        whatever the mode. Large = atypical, mislabeled or memorised.
        """
        if self.config.mode == "anchored":
            twin = self.plain_twin()
            out = twin.self_influence(train)
            self.last_report = twin.last_report
            return out
        tr = self._resident(as_examples(train, "train"))
        t0 = time.perf_counter()
        with self._scoring() as theta:
            self._check_train(theta, tr)
            out = torch.empty(len(tr), dtype=torch.float64)
            lrs = torch.empty(len(tr), dtype=torch.float64)
            use_lr = self._lowrank is not None and self._lowrank_verified is not False
            chunk = self._self_chunk()
            path = "lowrank" if use_lr else "generic"
            for start, xb, yb in self._progress(
                tr.batches(chunk, self.device), len(tr), chunk, "self-influence"
            ):
                if use_lr:
                    try:
                        s, lr = self._lowrank_self(theta, xb, yb)
                    except Unsupported:
                        use_lr, path = False, "generic"
                        self._lowrank_verified = False
                if not use_lr:
                    s, lr = self._generic_self(theta, xb, yb)
                out[start : start + len(xb)] = s.cpu()
                lrs[start : start + len(xb)] = lr.cpu()
            scores, _ = self._apply_scale(out.unsqueeze(1), None, lrs, per_row=True)
        extra: dict[str, Any] = {"lrs": lrs}
        zero = (scores[:, 0] == 0).nonzero().flatten()
        hi = self._upcast_engine() if len(zero) > 0.01 * len(tr) else None
        if hi is not None:
            scores[zero, 0] = hi.self_influence(tr.take(zero)).double()
            extra["upcast"] = len(zero)
        res = self._finish("self", scores, None, path, t0, len(tr), 1, extra)
        return res[:, 0]

    def _resident(self, ex: Examples) -> Examples:
        """On a GPU, keep an in-memory training set on the device (once per data): every query
        chunk streams over it, and host-to-device copies would dominate. Larger sets stream."""
        if self.device.type != "cuda" or ex.x is None or ex.y is None or ex.x.is_cuda:
            return ex
        key = _data_key(ex)
        cached = self._cache.get(("resident", *key))
        if cached is not None:
            return Examples(ex.name, x=cached[0], y=cached[1], n=ex.n, key=key)  # type: ignore[index]
        free, _ = torch.cuda.mem_get_info(self.device)
        if ex.x.nbytes + ex.y.nbytes > free // 4:
            return ex
        xy = (ex.x.to(self.device), ex.y.to(self.device))
        self._cache = {k: v for k, v in self._cache.items() if k[0] != "resident"}
        self._cache[("resident", *key)] = xy  # type: ignore[assignment]
        return Examples(ex.name, x=xy[0], y=xy[1], n=ex.n, key=key)

    def plain_twin(self) -> ForwardInf:
        """This engine in plain mode with automatic steps (same model, loss, device): the scale
        on which self-influence and the leak rule's gradient cosine are defined."""
        cfg = self.config.replace(
            mode="plain", steps=None, lr=None, precision="auto", **self._batch_sizes()
        )
        return ForwardInf(
            self.model, cfg, None if self._default_loss else self.loss_fn, self.device
        )

    def _upcast_engine(self) -> ForwardInf | None:
        """A float64 twin, used to redo the few columns/rows float32 could not resolve."""
        if self.config.precision != "auto" or self.dtype == torch.float64:
            return None
        log.info("some scores vanished at float32; recomputing them in float64")
        cfg = self.config.replace(
            precision="float64", sphere=None, autocast="off", compile=False, **self._batch_sizes()
        )
        return ForwardInf(
            self.model, cfg, None if self._default_loss else self.loss_fn, self.device
        )

    # ================================================================== state and forward
    @contextmanager
    def _scoring(self) -> Iterator[_Theta]:
        """Eval mode for the duration of a call; the caller's modes are restored afterwards."""
        modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        self._cur = _Theta(self)
        try:
            with torch.enable_grad():
                yield self._cur
        finally:
            for m, was in modes:
                m.training = was  # per module, without train()'s recursion (exported graphs)

    def _fwd(
        self,
        theta: _Theta,
        params: Params,
        x: torch.Tensor,
        buffers: Params | None = None,
        hot: bool = False,
    ) -> torch.Tensor:
        """The model under ``params`` on ``x``, in autocast if configured. ``hot``: the plain
        forward over the training set (never under vmap/grad), the one config.compile compiles."""
        tensors = {**theta.fixed, **(buffers or {}), **params}
        if x.is_floating_point():
            x = x.to(self.dtype)
        # compiled for full training batches only: one static shape, no dynamic-shape compile
        full = hot and self.config.compile and len(x) == self.train_batch
        call = self._call_compiled if full and self._compiled is not False else self._call
        if self._autocast is None:
            return call(tensors, x)
        with torch.autocast(self.device.type, dtype=self._autocast):
            out = call(tensors, x)
        return out.to(self.dtype) if out.is_floating_point() else out

    def _call(self, tensors: Params, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.model, tensors, (x,))

    def _call_compiled(self, tensors: Params, x: torch.Tensor) -> torch.Tensor:
        if self._compiled is None:  # once per engine; parameters are inputs, not constants
            self._compiled = torch.compile(self._call, dynamic=False)
        try:
            return self._compiled(tensors, x)  # type: ignore[operator]
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:  # a compiler bug or no C++ compiler: score uncompiled
            log.warning("torch.compile failed (%s); scoring without it", str(exc).split("\n")[0])
            self._compiled = False
            return self._call(tensors, x)

    def _losses(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-example losses in float64 (outputs cast up first, so differences keep precision)."""
        if out.is_floating_point():
            out = out.double()
        if y.is_floating_point():
            y = y.double()
        return self.loss_fn(out, y)

    def _check_train(self, theta: _Theta, tr: Examples) -> None:
        """_check_targets on the first training rows (at most one batch)."""
        self._check_targets(theta, *tr.take(slice(0, min(len(tr), 256, self.train_batch))), "train")

    def _rows_per_copy(self, k: int) -> int:
        """Training rows per forward when k parameter copies share it: k*rows ~ train_batch."""
        return max(min(64, self.train_batch), self.train_batch // max(1, k))

    def _check_targets(self, theta: _Theta, x: torch.Tensor, y: torch.Tensor, name: str) -> None:
        """Validate targets against the model's outputs once, outside any vmap."""
        x, y = x.to(self.device), y.to(self.device)
        try:
            with torch.no_grad():
                out = self._fwd(theta, theta.params, x)
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, TypeError, IndexError) as exc:
            raise ValueError(
                f"the model's forward failed on {name} inputs of shape {tuple(x.shape)}: {exc}. "
                "Check that the features match what the model was trained on"
            ) from exc
        if self._default_loss:
            if y.is_floating_point() or y.dtype == torch.bool:
                raise ValueError(
                    f"{name} labels have dtype {y.dtype}; the default cross-entropy needs integer "
                    "class indices (pass loss_fn for other targets)"
                )
            if out.ndim != 2:
                raise ValueError(
                    f"the model returns outputs of shape {tuple(out.shape)}; the default loss "
                    "expects [batch, classes] logits (pass loss_fn for other outputs)"
                )
            n_cls = out.shape[1]
            lo, hi = int(y.min()), int(y.max())
            if lo < 0 or hi >= n_cls:
                raise ValueError(
                    f"{name} labels must lie in [0, {n_cls - 1}] for this model's {n_cls} outputs; "
                    f"found labels in [{lo}, {hi}]"
                )
        losses = self._losses(out, y)
        if losses.shape != (len(y),):
            raise ValueError(
                f"loss_fn must return one loss per example (shape [{len(y)}]), got "
                f"{tuple(losses.shape)}; use reduction='none'"
            )

    def _base_losses(self, theta: _Theta, tr: Examples) -> torch.Tensor:
        """loss(z_i; theta) for every training point, cached per (model state, training set)."""
        key = ("base", *theta.key, *_data_key(tr))
        if key not in self._cache:
            self._forget("base")
            self._cache[key] = self._losses_over(theta.params, tr)
        return self._cache[key]

    def _losses_over(
        self, params: Params, tr: Examples, buffers: Params | None = None
    ) -> torch.Tensor:
        theta = self._cur
        parts = []
        with torch.no_grad():  # losses stay on the device until the end: one sync, not one a batch
            for _, xb, yb in tr.batches(self.train_batch, self.device):
                parts.append(self._losses(self._fwd(theta, params, xb, buffers, hot=True), yb))
        return torch.cat(parts).cpu() if parts else torch.empty(0, dtype=torch.float64)

    def _batched_losses(self, params: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self._losses_over(params, Examples("q", x=x.cpu(), y=y.cpu(), n=len(x)))

    def _prepare_queries(self, theta: _Theta, qs: Examples) -> tuple[torch.Tensor, torch.Tensor]:
        """Materialise queries (small) and, if configured, lift already-fit ones off zero loss."""
        xq, yq = qs.materialise()
        self._check_targets(theta, xq, yq, "queries")
        sph = self.config.sphere
        if sph is None or not xq.is_floating_point():
            return xq, yq
        gen = torch.Generator().manual_seed(self.config.seed)
        xq = xq.clone()
        loss = self._batched_losses(theta.params, xq, yq)
        radius = torch.full((len(xq),), sph.radius, dtype=torch.float64)
        x0 = xq.clone()
        for _ in range(sph.max_tries):
            low = loss < sph.loss_floor
            if not bool(low.any()):
                break
            idx = low.nonzero().flatten()
            noise = torch.randn(x0[idx].shape, generator=gen, dtype=x0.dtype)
            noise = noise / noise.flatten(1).norm(dim=1).clamp_min(1e-12).reshape(
                -1, *[1] * (x0.ndim - 1)
            )
            scale = x0[idx].flatten(1).norm(dim=1).clamp_min(1.0) * radius[idx]
            xq[idx] = x0[idx] + noise * scale.to(x0.dtype).reshape(-1, *[1] * (x0.ndim - 1))
            loss[idx] = self._batched_losses(theta.params, xq[idx], yq[idx])
            radius[idx] *= sph.growth
        return xq, yq

    # ================================================================== plain updates (generic)
    def _direction(
        self, g: Params, state: dict[str, Any], t: int, optimizer: str | None = None
    ) -> Params:
        """Update direction of the configured optimizer (Adam keeps its moments in ``state``)."""
        if (optimizer or self.config.optimizer) == "sgd":
            return g
        b1, b2, eps = 0.9, 0.999, 1e-8
        out = {}
        for k, v in g.items():
            m = state.setdefault(("m", k), torch.zeros_like(v)).mul_(b1).add_(v, alpha=1 - b1)
            s = (
                state.setdefault(("v", k), torch.zeros_like(v))
                .mul_(b2)
                .addcmul_(v, v, value=1 - b2)
            )
            out[k] = (m / (1 - b1 ** (t + 1))) / ((s / (1 - b2 ** (t + 1))).sqrt() + eps)
        return out

    def _steps(self) -> int:
        return self.config.steps or 1

    def _sign(self) -> float:
        return 1.0 if self.config.direction == "descent" else -1.0

    def _step_lr(self, theta: _Theta, dnorm: torch.Tensor) -> torch.Tensor:
        """Per-example lr: the configured one, or a normalised step of rel_step * ||theta||."""
        if self.config.lr is not None:
            return torch.full_like(dnorm, self.config.lr)
        rel = max(self.config.rel_step, _AUTOCAST_MIN_STEP.get(self.config.autocast, 0.0))
        length = rel * max(theta.norm, 1e-3)
        lr = torch.where(dnorm > 0, length / dnorm.double().clamp_min(1e-300), 0.0)
        # a gradient so small that its lr would overflow the update's dtype: no step here; the
        # all-zero column is then recomputed in float64 (see pairwise / self_influence)
        return torch.where(lr < torch.finfo(self.dtype).max * 1e-6, lr, 0.0).to(dnorm.dtype)

    def _per_example_updates(
        self, theta: _Theta, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[Params, torch.Tensor, list[Params] | None]:
        """Stacked parameters [m, ...] after ``steps`` updates, each on its own example."""
        m = len(x)
        stacked = {k: v.unsqueeze(0).expand(m, *v.shape).clone() for k, v in theta.params.items()}
        bufs = [dict(theta.buffers) for _ in range(m)] if self.config.bn_update else None
        if bufs is not None:
            bufs = [{k: v.clone() for k, v in b.items()} for b in bufs]
        state: dict[Any, torch.Tensor] = {}
        lr = None
        for t in range(self._steps()):
            g = self._per_example_grads(theta, stacked, x, y, bufs)
            d = self._direction(g, state, t)
            if lr is None:
                lr = self._step_lr(theta, _stack_norm(d))
            coef = (-self._sign() * lr).to(self.dtype)
            for k in stacked:
                stacked[k] = stacked[k] + coef.reshape(-1, *[1] * (stacked[k].ndim - 1)) * d[k]
        assert lr is not None
        return stacked, lr, bufs

    def _per_example_grads(
        self,
        theta: _Theta,
        stacked: Params,
        x: torch.Tensor,
        y: torch.Tensor,
        bufs: list[Params] | None,
    ) -> Params:
        x, y = x.to(self.device), y.to(self.device)
        if bufs is None and theta.vmap_ok:

            def f(p: Params, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
                return self._losses(self._fwd(theta, p, xi.unsqueeze(0)), yi.unsqueeze(0)).sum()

            try:
                return vmap(grad(f), in_dims=(0, 0, 0), randomness="same")(stacked, x, y)
            except Exception as exc:  # model uses an op vmap cannot batch: loop instead
                log.debug("vmap over examples failed (%s); looping", exc)
                theta.vmap_ok = False
        out = {k: torch.empty_like(v) for k, v in stacked.items()}
        for j in range(len(x)):
            p = {k: v[j].detach().requires_grad_(True) for k, v in stacked.items()}
            with self._bn_train(bufs is not None):
                loss = self._losses(
                    self._fwd(theta, p, x[j : j + 1], bufs[j] if bufs else None), y[j : j + 1]
                ).sum()
            gs = torch.autograd.grad(loss, list(p.values()), allow_unused=True)
            for k, gk in zip(p, gs, strict=True):
                out[k][j] = 0 if gk is None else gk
        return out

    @contextmanager
    def _bn_train(self, on: bool) -> Iterator[None]:
        """During an update with bn_update, BatchNorm layers run in train mode (stats move)."""
        bns = [m for m in self.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if on:
            for m in bns:
                m.train()
        try:
            yield
        except ValueError as exc:
            if on and "more than 1 value per channel" in str(exc):
                raise ValueError(
                    "bn_update needs BatchNorm inputs with more than one value per "
                    "channel for a single example; set bn_update: false"
                ) from exc
            raise
        finally:
            for m in bns:
                m.eval()

    def _generic_pairwise(
        self, theta: _Theta, tr: Examples, xq: torch.Tensor, yq: torch.Tensor, base: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n, m = len(tr), len(xq)
        scores = torch.empty(n, m, dtype=torch.float64)
        drops = torch.empty(m, dtype=torch.float64)
        lrs = torch.empty(m, dtype=torch.float64)
        qb = self._query_chunk(theta)
        q_base = self._batched_losses(theta.params, xq, yq)
        for qs in self._progress(iter(range(0, m, qb)), m, qb, "pairwise queries"):
            sl = slice(qs, min(qs + qb, m))
            stacked, lr, bufs = self._per_example_updates(theta, xq[sl], yq[sl])
            lrs[sl] = lr.cpu()
            cols = sl.stop - sl.start
            for j in range(cols):
                pj = {k: v[j] for k, v in stacked.items()}
                bj = bufs[j] if bufs else None
                scores[:, qs + j] = base - self._losses_over(pj, tr, bj)
                drops[qs + j] = (
                    q_base[qs + j]
                    - self._batched_losses(pj, xq[qs + j : qs + j + 1], yq[qs + j : qs + j + 1])[0]
                )
        scores, drops = self._apply_scale(scores, drops, lrs)
        return scores, drops, lrs

    def _generic_self(
        self, theta: _Theta, xb: torch.Tensor, yb: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            base = self._losses(self._fwd(theta, theta.params, xb), yb)
        stacked, lr, bufs = self._per_example_updates(theta, xb, yb)
        after = torch.empty_like(base)
        with torch.no_grad():
            for j in range(len(xb)):
                pj = {k: v[j] for k, v in stacked.items()}
                after[j] = self._losses(
                    self._fwd(theta, pj, xb[j : j + 1], bufs[j] if bufs else None), yb[j : j + 1]
                )[0]
        return base - after, lr

    def _group_update(
        self,
        theta: _Theta,
        xq: torch.Tensor,
        yq: torch.Tensor,
        lr: float | None = None,
        steps: int | None = None,
        optimizer: str | None = None,
    ) -> tuple[Params, float]:
        """One parameter set after ``steps`` updates on the mean loss of the whole query set."""
        p = {k: v.clone() for k, v in theta.params.items()}
        state: dict[Any, torch.Tensor] = {}
        q = Examples("queries", x=xq, y=yq, n=len(xq))
        for t in range(steps or self._steps()):
            g = self._mean_grad(theta, p, q)
            d = self._direction(g, state, t, optimizer)
            if lr is None:
                lr = float(
                    self._step_lr(theta, _stack_norm({k: v.unsqueeze(0) for k, v in d.items()}))[0]
                )
            p = {k: v - self._sign() * lr * d[k] for k, v in p.items()}
        assert lr is not None
        return p, lr

    def _mean_grad(self, theta: _Theta, p: Params, data: Examples) -> Params:
        """Gradient of the mean loss over ``data`` (streamed; exact, not a subsample)."""
        leaves = {k: v.detach().requires_grad_(True) for k, v in p.items()}
        acc = {k: torch.zeros_like(v) for k, v in p.items()}
        for _, xb, yb in data.batches(self.train_batch, self.device):
            loss = self._losses(self._fwd(theta, leaves, xb), yb).sum() / len(data)
            gs = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
            for k, gk in zip(leaves, gs, strict=True):
                if gk is not None:
                    acc[k] += gk
        return acc

    # ================================================================== plain updates (low-rank)
    def _use_lowrank(
        self, theta: _Theta, tr: Examples, xq: torch.Tensor, yq: torch.Tensor, base: torch.Tensor
    ) -> bool:
        """Use the exact low-rank path if possible; verify it once against the generic path."""
        if self._lowrank is None or self._lowrank_verified is False:
            return False
        if self._lowrank_verified:
            return True
        k, nb = min(2, len(xq)), min(16, len(tr))
        xs, ys = tr.take(slice(0, nb))
        small = Examples("train", x=xs, y=ys, n=nb)
        try:
            fast, _, _ = self._lowrank_pairwise(theta, small, xq[:k], yq[:k], base[:nb])
        except Unsupported as exc:
            log.info("low-rank fast path not applicable (%s); using the generic path", exc)
            self._lowrank_verified = False
            return False
        ref, _, _ = self._generic_pairwise(theta, small, xq[:k], yq[:k], base[:nb])
        tol = 1e-3 * float(ref.abs().max()) + 1e-9
        self._lowrank_verified = bool((fast - ref).abs().max() <= tol)
        if not self._lowrank_verified:
            log.info("low-rank fast path disagreed with the generic path; using the generic path")
        return self._lowrank_verified

    def _lowrank_updates(
        self, theta: _Theta, lr_engine: LowRankSGD, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Build each example's low-rank update factors; returns (lr, loss before)."""
        m = len(x)
        x, y = x.to(self.device), y.to(self.device)
        lr_engine.reset(m)
        lr = None
        base = None
        params = {k: v.detach().requires_grad_(True) for k, v in theta.params.items()}
        for _ in range(self._steps()):
            lr_engine.set_mode("diag", capture=True)
            losses = self._losses(self._fwd(theta, params, x), y)
            if base is None:
                base = losses.detach()
            grads = lr_engine.captured_grads(losses.sum())
            if lr is None:
                lr = self._step_lr(theta, lr_engine.grad_sqnorm(grads).sqrt())
            lr_engine.add_step(grads, -self._sign() * lr)
        assert lr is not None and base is not None
        return lr, base

    def _lowrank_pairwise(
        self, theta: _Theta, tr: Examples, xq: torch.Tensor, yq: torch.Tensor, base: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        assert self._lowrank is not None
        n, m = len(tr), len(xq)
        scores = torch.empty(n, m, dtype=torch.float64)
        drops = torch.empty(m, dtype=torch.float64)
        lrs = torch.empty(m, dtype=torch.float64)
        qb = self.query_batch
        with self._lowrank.hooks() as lre:
            for qs in self._progress(iter(range(0, m, qb)), m, qb, "pairwise queries"):
                sl = slice(qs, min(qs + qb, m))
                k = sl.stop - sl.start
                lr, q_base = self._lowrank_updates(theta, lre, xq[sl], yq[sl])
                lrs[sl] = lr.cpu()
                with torch.no_grad():
                    lre.set_mode("diag")
                    xqd, yqd = xq[sl].to(self.device), yq[sl].to(self.device)
                    drops[sl] = (
                        q_base - self._losses(self._fwd(theta, theta.params, xqd), yqd)
                    ).cpu()
                    # k*rows rows per forward: as many as a plain forward of train_batch rows
                    rows = self._rows_per_copy(k)
                    for start, xb, yb in tr.batches(rows, self.device):
                        b = len(xb)
                        lre.set_mode("expand", batch=b)
                        out = self._fwd(theta, theta.params, xb)
                        if out.shape[0] != k * b:
                            raise Unsupported("model output was not expanded over queries")
                        after = self._losses(out, yb.repeat(k)).reshape(k, b)
                        scores[start : start + b, sl] = (
                            base[start : start + b].to(after.device) - after
                        ).T.cpu()
                lre.set_mode("off")
        scores, drops = self._apply_scale(scores, drops, lrs)
        return scores, drops, lrs

    def _lowrank_self(
        self, theta: _Theta, xb: torch.Tensor, yb: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        assert self._lowrank is not None
        with self._lowrank.hooks() as lre:
            lr, base = self._lowrank_updates(theta, lre, xb, yb)
            with torch.no_grad():
                lre.set_mode("diag")
                after = self._losses(self._fwd(theta, theta.params, xb), yb)
        return base - after, lr

    # ================================================================== anchored mode
    def _anchored_pairwise(
        self, theta: _Theta, tr: Examples, xq: torch.Tensor, yq: torch.Tensor, group: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Steps on mean train loss + L2 + eps*loss(q), scored against a control run (eps=0)."""
        cfg = self.config
        lam_max, lam_min = self._curvature(theta, tr)
        convex = lam_min > 0
        lr = cfg.lr if cfg.lr is not None else (1.0 if convex else _FIT_LR) / lam_max
        steps = cfg.steps or _anchored_steps(lr, lam_min)
        eps = cfg.anchor_eps if cfg.anchor_eps is not None else 1.0 / len(tr)
        mid = max(1, steps // 2)
        # Tilt: subtract the training gradient at theta so theta is an exact stationary point.
        # A not-quite-converged model then does not keep training during the run (which drifts
        # and, at lr ~ 1/lambda_max, sharpens into chaos); the control run is theta itself.
        g0 = self._train_grad0(theta, tr)
        base_mid = base_end = self._base_losses(theta, tr)
        n_cols = 1 if group else len(xq)
        scores = torch.empty(len(tr), n_cols, dtype=torch.float64)
        scores_mid = torch.empty_like(scores)
        drops = torch.empty(n_cols, dtype=torch.float64)
        weight = eps * (len(xq) if group else 1) * self._sign()
        k = n_cols if group else self._query_chunk(theta)
        q_ctrl = self._batched_losses(theta.params, xq, yq)
        for qs in self._progress(iter(range(0, n_cols, k)), n_cols, k, "anchored queries"):
            sl = slice(qs, min(qs + k, n_cols))
            xs, ys = (xq, yq) if group else (xq[sl], yq[sl])
            p_mid, p_end = self._anchored_runs(theta, tr, xs, ys, weight, lr, steps, mid, g0, group)
            scores[:, sl] = (base_end.unsqueeze(0) - self._stacked_losses(p_end, tr)).T
            scores_mid[:, sl] = (base_mid.unsqueeze(0) - self._stacked_losses(p_mid, tr)).T
            q_end = self._stacked_losses(p_end, Examples("q", x=xs.cpu(), y=ys.cpu(), n=len(xs)))
            if group:
                drops[0] = (q_ctrl - q_end[0]).mean()
            else:
                drops[sl] = q_ctrl[sl] - q_end.diagonal()
        # scores per unit of query weight, so they do not shrink with n_train (sign: proponent > 0)
        scores, scores_mid, drops = scores / weight, scores_mid / weight, drops / weight
        if cfg.score == "abs":
            scores, scores_mid, drops = scores.abs(), scores_mid.abs(), drops.abs()
        stability = _rank_agreement(scores_mid, scores)
        if stability is not None and stability < 0.8:
            log.warning(
                "anchored scores at %d and %d steps agree only to Spearman %.2f; "
                "consider fewer steps or a smaller lr",
                mid,
                steps,
                stability,
            )
        extra = {
            "lambda_max": lam_max,
            "lambda_min": lam_min,
            "stability": stability,
            "steps": steps,
            "lrs": torch.tensor([lr]),
        }
        log.info(
            "anchored mode: lr %.3g (1/lambda_max=%.3g), %d steps, eps %.3g, stability %.3f",
            lr,
            1.0 / lam_max,
            steps,
            eps,
            stability,
        )
        return scores, drops, extra

    def _anchored_runs(
        self,
        theta: _Theta,
        tr: Examples,
        xq: torch.Tensor | None,
        yq: torch.Tensor | None,
        weight: float,
        lr: float,
        steps: int,
        mid: int,
        g0: Params,
        group: bool = False,
    ) -> tuple[Params, Params]:
        """Stacked parameters at ``mid`` and ``steps`` steps of the anchored objective.

        Objective: mean training loss - g0 . theta + (wd/2)||theta - theta0||^2
        + weight * loss(q): theta0 is its stationary point without the query (g0 = the
        training gradient at theta0). One copy per query (or one for the whole set with
        ``group``), all stepped together on the full-batch training gradient.
        """
        k = 1 if (group or xq is None) else len(xq)
        p = {n: v.unsqueeze(0).expand(k, *v.shape).clone() for n, v in theta.params.items()}
        wd = self.config.weight_decay
        q = None if xq is None else Examples("q", x=xq, y=yq, n=len(xq))
        snap = p
        for t in range(steps):
            g = self._stacked_mean_grad(theta, p, tr)
            if q is not None and xq is not None and yq is not None:
                if group:
                    gq = self._mean_grad(theta, {n: v[0] for n, v in p.items()}, q)
                    g = {n: g[n] + weight * gq[n].unsqueeze(0) for n in g}
                else:
                    gq = self._per_example_grads(theta, p, xq, yq, None)
                    g = {n: g[n] + weight * gq[n] for n in g}
            p = {n: v - lr * (g[n] - g0[n] + wd * (v - theta.params[n])) for n, v in p.items()}
            if t + 1 == mid:
                snap = p
        return snap, p

    def _train_grad0(self, theta: _Theta, tr: Examples) -> Params:
        """Full-batch training-loss gradient at theta (cached per model state and data)."""
        key = ("g0", *theta.key, *_data_key(tr))
        if key not in self._cache:
            self._forget("g0")
            self._cache[key] = self._mean_grad(theta, theta.params, tr)  # type: ignore[assignment]
        return self._cache[key]  # type: ignore[return-value]

    def _stacked_mean_grad(self, theta: _Theta, stacked: Params, data: Examples) -> Params:
        """Gradient of the mean loss over ``data`` for each of k stacked parameter sets."""
        k = next(iter(stacked.values())).shape[0]
        if k == 1:
            g = self._mean_grad(theta, {n: v[0] for n, v in stacked.items()}, data)
            return {n: v.unsqueeze(0) for n, v in g.items()}

        def f(p: Params, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
            return self._losses(self._fwd(theta, p, xb), yb).sum()

        acc = {n: torch.zeros_like(v) for n, v in stacked.items()}
        rows = self._rows_per_copy(k)
        for _, xb, yb in data.batches(rows, self.device):
            if theta.vmap_ok:
                try:
                    gs = vmap(grad(f), in_dims=(0, None, None), randomness="same")(stacked, xb, yb)
                    for n in acc:
                        acc[n] += gs[n]
                    continue
                except Exception as exc:  # an op vmap cannot batch: loop over the copies
                    log.debug("vmap over parameter sets failed (%s); looping", exc)
                    theta.vmap_ok = False
            sub = Examples("batch", x=xb, y=yb, n=len(xb))
            for j in range(k):
                gj = self._mean_grad(theta, {n: v[j] for n, v in stacked.items()}, sub)
                for n in acc:
                    acc[n][j] += gj[n] * len(xb)
        return {n: v / len(data) for n, v in acc.items()}

    def _stacked_losses(self, stacked: Params, data: Examples) -> torch.Tensor:
        """Per-example losses [k, n] of ``data`` under each of k stacked parameter sets."""
        theta = self._cur
        k = next(iter(stacked.values())).shape[0]
        out = torch.empty(k, len(data), dtype=torch.float64)
        rows = self._rows_per_copy(k)
        with torch.no_grad():
            for start, xb, yb in data.batches(rows, self.device):
                sl = slice(start, start + len(xb))
                if theta.vmap_ok:
                    try:
                        out[:, sl] = vmap(
                            lambda p, xb=xb, yb=yb: self._losses(self._fwd(theta, p, xb), yb),
                            randomness="same",
                        )(stacked).cpu()
                        continue
                    except Exception as exc:
                        log.debug("vmap over parameter sets failed (%s); looping", exc)
                        theta.vmap_ok = False
                for j in range(k):
                    pj = {n: v[j] for n, v in stacked.items()}
                    out[j, sl] = self._losses(self._fwd(theta, pj, xb), yb).cpu()
        return out

    def _curvature(self, theta: _Theta, tr: Examples, with_min: bool = True) -> tuple[float, float]:
        """Extreme Hessian eigenvalues of the mean loss over ``tr`` + weight decay (cached)."""
        key = ("curv", *theta.key, *_data_key(tr), self.config.weight_decay, with_min)
        if key not in self._cache:
            self._forget("curv")
            xs, ys = tr.take(_curvature_rows(tr, self.config.seed))
            xs, ys = xs.to(self.device), ys.to(self.device)

            def objective(p: Params) -> torch.Tensor:
                return self._losses(self._fwd(theta, p, xs), ys).mean()

            lam_max, lam_min = hessian_extremes(
                objective, theta.params, seed=self.config.seed, with_min=with_min
            )
            lam_max += self.config.weight_decay
            lam_min += self.config.weight_decay
            self._cache[key] = torch.tensor([lam_max, lam_min])
        lam_max, lam_min = (float(v) for v in self._cache[key])
        if not lam_max > 0:
            raise ValueError(
                "the training objective has no positive curvature here; set lr explicitly"
            )
        return lam_max, lam_min

    # ================================================================== helpers
    def _apply_scale(
        self,
        scores: torch.Tensor,
        drops: torch.Tensor | None,
        lrs: torch.Tensor,
        per_row: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Flip for ascent, divide by the automatic lr (per unit lr), take |.| if asked."""
        sign = self._sign()
        scores = scores * sign
        drops = None if drops is None else drops * sign
        if self.config.lr is None:
            safe = torch.where(lrs > 0, lrs, torch.ones_like(lrs)).to(scores.dtype)
            scores = scores / (safe.reshape(-1, 1) if per_row else safe.reshape(1, -1))
            if drops is not None:
                drops = drops / safe.reshape(-1)[: len(drops)]
        if self.config.score == "abs":
            scores = scores.abs()
            drops = None if drops is None else drops.abs()
        return scores, drops

    def _finish(
        self,
        kind: str,
        scores: torch.Tensor,
        drops: torch.Tensor | None,
        path: str,
        t0: float,
        n_train: int,
        n_query: int,
        extra: dict,
    ) -> torch.Tensor:
        """Health checks, the report, and the float32 CPU result."""
        zero = float((scores == 0).double().mean())
        const = (
            int(((scores.max(dim=0).values - scores.min(dim=0).values) == 0).sum())
            if len(scores) > 1
            else 0
        )
        if not bool(torch.isfinite(scores).all()):
            raise FloatingPointError(
                f"{kind} scores contain NaN/inf: the update diverged; "
                "use a smaller lr or fewer steps"
            )
        if zero > 0.01 or const > 0:
            log.warning(
                "%s scores: %.1f%% exactly zero, %d query column(s) constant; "
                "the step may be too small for this precision (raise rel_step or lr)",
                kind,
                100 * zero,
                const,
            )
        lrs = extra.get("lrs", torch.tensor([float("nan")]))
        self.last_report = ScoreReport(
            kind=kind,
            mode=self.config.mode if kind != "self" else "plain",
            n_train=n_train,
            n_query=n_query,
            scale=extra.get("scale") or _scale_name(self.config, path),
            steps=int(extra.get("steps", self._steps())),
            path=path,
            lr_min=float(lrs.min()),
            lr_max=float(lrs.max()),
            zero_fraction=zero,
            n_constant_queries=const,
            seconds=time.perf_counter() - t0,
            lambda_max=extra.get("lambda_max"),
            lambda_min=extra.get("lambda_min"),
            stability=extra.get("stability"),
            upcast=int(extra.get("upcast", 0)),
            query_self_drop=None if drops is None else drops.float(),
        )
        log.info(
            "%s: %d x %d scores in %.2fs (path %s, zero %.2f%%)",
            kind,
            n_train,
            n_query,
            self.last_report.seconds,
            path,
            100 * zero,
        )
        return scores.float()

    def _forget(self, kind: str) -> None:
        """Drop cached entries of one kind (a new model state or data set replaces them)."""
        self._cache = {k: v for k, v in self._cache.items() if k[0] != kind}

    def _batch_sizes(self) -> dict[str, int]:
        """Current batch sizes (after any out-of-memory halving), for engines derived from this."""
        return {"train_batch": self.train_batch, "query_batch": self.query_batch}

    def _shrink_batches(self, err: BaseException) -> None:
        """Halve the batch sizes after an out-of-memory error; ResourceError once both are 1."""
        if self.train_batch <= 1 and self.query_batch <= 1:
            raise ResourceError(
                f"out of memory on {self.device} even with train_batch=1 and query_batch=1: "
                "the model does not fit with its copies; use a device with more memory or "
                f"device: cpu ({str(err).splitlines()[0]})"
            ) from None
        self.train_batch = max(1, self.train_batch // 2)
        self.query_batch = max(1, self.query_batch // 2)
        self._cache.clear()  # device-resident data goes too; it is re-uploaded if it fits
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        log.warning(
            "out of memory on %s; retrying with train_batch=%d, query_batch=%d",
            self.device,
            self.train_batch,
            self.query_batch,
        )

    def _query_chunk(self, theta: _Theta) -> int:
        return max(1, min(self.query_batch, _STACK_BUDGET // max(1, theta.numel)))

    def _self_chunk(self) -> int:
        numel = sum(p.numel() for n, p in self.model.named_parameters() if n in self._trainable)
        cap = self.train_batch if self._lowrank is not None else _STACK_BUDGET // max(1, numel)
        return max(1, min(self.train_batch, cap))

    def _progress(self, it: Iterator, total: int, step: int, desc: str = "mirrorinf") -> Iterator:
        """Progress bar (per query chunk / training batch) on long work, on a terminal only.

        Quiet when stderr is not a terminal (CI, pipes, pytest) or when this module's logger
        is set above WARNING.
        """
        if total // max(1, step) < 8 or not log.isEnabledFor(logging.WARNING):
            return it
        if not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty()):
            return it
        try:
            from tqdm import tqdm
        except ImportError:  # pragma: no cover
            return it
        bar = tqdm(it, total=math.ceil(total / step), desc=desc, leave=False, file=sys.stderr)
        return iter(bar)


class _Theta:
    """The model's parameters/buffers detached onto the engine's device and dtype."""

    def __init__(self, engine: ForwardInf) -> None:
        dev, dt = engine.device, engine.dtype
        params, fixed, key = {}, {}, []
        for n, p in engine.model.named_parameters():
            t = p.detach().to(dev, dt if p.is_floating_point() else p.dtype)
            (params if n in engine._trainable else fixed)[n] = t
            key.append((n, id(p), p._version))
        buffers = {}
        for n, b in engine.model.named_buffers():
            buffers[n] = b.detach().to(dev, dt if b.is_floating_point() else b.dtype)
            key.append((n, id(b), b._version))
        self.params: Params = params
        self.buffers: Params = buffers
        self.fixed: Params = {**fixed, **buffers}
        self.norm = float(torch.sqrt(sum(v.double().pow(2).sum() for v in params.values())))
        # content too: weights edited through .data keep their id and _version
        content = tuple(float(v.double().sum()) for v in (*params.values(), *self.fixed.values()))
        self.key = (tuple(key), content, self.norm, engine.config.fingerprint())
        self.numel = sum(v.numel() for v in params.values())
        self.vmap_ok = True


def _scale_name(cfg: ForwardInfConfig, path: str) -> str:
    """Which scale scores are on (cross-query thresholds depend on it)."""
    if path == "anchored":
        return "per_unit_query_weight"
    return "per_unit_lr" if cfg.lr is None else "loss"


def _stack_norm(d: Params) -> torch.Tensor:
    return torch.sqrt(sum(v.double().flatten(1).pow(2).sum(dim=1) for v in d.values()))


_CURVATURE_ROWS = 2048  # rows of the Hessian estimate (a subsample of larger training sets)


def _curvature_rows(tr: Examples, seed: int) -> torch.Tensor:
    """Which training rows estimate the curvature: all of them up to _CURVATURE_ROWS; else, for
    in-memory data, those with the smallest seeded random projection of their content, in that
    order, so the estimate (and anchored scores) do not depend on the order of the rows. A
    streamed dataset gets a seeded random subset of positions."""
    n = len(tr)
    if n <= _CURVATURE_ROWS:
        return torch.arange(n)
    gen = torch.Generator().manual_seed(seed)
    if tr.x is None or tr.y is None:
        return torch.randperm(n, generator=gen)[:_CURVATURE_ROWS].sort().values
    d = int(tr.x[0].numel())
    proj = torch.randn(d, generator=gen, dtype=torch.float64)
    keys = torch.empty(n, dtype=torch.float64)
    for start in range(0, n, 65536):
        xb = tr.x[start : start + 65536].flatten(1).to("cpu", torch.float64)
        yb = tr.y[start : start + 65536].reshape(len(xb), -1).to("cpu", torch.float64)
        keys[start : start + len(xb)] = xb @ proj + math.pi * yb.sum(dim=1)
    return torch.argsort(keys, stable=True)[:_CURVATURE_ROWS]


def _rank_agreement(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """Mean per-column Spearman of two score matrices; None when no column can be ranked
    (a single training row, or every column constant)."""
    if a.shape[0] < 2:
        return None
    rho = spearman(a.numpy(), b.numpy())
    return float(np.nanmean(rho)) if np.isfinite(rho).any() else None


class _Same:
    """A cache-key part equal only to a wrapper of the very same object. It holds the object,
    so a freed tensor's id() cannot be reused by new data while the cache entry lives."""

    __slots__ = ("obj",)

    def __init__(self, obj: object) -> None:
        self.obj = obj

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Same) and other.obj is self.obj

    def __hash__(self) -> int:
        return id(self.obj)


def _data_key(ex: Examples) -> tuple:
    if ex.key is not None:
        return ex.key
    if ex.x is not None and ex.y is not None:
        return (_Same(ex.x), ex.x._version, tuple(ex.x.shape), _Same(ex.y), ex.y._version)
    return (_Same(ex.dataset), ex.n)


def _anchored_steps(lr: float, lam_min: float) -> int:
    """Run length from the curvature (lambda_min from Lanczos).

    Positive definite (e.g. L2-regularised convex models): run until the slowest direction has
    converged to within e^-3, ceil(3 / (lr * lambda_min)) steps, 20..500. Indefinite (a trained
    network): _ANCHOR_STEPS small steps, fewer if negative curvature would grow more than 2x,
    (1 + lr |lambda_min|)^K <= 2. On a digits MLP at lr 0.1/lambda_max, LDS rose with the run
    length: 0.58 / 0.66 / 0.70 at 100 / 160 / 300 steps (TracIn 0.45).
    """
    if lam_min > 0:
        return int(min(500, max(20, math.ceil(3.0 / (lr * lam_min)))))
    if lam_min == 0:
        return _ANCHOR_STEPS
    k = math.floor(math.log(2.0) / math.log1p(lr * abs(lam_min)))
    return int(min(_ANCHOR_STEPS, max(20, k)))


def _resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "device 'cuda' requested but no CUDA device is available; use device='auto'"
        )
    return dev
