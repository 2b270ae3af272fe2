"""Layers of plain ``nn.Module`` models as views the fast paths can use (what graph_view does
for exported graphs).

Inference-mode BatchNorm runs as one per-channel scale and shift (vmap batches its per-example
parameter gradients as elementwise products, not through batch_norm's backward rule), and
``nn.MultiheadAttention`` computes its attention in Python around a hookable in-projection
(:class:`LinearTap`) and its own ``out_proj`` module, so that both projections become low-rank
factors instead of per-example weight copies under vmap. Each view is a shallow copy of the
layer with a subclass of its class: the *same* Parameter and buffer objects under the same
names, train mode and any case the view does not cover (masks it does not know, cross
attention, dropout in training) run the layer's own forward. The caller's model is unchanged.
"""

from __future__ import annotations

import copy
import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

import torch
from torch import Tensor, nn

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class LinearTap(nn.Module):
    """``linear(x, weight, bias)`` as a module call, so forward hooks see a projection whose
    weight belongs to another module (nn.MultiheadAttention's ``in_proj_weight``)."""

    def forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return nn.functional.linear(x, weight, bias)


class _EvalBatchNorm:
    """Mixin: inference-mode batch norm with running statistics as a scale and shift when
    gradients are taken (without them the fused kernel is faster: the plain forward passes)."""

    def forward(self, x: Tensor) -> Tensor:
        bn: Any = self
        fused = bn.training or not torch.is_grad_enabled() or x.ndim < 2
        if fused or bn.running_mean is None or bn.running_var is None:
            out: Tensor = super().forward(x)  # type: ignore[misc]
            return out
        scale = torch.rsqrt(bn.running_var + bn.eps)
        shift = -bn.running_mean * scale
        if bn.weight is not None:
            scale = bn.weight * scale
            shift = bn.weight * shift + bn.bias
        view = (-1,) + (1,) * (x.ndim - 2)
        res: Tensor = x * scale.reshape(view) + shift.reshape(view)
        return res


_EVAL_BN = {cls: type(f"Engine{cls.__name__}", (_EvalBatchNorm, cls), {}) for cls in _BATCH_NORMS}


