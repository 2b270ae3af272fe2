"""Engine tests of the task kinds: each built-in loss against its textbook formula and at
confident predictions, scores against a by-hand SGD step on both plain paths, messages that
name the kind that fits, several named inputs, integer inputs and the output selector."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from mirrorinf import ForwardInf, ForwardInfConfig
from mirrorinf.engine import (
    binary_cross_entropy,
    default_loss,
    multilabel_bce,
    sequence_cross_entropy,
    squared_error,
)

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _textbook(kind: str) -> Loss:
    """torch's own per-example losses, written the usual way."""
    if kind == "binary":
        return lambda z, y: F.binary_cross_entropy_with_logits(
            z.reshape(len(y)), y.double(), reduction="none"
        )
    if kind == "regression":
        return lambda z, y: (
            F.mse_loss(z, y.double().reshape(z.shape), reduction="none").reshape(len(y), -1).sum(1)
        )
    if kind == "multilabel":
        return lambda z, y: F.binary_cross_entropy_with_logits(z, y.double(), reduction="none").sum(
            1
        )
    if kind == "sequence":

        def seq(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            tok = F.cross_entropy(z.transpose(1, 2), y, reduction="none", ignore_index=-100)
            return tok.sum(1) / (y != -100).sum(1).clamp_min(1)

        return seq
    return lambda z, y: F.cross_entropy(z, y, reduction="none")


def _targets(kind: str, n: int, gen: torch.Generator) -> torch.Tensor:
    if kind == "binary":
        return torch.randint(0, 2, (n,), generator=gen)
    if kind == "regression":
        return torch.randn(n, 2, generator=gen, dtype=torch.float64)
    if kind == "multilabel":
        return torch.randint(0, 2, (n, 4), generator=gen).double()
    if kind == "sequence":
        y = torch.randint(0, 5, (n, 6), generator=gen)
        y[:, -1] = -100  # causal LM: the last position has no next token
        y[0, :3] = -100
        return y
    return torch.randint(0, 3, (n,), generator=gen)


_OUT = {
    "binary": (1,),
    "regression": (2,),
    "multilabel": (4,),
    "sequence": (6, 5),
    "classification": (3,),
}
KINDS = list(_OUT)


@pytest.mark.parametrize("kind", KINDS)
def test_loss_matches_textbook_formula(kind):
    gen = torch.Generator().manual_seed(0)
    y = _targets(kind, 32, gen)
    z = 3 * torch.randn(32, *_OUT[kind], generator=gen, dtype=torch.float64)
    got = default_loss(kind)(z, y)
    assert got.shape == (32,) and got.dtype == torch.float64
    torch.testing.assert_close(got, _textbook(kind)(z, y), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    ("loss", "z", "y"),
    [
        (binary_cross_entropy, [[40.0], [41.0]], [1, 1]),
        (binary_cross_entropy, [[-40.0], [-41.0]], [0, 0]),
        (multilabel_bce, [[40.0, -40.0], [41.0, -41.0]], [[1.0, 0.0], [1.0, 0.0]]),
        (squared_error, [[1.0 + 1e-9], [1.0 + 2e-9]], [1.0, 1.0]),
    ],
)
def test_confident_predictions_keep_relative_precision(loss, z, y):
    """Two well-fit examples: both losses far below float64's epsilon but non-zero and
    different, so their difference (what a score is) does not vanish."""
    out = loss(torch.tensor(z, dtype=torch.float64), torch.tensor(y))
    assert (out > 0).all() and out[0] != out[1], out
    assert float(out.max()) < 1e-15


def test_sequence_loss_keeps_precision_and_ignores_masked_positions():
    z = torch.zeros(2, 3, 4, dtype=torch.float64)
    z[0, :, 1] = 50.0
    z[1, :, 1] = 51.0
    y = torch.tensor([[1, 1, -100], [1, -100, -100]])
    out = sequence_cross_entropy(z, y)
    assert (out > 0).all() and out[0] != out[1] and float(out.max()) < 1e-20
    # a masked position with a wrong, confident label changes nothing
    z2 = z.clone()
    z2[0, 2, 3] = 100.0
    assert torch.equal(sequence_cross_entropy(z2, y), out)
    # an example with every position masked scores 0, not NaN
    assert float(sequence_cross_entropy(z, torch.full((2, 3), -100))[0]) == 0.0


# ---------------------------------------------------------------- scores against by hand
class _SeqMLP(nn.Module):
    """Token features [n, T, F] -> logits [n, T, V]: all Linear, so the rank-1 path applies."""

    def __init__(self, f: int = 4, v: int = 5) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(f, 8), nn.Linear(8, v)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


def _setup(kind: str, n: int = 40) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    y = _targets(kind, n, gen)
    if kind == "sequence":
        return _SeqMLP(), torch.randn(n, 6, 4, generator=gen), y
    width = _OUT[kind][0]
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, width))
    return model, torch.randn(n, 5, generator=gen), y.float() if y.is_floating_point() else y


