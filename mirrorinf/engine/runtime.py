"""Shared runtime of every scorer: the model state, the functional forward, precision, device."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.func import functional_call

from mirrorinf.engine.config import ForwardInfConfig
from mirrorinf.engine.examples import Examples, Inputs, each, n_rows, parts
from mirrorinf.engine.execution import BatchPlan, Cache, Params, data_key
from mirrorinf.engine.graph_view import engine_view, unread_params
from mirrorinf.engine.losses import LossFn, default_loss, float64_losses
from mirrorinf.engine.outputs import OutputSpec, select_output

log = logging.getLogger(__name__)

_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}
# smallest automatic step (relative to ||theta||) a format resolves: bf16 keeps 8 mantissa bits
# (relative spacing 2^-8 = 4e-3), fp16 11 (5e-4); a step below that leaves the weights as they were
AUTOCAST_MIN_STEP = {"bf16": 1e-2, "fp16": 2e-3}


class ModelState:
    """The model's parameters and buffers, detached onto the engine's device and dtype, for
    one call (``params``: the trainable ones; ``fixed``: everything else)."""

    def __init__(
        self,
        model: nn.Module,
        trainable: set[str],
        device: torch.device,
        dtype: torch.dtype,
        fingerprint: str,
    ) -> None:
        params: Params = {}
        fixed: Params = {}
        key: list[tuple[str, int, int]] = []
        for n, p in model.named_parameters():
            t = p.detach().to(device, dtype if p.is_floating_point() else p.dtype)
            (params if n in trainable else fixed)[n] = t
            key.append((n, id(p), p._version))
        buffers: Params = {}
        for n, b in model.named_buffers():
            buffers[n] = b.detach().to(device, dtype if b.is_floating_point() else b.dtype)
            key.append((n, id(b), b._version))
        self.params = params
        self.buffers = buffers
        self.fixed: Params = {**fixed, **buffers}
        self.norm = float(torch.sqrt(sum(v.double().pow(2).sum() for v in params.values())))  # type: ignore[arg-type]
        # content too: weights edited through .data keep their id and _version
        content = tuple(float(v.double().sum()) for v in (*params.values(), *self.fixed.values()))
        self.key: tuple[object, ...] = (tuple(key), content, self.norm, fingerprint)
        self.numel = sum(v.numel() for v in params.values())
        self.vmap_ok = True  # cleared once an op of the model cannot be batched by vmap


class Runtime:
    """Model, loss, device, dtype, batch plan and cache, shared by the scorers of one engine."""

    def __init__(
        self,
        model: nn.Module,
        config: ForwardInfConfig,
        loss_fn: LossFn | None,
        device: str | torch.device,
        auto_dtype: torch.dtype,
        kind: str = "classification",
        output: OutputSpec = None,
    ) -> None:
        # exported graphs as nn.Linear calls and batchable sizes (a copy; the caller's is kept)
        self.model = engine_view(model)
        self.config = config
        self.kind = kind
        self.output = output
        self.loss_fn: LossFn = loss_fn or default_loss(kind)
        self.default_loss = loss_fn is None
        self.device = resolve_device(device)
        prec = config.precision
        self.dtype = auto_dtype if prec == "auto" else getattr(torch, prec)
        # rows per forward pass: big on a GPU, where per-call overhead dominates small batches
        self.plan = BatchPlan(
            train_batch=config.train_batch or (131072 if self.device.type == "cuda" else 8192),
            query_batch=config.query_batch,
        )
        self.cache = Cache()
        # parameters no live node of an exported graph reads (a pt2 tied LM's dead copy of the
        # tied weight) have zero gradient for every input: held fixed, out of ||theta|| and the
        # per-example updates, so a graph scores as the module it was exported from
        self.trainable = {
            n for n, p in model.named_parameters() if p.requires_grad
        } - unread_params(self.model)
        if not self.trainable:
            raise ValueError(
                "model has no trainable parameters (requires_grad=True); nothing to update"
            )
        self.sign = 1.0 if config.direction == "descent" else -1.0
        self.steps = config.steps or 1
        self._autocast = _AUTOCAST.get(config.autocast)
        self._compiled: Callable[..., torch.Tensor] | bool | None = None  # False: failed

    # ------------------------------------------------------------------ state
    @contextmanager
    def scoring(self) -> Iterator[ModelState]:
        """Eval mode for the duration of a call; the caller's modes are restored afterwards."""
        modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        state = ModelState(
            self.model, self.trainable, self.device, self.dtype, self.config.fingerprint()
        )
        try:
            with torch.enable_grad():
                yield state
        finally:
            for m, was in modes:
                m.training = was  # per module, without train()'s recursion (exported graphs)

    @contextmanager
    def bn_train(self, on: bool) -> Iterator[None]:
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

    # ------------------------------------------------------------------ forward and losses
    def forward(
        self,
        state: ModelState,
        params: Params,
        x: Inputs,
        buffers: Params | None = None,
        hot: bool = False,
    ) -> torch.Tensor:
        """The model under ``params`` on ``x``, in autocast if configured. ``hot``: the plain
        forward over the training set (never under vmap/grad), the one config.compile compiles."""
        tensors = {**state.fixed, **(buffers or {}), **params}
        x = each(x, lambda v: v.to(self.dtype) if v.is_floating_point() else v)
        # compiled for full training batches only: one static shape, no dynamic-shape compile
        full = hot and self.config.compile and n_rows(x) == self.plan.train_batch
        call = self._call_compiled if full and self._compiled is not False else self._call
        if self._autocast is None:
            return call(tensors, x)
        with torch.autocast(self.device.type, dtype=self._autocast):
            out = call(tensors, x)
        return out.to(self.dtype) if out.is_floating_point() else out

    def _call(self, tensors: Params, x: Inputs) -> torch.Tensor:
        """One functional forward; several named inputs go in as keyword arguments."""
        if isinstance(x, dict):
            raw = functional_call(self.model, tensors, (), x)
        else:
            raw = functional_call(self.model, tensors, (x,))
        return select_output(raw, self.output)

    def _call_compiled(self, tensors: Params, x: Inputs) -> torch.Tensor:
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

    def losses(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-example losses in float64."""
        return float64_losses(self.loss_fn, out, y)

    def losses_over(
        self, state: ModelState, params: Params, data: Examples, buffers: Params | None = None
    ) -> torch.Tensor:
        """Per-example losses [n] of ``data`` under ``params``, on the CPU."""
        parts = []
        with torch.no_grad():  # losses stay on the device until the end: one sync, not one a batch
            for _, xb, yb in data.batches(self.plan.train_batch, self.device):
                parts.append(self.losses(self.forward(state, params, xb, buffers, hot=True), yb))
        return torch.cat(parts).cpu() if parts else torch.empty(0, dtype=torch.float64)

    def query_losses(
        self, state: ModelState, params: Params, x: Inputs, y: torch.Tensor
    ) -> torch.Tensor:
        """Per-example losses of a small materialised set (queries)."""
        xc = each(x, lambda v: v.cpu())
        return self.losses_over(state, params, Examples("q", x=xc, y=y.cpu(), n=len(y)))

    def base_losses(self, state: ModelState, tr: Examples) -> torch.Tensor:
        """loss(z_i; theta) for every training point, cached per (model state, training set)."""
        return self.cache.base_losses.get(
            (state.key, data_key(tr)), lambda: self.losses_over(state, state.params, tr)
        )

    # ------------------------------------------------------------------ memory
    def resident(self, ex: Examples) -> Examples:
        """On a GPU, keep a training set on the device (once per data): every query chunk
        streams over it, and host-to-device copies would dominate. A row reader is copied batch
        by batch (never whole on the host). Larger sets stream."""
        if self.device.type != "cuda" or (ex.reader is None and (ex.x is None or ex.y is None)):
            return ex
        if ex.y is not None and ex.y.is_cuda:
            return ex
        key = data_key(ex)
        cached = self.cache.resident.peek(key)
        if cached is not None:
            return Examples(ex.name, x=cached[0], y=cached[1], n=ex.n, key=key)
        free, _ = torch.cuda.mem_get_info(self.device)
        if ex.x is not None and ex.y is not None:
            if sum(v.nbytes for v in parts(ex.x)) + ex.y.nbytes > free // 4:
                return ex
            self.cache.resident.clear()
            on = each(ex.x, lambda v: v.to(self.device))
            xy = self.cache.resident.put(key, (on, ex.y.to(self.device)))
            return Examples(ex.name, x=xy[0], y=xy[1], n=ex.n, key=key)
        x1, y1 = ex.take(slice(0, 1))  # a row reader: one row tells the size
        if (sum(v.nbytes for v in parts(x1)) + y1.nbytes) * ex.n > free // 8:
            return ex  # (batches and their concatenation both live on the device briefly)
        self.cache.resident.clear()
        xy = self.cache.resident.put(key, ex.copied_to(self.device, self.plan.train_batch))
        return Examples(ex.name, x=xy[0], y=xy[1], n=ex.n, key=key)

    def shrink(self, err: BaseException) -> None:
        """After an out-of-memory error: halve the batches and drop the cache."""
        self.plan.halve(err, self.device)
        self.cache.clear()  # device-resident data goes too; it is re-uploaded if it fits
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "device 'cuda' requested but no CUDA device is available; use device='auto'"
        )
    return dev


__all__ = ["AUTOCAST_MIN_STEP", "ModelState", "Runtime", "resolve_device"]