class EngineMultiheadAttention(nn.MultiheadAttention):
    """nn.MultiheadAttention whose self-attention (packed projection, no extra key/value bias,
    eval or no dropout) runs as Python ops around ``in_tap`` and ``out_proj``; anything else is
    nn.MultiheadAttention's own forward."""

    in_tap: LinearTap

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        if not self._covered(query, key, value, key_padding_mask, attn_mask, is_causal):
            return super().forward(
                query, key, value, key_padding_mask, need_weights, attn_mask,
                average_attn_weights, is_causal,
            )  # fmt: skip
        x = query if self.batch_first else query.transpose(0, 1)  # [B, L, E]
        b, n, e = x.shape
        h = self.num_heads
        qkv = self.in_tap(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = (t.reshape(b, n, h, e // h).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
        mask = self._mask(key_padding_mask, attn_mask, b, n, q.dtype)
        attn = None
        if need_weights:
            scores = (q * (1.0 / math.sqrt(e // h))) @ k.transpose(-2, -1)  # [B, H, L, L]
            attn = torch.softmax(scores if mask is None else scores + mask, dim=-1)
            heads = attn @ v
        else:  # as nn.MultiheadAttention: SDPA (its math kernel under the engine's vmap)
            heads = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = self.out_proj(heads.transpose(1, 2).reshape(b, n, e))
        if not self.batch_first:
            out = out.transpose(0, 1)
        if attn is None:
            return out, None
        return out, attn.mean(dim=1) if average_attn_weights else attn

    def _covered(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None,
        attn_mask: Tensor | None,
        is_causal: bool,
    ) -> bool:
        """The cases the Python attention reproduces (batched self-attention, 2-D masks)."""
        return (
            query is key
            and key is value
            and query.ndim == 3
            and self._qkv_same_embed_dim
            and self.in_proj_weight is not None
            and self.bias_k is None
            and not self.add_zero_attn
            and not (self.training and self.dropout > 0)
            and type(self.out_proj).forward is nn.Linear.forward
            and (attn_mask is None or attn_mask.ndim == 2)
            and (key_padding_mask is None or key_padding_mask.ndim == 2)
            and not (is_causal and attn_mask is None)
        )

    @staticmethod
    def _mask(
        key_padding_mask: Tensor | None, attn_mask: Tensor | None, b: int, n: int, dtype: Any
    ) -> Tensor | None:
        """Both masks as one additive float mask broadcasting to [B, H, L, L]."""
        out = None
        for m, shape in ((attn_mask, (1, 1, n, n)), (key_padding_mask, (b, 1, 1, n))):
            if m is None:
                continue
            if m.dtype == torch.bool:
                m = torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(m, -math.inf)
            m = m.to(dtype).reshape(shape)
            out = m if out is None else out + m
        return out


class EmbeddingTap(nn.Module):
    """``embedding(ids, weight)`` as a module call (forward hooks see an EmbeddingBag's
    lookup); ``padding_idx``: the bag's (that row's gradient is masked, as nn.Embedding's)."""

    def __init__(self, padding_idx: int | None) -> None:
        super().__init__()
        self.padding_idx = padding_idx

    def forward(self, ids: Tensor, weight: Tensor) -> Tensor:
        return nn.functional.embedding(ids, weight)


class EngineEmbeddingBag(nn.EmbeddingBag):
    """nn.EmbeddingBag whose fixed-length bags (2-D input, no offsets; sum or mean, per-sample
    weights with sum) run as a lookup through ``lookup_tap`` and a weighted sum over each bag
    (padding entries weigh 0 and are not counted by the mean); anything else is the layer's
    own forward."""

    lookup_tap: EmbeddingTap

    def forward(
        self, input: Tensor, offsets: Tensor | None = None, per_sample_weights: Tensor | None = None
    ) -> Tensor:
        weighted_mean = per_sample_weights is not None and self.mode != "sum"  # torch refuses
        if offsets is not None or input.ndim != 2 or self.mode == "max" or self.max_norm:
            return super().forward(input, offsets, per_sample_weights)
        if weighted_mean:
            return super().forward(input, offsets, per_sample_weights)
        rows: Tensor = self.lookup_tap(input, self.weight)  # [B, L, dim]
        keep = torch.ones_like(input, dtype=rows.dtype)
        if self.padding_idx is not None:
            keep = (input != self.padding_idx).to(rows.dtype)
        coef = keep if per_sample_weights is None else keep * per_sample_weights.to(rows.dtype)
        if self.mode == "mean":
            coef = coef / keep.sum(dim=1, keepdim=True).clamp_min(1)
        return (rows * coef.unsqueeze(-1)).sum(dim=1)


class _UnrolledRecurrence:
    """Mixin: nn.GRU / nn.LSTM / nn.RNN computed by torch's own decomposition of the fused op
    (a Python loop over time steps of linear and gate ops; the same function to rounding),
    which vmap batches over rows, where the fused op has no batching rule and the engine
    looped over rows one at a time. Packed sequences, unbatched input, LSTM projections and
    dropout in training run the layer's own forward."""

    _op: str  # the aten op of the layer's class

    def forward(self, input: Any, hx: Any = None) -> Any:
        rnn: Any = self
        getattr(rnn, "_update_flat_weights", lambda: None)()  # torch >= 2.2
        if (
            not isinstance(input, Tensor)
            or input.dim() != 3
            or rnn.__dict__.get("proj_size", 0)
            or (rnn.training and rnn.dropout)
        ):
            return super().forward(input, hx)  # type: ignore[misc]
        lstm = isinstance(rnn, nn.LSTM)
        if hx is None:
            batch = input.size(0 if rnn.batch_first else 1)
            dirs = 2 if rnn.bidirectional else 1
            h0 = input.new_zeros(rnn.num_layers * dirs, batch, rnn.hidden_size)
            hx = (h0, h0) if lstm else h0
        op = getattr(torch.ops.aten, self._op).input
        out = unrolled(
            op,
            input, list(hx) if lstm else hx, rnn._flat_weights, rnn.bias, rnn.num_layers,
            float(rnn.dropout), rnn.training, rnn.bidirectional, rnn.batch_first,
        )  # fmt: skip
        return (out[0], (out[1], out[2])) if lstm else (out[0], out[1])


def unrolled(op: Any, *args: Any) -> Any:
    """``op(*args)`` (a fused recurrent aten op) by torch's decomposition of it; an LSTM with
    oneDNN off: on a CPU its decomposition would call oneDNN's fused LSTM layer wherever its
    input needs no gradient, which vmap cannot batch either (and got wrong for stacked
    bidirectional LSTMs)."""
    from torch._decomp import get_decompositions

    fn = get_decompositions([op])[op]
    if op is not torch.ops.aten.lstm.input:
        return fn(*args)
    with _onednn_off():
        return fn(*args)


_ONEDNN = threading.Lock()
_onednn_users = [0, True]  # calls inside _onednn_off, the flag to restore when none is left


@contextmanager
def _onednn_off() -> Iterator[None]:
    """oneDNN off for the duration, counted across threads (a process-wide flag: the last of
    overlapping calls restores what the first found, so shards in threads cannot leave it
    off)."""
    with _ONEDNN:
        if _onednn_users[0] == 0:
            _onednn_users[1] = torch._C._get_mkldnn_enabled()
            torch._C._set_mkldnn_enabled(False)
        _onednn_users[0] += 1
    try:
        yield
    finally:
        with _ONEDNN:
            _onednn_users[0] -= 1
            if _onednn_users[0] == 0:
                torch._C._set_mkldnn_enabled(bool(_onednn_users[1]))


class EngineGRU(_UnrolledRecurrence, nn.GRU):
    _op = "gru"


class EngineLSTM(_UnrolledRecurrence, nn.LSTM):
    _op = "lstm"


class EngineRNN(_UnrolledRecurrence, nn.RNN):
    @property
    def _op(self) -> str:  # type: ignore[override]
        return "rnn_tanh" if self.nonlinearity == "tanh" else "rnn_relu"


RECURRENT_OPS = tuple(
    getattr(torch.ops.aten, name).input for name in ("gru", "lstm", "rnn_tanh", "rnn_relu")
)
_RECURRENT: dict[type[nn.Module], type[nn.Module]] = {
    nn.GRU: EngineGRU, nn.LSTM: EngineLSTM, nn.RNN: EngineRNN,
}  # fmt: skip


def module_view(mod: nn.Module) -> nn.Module | None:
    """The engine's view of one layer (see module docstring), or None if it has none."""
    cls = type(mod)
    if cls in _EVAL_BN:
        view = shallow(mod)
        view.__class__ = _EVAL_BN[cls]
        return view
    if cls is nn.EmbeddingBag and not mod.scale_grad_by_freq and not mod.sparse:
        view = shallow(mod)
        view.__class__ = EngineEmbeddingBag
        view.__dict__["lookup_tap"] = EmbeddingTap(
            cast("int | None", mod.padding_idx)
        )  # not a registered child
        return view
    if cls in _RECURRENT:
        view = shallow(mod)
        view.__class__ = _RECURRENT[cls]
        # its own list: functional_call's setattr writes the swapped tensors into it in place
        view.__dict__["_flat_weights"] = list(cast("list[Tensor]", mod._flat_weights))
        return view
    if cls is nn.MultiheadAttention:
        view = shallow(mod)
        view.__class__ = EngineMultiheadAttention
        view.__dict__["in_tap"] = LinearTap()  # not a registered child: no new module names
        return view
    return None


def shallow(mod: nn.Module) -> nn.Module:
    """A copy with its own parameter/buffer/module dicts holding the same tensors and children."""
    clone = copy.copy(mod)
    for attr in ("_modules", "_parameters", "_buffers"):
        clone.__dict__[attr] = dict(getattr(mod, attr))
    return clone


__all__ = [
    "RECURRENT_OPS",
    "EmbeddingTap",
    "EngineEmbeddingBag",
    "EngineGRU",
    "EngineLSTM",
    "EngineMultiheadAttention",
    "EngineRNN",
    "LinearTap",
    "module_view",
    "shallow",
    "unrolled",
]