def by_hand(model: nn.Module, kind: str, train, queries, lr: float) -> torch.Tensor:
    """loss_i(theta) - loss_i(theta after one torch.optim.SGD step on loss(q)), float64."""
    loss = _textbook(kind)
    x, y = train
    ref = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        base = loss(ref(x.double()), y)
    cols = []
    for j in range(len(queries[1])):
        m = copy.deepcopy(ref)
        opt = torch.optim.SGD(m.parameters(), lr=lr)
        loss(m(queries[0][j : j + 1].double()), queries[1][j : j + 1]).sum().backward()
        opt.step()
        with torch.no_grad():
            cols.append(base - loss(m(x.double()), y))
    return torch.stack(cols, dim=1)


@pytest.mark.parametrize("fast_path", ["auto", "off"])
@pytest.mark.parametrize("kind", KINDS)
def test_scores_match_a_by_hand_sgd_step(kind, fast_path):
    model, x, y = _setup(kind)
    cfg = ForwardInfConfig(lr=1e-2, precision="float64", fast_path=fast_path)
    fi = ForwardInf(model, cfg, kind=kind)
    got = fi.pairwise((x, y), (x[:3], y[:3]))
    # the rank-1 path supports every kind (the loss is any function of the outputs); it
    # verified itself against the generic path before it was used
    assert fi.last_report.path == ("lowrank" if fast_path == "auto" else "generic")
    want = by_hand(model, kind, (x, y), (x[:3], y[:3]), lr=1e-2)
    err = float((got.double() - want).abs().max() / want.abs().max())
    assert err < 1e-5, err
    si = fi.self_influence((x, y))
    torch.testing.assert_close(si[:3], got.diagonal(), rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("kind", ["binary", "regression", "multilabel", "sequence"])
def test_lowrank_agrees_with_generic_in_float32(kind):
    model, x, y = _setup(kind, n=60)
    fast = ForwardInf(model, kind=kind)
    slow = ForwardInf(model, ForwardInfConfig(fast_path="off"), kind=kind)
    a, b = fast.pairwise((x, y), (x[:4], y[:4])), slow.pairwise((x, y), (x[:4], y[:4]))
    assert fast.last_report.path == "lowrank" and slow.last_report.path == "generic"
    assert float((a - b).abs().max() / b.abs().max()) < 1e-3


def test_custom_loss_is_used():
    model, x, y = _setup("classification")
    calls = []

    def smoothed(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        calls.append(len(t))
        return F.cross_entropy(out, t, reduction="none", label_smoothing=0.2)

    plain = ForwardInf(model).self_influence((x, y))
    custom = ForwardInf(model, loss_fn=smoothed).self_influence((x, y))
    assert calls and not torch.allclose(plain, custom)


# ---------------------------------------------------------------- errors that lead somewhere
@pytest.mark.parametrize(
    ("kind", "width", "y", "fix"),
    [
        ("classification", 1, torch.randint(0, 2, (30,)), "set task.kind: binary"),
        ("classification", 1, torch.randn(30), "set task.kind: regression"),
        ("classification", 3, torch.randint(0, 2, (30, 3)).float(), "set task.kind: multilabel"),
        ("binary", 3, torch.randint(0, 3, (30,)), "set task.kind: classification"),
        ("regression", 3, torch.randint(0, 3, (30,)).float(), "set task.kind: classification"),
        ("multilabel", 1, torch.randint(0, 2, (30,)), "set task.kind: binary"),
    ],
)
def test_wrong_kind_names_the_kind_that_fits(kind, width, y, fix):
    model = nn.Linear(5, width)
    with pytest.raises(ValueError, match=fix):
        ForwardInf(model, kind=kind).self_influence((torch.randn(30, 5), y))


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="unknown task kind 'ranking'"):
        ForwardInf(nn.Linear(2, 2), kind="ranking")


# ---------------------------------------------------------------- inputs and outputs
class _TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(5, 3)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.lin(torch.cat([a, b], dim=1))


@pytest.mark.parametrize("fast_path", ["auto", "off"])
def test_named_inputs_score_like_one_concatenated_input(fast_path):
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(30, 5, generator=gen), torch.randint(0, 3, (30,), generator=gen)
    two = _TwoInputs()
    cfg = ForwardInfConfig(fast_path=fast_path, precision="float64")
    d = {"b": x[:, 2:], "a": x[:, :2]}  # order does not matter: passed by name
    got = ForwardInf(two, cfg).pairwise((d, y), ({k: v[:4] for k, v in d.items()}, y[:4]))
    want = ForwardInf(two.lin, cfg).pairwise((x, y), (x[:4], y[:4]))
    torch.testing.assert_close(got, want)
    s2 = ForwardInf(two, cfg).self_influence((d, y))
    torch.testing.assert_close(s2, ForwardInf(two.lin, cfg).self_influence((x, y)))
    g2 = ForwardInf(two, cfg).group((d, y), ({k: v[:6] for k, v in d.items()}, y[:6]))
    torch.testing.assert_close(g2, ForwardInf(two.lin, cfg).group((x, y), (x[:6], y[:6])))


class _Bag(nn.Module):
    """Bag of tokens: the embedding needs integer ids (a float input would fail)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.EmbeddingBag(20, 8, mode="mean")
        self.head = nn.Linear(8, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        assert not ids.is_floating_point()
        return self.head(self.emb(ids))


def test_integer_inputs_stay_integer():
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 20, (40, 7), generator=gen)
    y = (x == 3).any(1).long()
    fi = ForwardInf(_Bag(), ForwardInfConfig(precision="float64", lr=1e-2))
    got = fi.pairwise((x, y), (x[:3], y[:3]))
    want = by_hand(_BagDouble(fi.model), "classification", (x, y), (x[:3], y[:3]), lr=1e-2)
    err = float((got.double() - want).abs().max() / want.abs().max())
    assert err < 1e-5, err


class _BagDouble(nn.Module):
    """The bag model for by_hand, which calls .double() on its input: ids go back to int."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.long())


class _DictOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"hidden": x, "logits": self.lin(x)}


def test_output_selector_picks_the_prediction():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(30, 5, generator=gen), torch.randint(0, 3, (30,), generator=gen)
    model = _DictOut()
    got = ForwardInf(model, output="logits").self_influence((x, y))
    torch.testing.assert_close(got, ForwardInf(model.lin).self_influence((x, y)))
    with pytest.raises(ValueError, match=r"set task\.output: logits"):
        ForwardInf(model).self_influence((x, y))
    with pytest.raises(ValueError, match="has no such attribute or key"):
        ForwardInf(model, output="scores").self_influence((x, y))
