"""Property-based tests (hypothesis) of the Forward-INF engine on random small models and data.

The unit tests in ``test_engine.py`` check the math on a few hand-picked models; these check
invariants that must hold for *every* model and data set, over random architectures (1-3
Linear layers of random widths, activations and bias, which take the low-rank fast path; the
same with LayerNorm or BatchNorm1d, and a tiny conv net with or without BatchNorm2d, which take
the generic path), random n_train (1..20), n_query (1..6), n_classes (2..5), feature scales
(0.01..10), the caller's model in train, eval or mixed mode, and both modes (plain; anchored
with tinier sizes and fewer examples, as it builds a Lanczos basis of the training Hessian):

* shapes and finiteness: ``pairwise`` is [n_train, n_query], ``group`` and ``self_influence``
  are [n_train], all finite float32, and ``last_report`` describes the call;
* the caller's model is untouched: every parameter and buffer bitwise equal, every module's
  training flag and ``requires_grad`` as before, no hook left behind (the fast path hooks
  Linear layers during a call), also with ``bn_update`` and when a call raises;
* determinism: two fresh engines with the same config and seed give bitwise equal scores (with
  the seeded sphere perturbation too), and so do repeated calls on one engine (cached state);
* permutation equivariance: permuting the training rows permutes the rows of the result.
  Not bitwise: a row's forward pass rounds differently with its position in a batch, and
  anchored mode sums its Hessian-vector products in row order. The tolerance is a noise floor
  from the dtype's epsilon, the loss and activation magnitudes and the score's unit (1/lr, or
  1/finite-difference step in anchored mode); ``test_tolerance_has_teeth`` checks that a
  wrong row order still fails;
* self-consistency: the diagonal of ``pairwise(train, train)`` equals ``self_influence`` (the
  same update of the same point) and, on a trained model, is > 0 wherever the point has a
  gradient: to first order the drop is ||g||^2 in plain mode and g^T (|H| + delta)^-1 g > 0
  in anchored mode (the filter is positive on every eigenvalue). A point without gradient
  (dead ReLUs) scores exactly 0; one whose ||g||^2 is below float32's range rounds to 0 in the
  float32 result, so "> 0" is asserted where ||g|| > 1e-18;
* when anchored mode refuses for want of positive curvature, an exact Hessian confirms it.

Regression tests for what these properties found (fixed in the engine): a reused engine scored
a new training set with a freed set's cached values when the tensors' ids were reused (and
missed weights edited through ``.data``); the automatic float32 step overflowed (NaN scores)
for float32-subnormal gradients; anchored mode crashed on a single training row.
``derandomize=True`` makes every run draw the same examples, so CI is deterministic; the whole
file takes ~30 s on a loaded 2-core machine.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from copy import deepcopy
from dataclasses import dataclass

import pytest
import torch
from engine_helpers import brute_force_scores
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call

from mirrorinf import ForwardInf, ForwardInfConfig, SphereConfig
from mirrorinf.engine import cross_entropy

DataPair = tuple[torch.Tensor, torch.Tensor]

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "sigmoid": nn.Sigmoid,
    "identity": nn.Identity,
}
KINDS = ("linear", "layernorm", "batchnorm", "conv", "conv_bn")

SETTINGS = {
    "deadline": None,
    "derandomize": True,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
}


@dataclass(frozen=True)
class Arch:
    """A small random classifier: ``kind`` picks the family, the rest its shape."""

    kind: str  # linear | layernorm | batchnorm (1d) | conv | conv_bn (Conv2d + BatchNorm2d)
    widths: tuple[int, ...]  # hidden widths: len 0..2 -> 1..3 Linear layers
    act: str
    bias: bool
    d_in: int  # features (MLPs) or input channels (conv: [d_in, 4, 4] images)
    n_classes: int
    seed: int

    @property
    def in_shape(self) -> tuple[int, ...]:
        return (self.d_in, 4, 4) if self.kind.startswith("conv") else (self.d_in,)

    @property
    def fast_path_eligible(self) -> bool:
        return self.kind == "linear"


def build_model(arch: Arch) -> nn.Module:
    """The model of ``arch``, initialised from ``arch.seed`` (global RNG state untouched)."""
    with torch.random.fork_rng():
        torch.manual_seed(arch.seed)
        act = ACTIVATIONS[arch.act]
        layers: list[nn.Module] = []
        if arch.kind.startswith("conv"):
            ch = arch.widths[0] if arch.widths else 3
            layers.append(nn.Conv2d(arch.d_in, ch, 3, padding=1))
            if arch.kind == "conv_bn":
                layers.append(nn.BatchNorm2d(ch))
            layers += [act(), nn.Flatten()]
            prev = ch * 16
        else:
            prev = arch.d_in
        for w in arch.widths:
            layers.append(nn.Linear(prev, w, bias=arch.bias))
            if arch.kind == "layernorm":
                layers.append(nn.LayerNorm(w))
            elif arch.kind == "batchnorm":
                layers.append(nn.BatchNorm1d(w))
            layers.append(act())
            prev = w
        layers.append(nn.Linear(prev, arch.n_classes, bias=arch.bias))
        model = nn.Sequential(*layers)
        with torch.no_grad():
            for mod in model.modules():
                if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm)):
                    mod.weight.uniform_(0.5, 1.5)
                    mod.bias.normal_(0, 0.1)
                if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):  # non-trivial statistics
                    assert mod.running_mean is not None and mod.running_var is not None
                    mod.running_mean.normal_(0, 0.5)
                    mod.running_var.uniform_(0.5, 2.0)
                    mod.num_batches_tracked.fill_(7)
    return model


def make_data(arch: Arch, n: int, scale: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *arch.in_shape, generator=gen) * scale
    y = torch.randint(0, arch.n_classes, (n,), generator=gen)
    return x, y


@st.composite
def archs(draw: st.DrawFn, kinds: tuple[str, ...] = KINDS) -> Arch:
    kind = draw(st.sampled_from(kinds))
    n_hidden = draw(st.integers(1 if kind in ("layernorm", "batchnorm") else 0, 2))
    return Arch(
        kind=kind,
        widths=tuple(draw(st.lists(st.integers(2, 10), min_size=n_hidden, max_size=n_hidden))),
        act=draw(st.sampled_from(sorted(ACTIVATIONS))),
        bias=draw(st.booleans()),
        d_in=draw(st.integers(1, 2) if kind.startswith("conv") else st.integers(1, 5)),
        n_classes=draw(st.integers(2, 5)),
        seed=draw(st.integers(0, 2**16)),
    )


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine the
    thread pool's contention made calls 20-50x slower; restore the caller's setting after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


scales = st.sampled_from([0.01, 0.1, 0.5, 1.0, 3.0, 10.0])
train_flags = st.sampled_from(["eval", "train", "mixed"])


def set_flags(model: nn.Module, flags: str) -> None:
    """Put the caller's model in eval, train, or a mixture (first child eval, rest train)."""
    model.train(flags != "eval")
    if flags == "mixed":
        next(iter(model.children())).eval()


@dataclass
class Snapshot:
    state: dict[str, torch.Tensor]
    flags: list[bool]
    requires_grad: list[bool]
    param_ids: list[int]


def snapshot(model: nn.Module) -> Snapshot:
    return Snapshot(
        state={k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        flags=[m.training for m in model.modules()],
        requires_grad=[p.requires_grad for p in model.parameters()],
        param_ids=[id(p) for p in model.parameters()],
    )


def scene(
    arch: Arch, flags: str, n_train: int, n_query: int, scale: float, data_seed: int
) -> tuple[nn.Module, Snapshot, DataPair, DataPair]:
    """The model in the given train/eval flags, its snapshot, training set and queries."""
    model = build_model(arch)
    set_flags(model, flags)
    return (
        model,
        snapshot(model),
        make_data(arch, n_train, scale, data_seed),
        make_data(arch, n_query, scale, data_seed + 1),
    )


def assert_untouched(model: nn.Module, snap: Snapshot) -> None:
    state = model.state_dict(keep_vars=True)
    assert state.keys() == snap.state.keys()
    for k, v in state.items():
        assert v.dtype == snap.state[k].dtype and v.device == snap.state[k].device, k
        assert torch.equal(v.detach(), snap.state[k]), f"{k} changed"
    assert [m.training for m in model.modules()] == snap.flags, "training flags changed"
    assert [p.requires_grad for p in model.parameters()] == snap.requires_grad
    assert [id(p) for p in model.parameters()] == snap.param_ids, "parameters replaced"
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks, f"hook left on {m}"
        assert not m._backward_hooks, f"hook left on {m}"


def config(mode: str, **kw: object) -> ForwardInfConfig:
    return ForwardInfConfig(mode=mode, **kw)  # type: ignore[arg-type]


def noise_floor(fi: ForwardInf, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Absolute float noise of the last call's scores: rounding of the losses and logits at the
    engine's dtype, divided by the score's unit (the smallest automatic lr in plain mode, the
    smallest finite-difference step in anchored mode, 1 for raw loss drops)."""
    rep = fi.last_report
    assert rep is not None
    eps = torch.finfo(fi.dtype).eps
    copy = deepcopy(model).to(fi.dtype).eval()
    with torch.no_grad():
        h = x.to(fi.dtype)
        mag = 1.0
        for layer in copy.children() if isinstance(copy, nn.Sequential) else [copy]:
            h = layer(h)
            mag = max(mag, float(h.abs().max()))
        loss = float(cross_entropy(h.double(), y).max())
    if rep.scale in ("per_unit_lr", "per_unit_query_weight") and rep.lr_min > 0:
        unit = rep.lr_min
    else:
        unit = 1.0
    return eps * (1.0 + loss + mag) / unit


def exact_max_curvature(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Largest eigenvalue of the mean training loss's Hessian (float64, eval mode, exact)."""
    ref = deepcopy(model).double().eval()
    names = [n for n, _ in ref.named_parameters()]
    shapes = [p.shape for _, p in ref.named_parameters()]
    flat = torch.cat([p.detach().flatten() for p in ref.parameters()])

    def objective(v: torch.Tensor) -> torch.Tensor:
        parts = torch.split(v, [math.prod(s) for s in shapes])
        params = {n: t.reshape(s) for n, t, s in zip(names, parts, shapes, strict=True)}
        return cross_entropy(functional_call(ref, params, (x.double(),)), y).mean()

    hess = torch.func.hessian(objective)(flat)
    return float(torch.linalg.eigvalsh(hess).max())


def anchored(
    call: Callable[[], torch.Tensor], model: nn.Module, x: torch.Tensor, y: torch.Tensor
) -> torch.Tensor | None:
    """Run an anchored-mode call; None if the engine refused for want of positive curvature
    (documented: the automatic damping scales with it), after checking that the refusal is
    right."""
    try:
        return call()
    except ValueError as exc:
        if "no positive curvature" not in str(exc):
            raise
    lam = exact_max_curvature(model, x, y)
    assert lam <= 1e-9, f"refused for want of positive curvature, but lambda_max = {lam:.3g}"
    return None


# ================================================================== shapes, finiteness, model


@settings(max_examples=40, **SETTINGS)
@given(
    arch=archs(),
    n_train=st.integers(1, 20),
    n_query=st.integers(1, 6),
    scale=scales,
    flags=train_flags,
    fast_path=st.sampled_from(["auto", "off"]),
    data_seed=st.integers(0, 2**16),
)
def test_plain_shapes_finite_model_untouched(
    arch: Arch,
    n_train: int,
    n_query: int,
    scale: float,
    flags: str,
    fast_path: str,
    data_seed: int,
) -> None:
    model, snap, train, queries = scene(arch, flags, n_train, n_query, scale, data_seed)
    fi = ForwardInf(model, config("plain", fast_path=fast_path), device="cpu")

    pair = fi.pairwise(train, queries)
    assert pair.shape == (n_train, n_query) and pair.dtype == torch.float32
    assert torch.isfinite(pair).all()
    rep = fi.last_report
    assert rep is not None and rep.kind == "pairwise"
    assert (rep.n_train, rep.n_query) == (n_train, n_query)
    assert rep.query_self_drop is not None and rep.query_self_drop.shape == (n_query,)
    if fast_path == "off" or not arch.fast_path_eligible:
        assert rep.path == "generic"
    assert_untouched(model, snap)

    grp = fi.group(train, queries)
    assert grp.shape == (n_train,) and grp.dtype == torch.float32
    assert torch.isfinite(grp).all()
    assert fi.last_report is not None and fi.last_report.kind == "group"
    assert_untouched(model, snap)

    self_inf = fi.self_influence(train)
    assert self_inf.shape == (n_train,) and self_inf.dtype == torch.float32
    assert torch.isfinite(self_inf).all()
    assert fi.last_report is not None and fi.last_report.kind == "self"
    assert_untouched(model, snap)


@settings(max_examples=8, **SETTINGS)
@given(
    arch=archs(),
    n_train=st.integers(2, 8),  # n_train=1: see test_anchored_single_training_row
    n_query=st.integers(1, 3),
    scale=scales,
    flags=train_flags,
    data_seed=st.integers(0, 2**16),
)
def test_anchored_shapes_finite_model_untouched(
    arch: Arch, n_train: int, n_query: int, scale: float, flags: str, data_seed: int
) -> None:
    model, snap, (x, y), queries = scene(arch, flags, n_train, n_query, scale, data_seed)
    fi = ForwardInf(model, config("anchored", steps=20), device="cpu")

    pair = anchored(lambda: fi.pairwise((x, y), queries), model, x, y)
    assert_untouched(model, snap)
    if pair is not None:
        assert pair.shape == (n_train, n_query) and pair.dtype == torch.float32
        assert torch.isfinite(pair).all()
        assert fi.last_report is not None and fi.last_report.path == "anchored"

    grp = anchored(lambda: fi.group((x, y), queries), model, x, y)
    assert_untouched(model, snap)
    if grp is not None:
        assert grp.shape == (n_train,) and torch.isfinite(grp).all()

    self_inf = fi.self_influence((x, y))  # always plain, whatever the mode
    assert self_inf.shape == (n_train,) and torch.isfinite(self_inf).all()
    assert_untouched(model, snap)


@settings(max_examples=10, **SETTINGS)
@given(
    arch=archs(kinds=("batchnorm", "conv_bn")),
    n_train=st.integers(1, 10),
    n_query=st.integers(1, 4),
    scale=scales,
    flags=train_flags,
    data_seed=st.integers(0, 2**16),
)
def test_bn_update_leaves_running_stats_alone(
    arch: Arch, n_train: int, n_query: int, scale: float, flags: str, data_seed: int
) -> None:
    """With bn_update the BatchNorm statistics move during the update, but in private copies.

    BatchNorm1d on [1, features] cannot run in train mode on one example: the engine must say
    so (a ValueError naming bn_update) and still leave the model as it was.
    """
    model, snap, train, queries = scene(arch, flags, n_train, n_query, scale, data_seed)
    fi = ForwardInf(model, config("plain", bn_update=True), device="cpu")
    if arch.kind == "batchnorm":
        with pytest.raises(ValueError, match="bn_update needs BatchNorm inputs"):
            fi.pairwise(train, queries)
        assert_untouched(model, snap)
        return
    pair = fi.pairwise(train, queries)
    assert pair.shape == (n_train, n_query) and torch.isfinite(pair).all()
    assert_untouched(model, snap)
    self_inf = fi.self_influence(train)
    assert self_inf.shape == (n_train,) and torch.isfinite(self_inf).all()
    assert_untouched(model, snap)


@settings(max_examples=20, **SETTINGS)
@given(
    arch=archs(),
    n_train=st.integers(1, 12),
    n_query=st.integers(1, 3),
    scale=scales,
    bn_update=st.booleans(),
    data_seed=st.integers(0, 2**16),
)
def test_plain_scores_are_loss_drops_of_a_real_step(
    arch: Arch, n_train: int, n_query: int, scale: float, bn_update: bool, data_seed: int
) -> None:
    """Every architecture (LayerNorm, BatchNorm, convolutions): with a fixed lr, score(i, q) is
    loss_i(theta) - loss_i(theta after one SGD step on q), the step taken by hand on a deepcopy
    (with bn_update, BatchNorm in train mode during the step, so its statistics move)."""
    assume(not (bn_update and arch.kind == "batchnorm"))  # BatchNorm1d cannot see one example
    model = build_model(arch).eval()
    train = make_data(arch, n_train, scale, data_seed)
    queries = make_data(arch, n_query, scale, data_seed + 1)
    cfg = config("plain", lr=1e-3, precision="float64", bn_update=bn_update)
    got = ForwardInf(model, cfg, device="cpu").pairwise(train, queries)
    want = brute_force_scores(model, train, queries, lr=1e-3, bn_update=bn_update)
    with torch.no_grad():
        out = deepcopy(model).double()(train[0].double())
        loss = float(nn.functional.cross_entropy(out, train[1]))
    tol = 1e-6 * float(want.abs().max()) + 1e-12 * (1.0 + loss)
    assert float((got.double() - want).abs().max()) <= tol


@settings(max_examples=15, **SETTINGS)
@given(
    arch=archs(kinds=("linear",)),
    n_train=st.integers(1, 20),
    n_query=st.integers(1, 6),
    scale=scales,
    data_seed=st.integers(0, 2**16),
)
def test_fast_path_equals_generic_path(
    arch: Arch, n_train: int, n_query: int, scale: float, data_seed: int
) -> None:
    """Linear-only models: the low-rank rewrite is exact, so it is taken (float64, where its
    self-check against the generic path cannot fail on rounding) and agrees with the generic
    path up to the noise floor."""
    model = build_model(arch).eval()
    x, y = make_data(arch, n_train, scale, data_seed)
    queries = make_data(arch, n_query, scale, data_seed + 1)
    fast = ForwardInf(model, config("plain", precision="float64"), device="cpu")
    slow = ForwardInf(model, config("plain", precision="float64", fast_path="off"), device="cpu")
    for verb in ("pairwise", "self_influence"):
        args = () if verb == "self_influence" else (queries,)
        a, b = getattr(fast, verb)((x, y), *args), getattr(slow, verb)((x, y), *args)
        assert fast.last_report is not None and fast.last_report.path == "lowrank"
        floor = max(noise_floor(fast, model, x, y), noise_floor(slow, model, x, y))
        assert_close_up_to(a, b, floor, f"{verb}: low-rank vs generic")


# ================================================================== determinism


@settings(max_examples=20, **SETTINGS)
@given(
    arch=archs(),
    mode=st.sampled_from(["plain", "plain", "anchored"]),
    n_train=st.integers(1, 12),
    n_query=st.integers(1, 4),
    scale=scales,
    seed=st.integers(0, 2**31 - 1),
    sphere=st.booleans(),
    data_seed=st.integers(0, 2**16),
)
def test_deterministic_for_a_fixed_seed(
    arch: Arch,
    mode: str,
    n_train: int,
    n_query: int,
    scale: float,
    seed: int,
    sphere: bool,
    data_seed: int,
) -> None:
    """Fresh engines with one config and seed agree bitwise; so do repeated calls on one."""
    if mode == "anchored":
        assume(n_train >= 2)  # n_train=1: see test_anchored_single_training_row
    model = build_model(arch).eval()
    train = make_data(arch, n_train, scale, data_seed)
    queries = make_data(arch, n_query, scale, data_seed + 1)
    # a sphere with a huge loss floor perturbs every query with the seeded generator
    sph = SphereConfig(loss_floor=1e6, max_tries=2) if sphere else None
    steps = 20 if mode == "anchored" else None
    cfg = config(mode, seed=seed, sphere=sph, steps=steps)
    a, b = ForwardInf(model, cfg, device="cpu"), ForwardInf(model, cfg, device="cpu")

    def call(fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        out = anchored(fn, model, *train) if mode == "anchored" else fn()
        assume(out is not None)
        assert out is not None
        return out

    pair_a = call(lambda: a.pairwise(train, queries))
    assert torch.equal(pair_a, call(lambda: b.pairwise(train, queries)))
    assert torch.equal(pair_a, call(lambda: a.pairwise(train, queries)))
    grp_a = call(lambda: a.group(train, queries))
    assert torch.equal(grp_a, call(lambda: b.group(train, queries)))
    assert torch.equal(grp_a, call(lambda: a.group(train, queries)))
    self_a = a.self_influence(train)
    assert torch.equal(self_a, b.self_influence(train))
    assert torch.equal(self_a, a.self_influence(train))


# ================================================================== permutation equivariance


def assert_close_up_to(
    got: torch.Tensor, want: torch.Tensor, floor: float, what: str, rtol: float = 1e-5
) -> None:
    """|got - want| <= 8 * floor + rtol * |want| elementwise (rtol: the float32 result).

    Over 900 random plain-mode cases the largest |diff| / floor seen was 0.48, so 8 leaves a
    16x margin; test_tolerance_has_teeth checks that a wrong row order still fails."""
    tol = 8.0 * floor + rtol * want.abs()
    excess = (got - want).abs() - tol
    assert bool((excess <= 0).all()), (
        f"{what}: max |diff| {float((got - want).abs().max()):.3g}, "
        f"noise floor {floor:.3g}, max |score| {float(want.abs().max()):.3g}"
    )


@settings(max_examples=30, **SETTINGS)
@given(
    arch=archs(),
    precision=st.sampled_from(["auto", "float64"]),
    n_train=st.integers(2, 20),
    n_query=st.integers(1, 6),
    scale=scales,
    data_seed=st.integers(0, 2**16),
    perm_seed=st.integers(0, 2**16),
)
def test_plain_permuting_training_rows_permutes_scores(
    arch: Arch,
    precision: str,
    n_train: int,
    n_query: int,
    scale: float,
    data_seed: int,
    perm_seed: int,
) -> None:
    model = build_model(arch).eval()
    x, y = make_data(arch, n_train, scale, data_seed)
    queries = make_data(arch, n_query, scale, data_seed + 1)
    perm = torch.randperm(n_train, generator=torch.Generator().manual_seed(perm_seed))
    cfg = config("plain", precision=precision)

    for verb in ("pairwise", "group", "self_influence"):
        fi, fp = ForwardInf(model, cfg, device="cpu"), ForwardInf(model, cfg, device="cpu")
        args = () if verb == "self_influence" else (queries,)
        ref = getattr(fi, verb)((x, y), *args)
        floor = noise_floor(fi, model, x, y)
        got = getattr(fp, verb)((x[perm], y[perm]), *args)
        floor = max(floor, noise_floor(fp, model, x[perm], y[perm]))
        assert_close_up_to(got, ref[perm], floor, verb)


@settings(max_examples=6, **SETTINGS)
@given(
    arch=archs(kinds=("linear", "layernorm", "batchnorm")),
    n_train=st.integers(2, 8),
    n_query=st.integers(1, 3),
    scale=scales,
    data_seed=st.integers(0, 2**16),
    perm_seed=st.integers(0, 2**16),
)
def test_anchored_permuting_training_rows_permutes_scores(
    arch: Arch, n_train: int, n_query: int, scale: float, data_seed: int, perm_seed: int
) -> None:
    """Anchored mode sums its Hessian-vector products in row order: equal up to float64
    noise. Automatic basis size (not fixed): the stopping rule must not depend on the row order
    either (the curvature rows are taken in content order).
    """
    model = build_model(arch).eval()
    x, y = make_data(arch, n_train, scale, data_seed)
    queries = make_data(arch, n_query, scale, data_seed + 1)
    perm = torch.randperm(n_train, generator=torch.Generator().manual_seed(perm_seed))
    fi = ForwardInf(model, config("anchored"), device="cpu")
    fp = ForwardInf(model, config("anchored"), device="cpu")
    ref = anchored(lambda: fi.pairwise((x, y), queries), model, x, y)
    assume(ref is not None)
    assert ref is not None
    got = fp.pairwise((x[perm], y[perm]), queries)
    assert fi.last_report is not None and fp.last_report is not None
    assert fi.last_report.steps == fp.last_report.steps
    floor = noise_floor(fi, model, x, y)
    assert_close_up_to(got, ref[perm], floor, "anchored pairwise", rtol=1e-6)


# ================================================================== self-consistency


def train_model(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 60) -> None:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        opt = torch.optim.Adam(model.parameters(), lr=0.05)
        model.train()
        for _ in range(steps):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    model.eval()


def grad_norms(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example gradient norms in float64 and eval mode (an independent computation)."""
    ref = deepcopy(model).double().eval()
    params = {k: v.detach() for k, v in ref.named_parameters()}

    def loss(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return cross_entropy(functional_call(ref, p, (xi[None],)), yi[None])[0]

    grads = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x.double(), y)
    return torch.as_tensor(torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in grads.values())))


@settings(max_examples=25, **SETTINGS)
@given(
    arch=archs(),
    n_train=st.integers(2, 16),
    scale=scales,
    data_seed=st.integers(0, 2**16),
)
def test_plain_diagonal_is_self_influence_and_positive(
    arch: Arch, n_train: int, scale: float, data_seed: int
) -> None:
    """diag(pairwise(X, X)) == self_influence(X) (the same update of the same point), and
    > 0 on a trained model wherever the point has a gradient: the automatic step has length
    1e-4 ||theta||, so the drop is ||g||^2 up to a second-order term that is far smaller here.
    A point without gradient (dead ReLUs, a loss that underflowed) scores exactly 0."""
    model = build_model(arch)
    x, y = make_data(arch, n_train, scale, data_seed)
    train_model(model, x, y)
    gnorm = grad_norms(model, x, y)
    # gradients of float32-subnormal size: see test_confident_model_gives_finite_scores
    assume(not bool(((gnorm > 0) & (gnorm < 1e-30)).any()))
    fi = ForwardInf(model, device="cpu")
    diag = fi.pairwise((x, y), (x, y)).diagonal()
    floor = noise_floor(fi, model, x, y)
    self_inf = fi.self_influence((x, y))
    floor = max(floor, noise_floor(fi, model, x, y))
    assert_close_up_to(self_inf, diag, floor, "self_influence vs diagonal", rtol=1e-4)
    live = gnorm > 1e-18  # the score ~ ||g||^2 is a normal float32 number
    assert bool((diag[live] > 0).all()), (diag, gnorm)
    assert bool((diag >= 0).all()), (diag, gnorm)
    assert bool((diag[gnorm == 0] == 0).all()), (diag, gnorm)


@settings(max_examples=6, **SETTINGS)
@given(
    arch=archs(kinds=("linear", "layernorm")),
    n_train=st.integers(2, 8),
    scale=scales,
    data_seed=st.integers(0, 2**16),
)
def test_anchored_diagonal_is_positive(
    arch: Arch, n_train: int, scale: float, data_seed: int
) -> None:
    """Anchored: the mirror move for z_i lowers loss(z_i) wherever it has a gradient
    (g^T (|H| + delta)^-1 g > 0: the filter is positive on every eigenvalue)."""
    model = build_model(arch)
    x, y = make_data(arch, n_train, scale, data_seed)
    train_model(model, x, y)
    fi = ForwardInf(model, config("anchored"), device="cpu")
    pair = anchored(lambda: fi.pairwise((x, y), (x, y)), model, x, y)
    assume(pair is not None)
    assert pair is not None
    diag = pair.diagonal()
    live = grad_norms(model, x, y) > 1e-18  # the score ~ ||g||^2 is a normal float32 number
    assert bool((diag[live] > 0).all()), diag


# ================================================================== engine reuse


def _pairwise_on_new_set(
    fi: ForwardInf, arch: Arch, seed: int, queries: DataPair
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Score a new training set; its tensors are freed on return, so the next set may get
    their ids (CPython reuses a freed object's memory for the next object of its size)."""
    x, y = make_data(arch, 8, 1.0, seed)
    return fi.pairwise((x, y), queries), (id(x), id(y))


@pytest.mark.parametrize("mode", ["plain", "anchored"])
def test_reused_engine_scores_each_new_training_set_afresh(mode: str) -> None:
    """One engine scoring a sequence of training sets (a loop over folds or shards) must give
    what a fresh engine gives on each. Deterministic rather than a hypothesis property. Under
    the old id()-keyed cache a freed set's tensor ids were handed to the next set and it was
    scored with stale cached losses; the cache now holds the data it is keyed by, so this
    checks the outcome (each set scored afresh) whatever the allocator does."""
    arch = Arch("linear", (6,), "tanh", True, 4, 3, 0)
    model = build_model(arch).eval()
    queries = make_data(arch, 2, 1.0, 99)
    cfg = config(mode, steps=20 if mode == "anchored" else None)
    n_sets = 8
    wants = [
        ForwardInf(model, cfg, device="cpu").pairwise(make_data(arch, 8, 1.0, k), queries)
        for k in range(n_sets)
    ]
    fi = ForwardInf(model, cfg, device="cpu")
    prev: tuple[int, int] | None = None
    for k in range(n_sets):
        got, ids = _pairwise_on_new_set(fi, arch, k, queries)
        assert torch.allclose(got, wants[k], rtol=1e-5, atol=1e-6), (
            f"set {k} scored stale (same tensor ids as set {k - 1}: {ids == prev})"
        )
        prev = ids


def test_engine_sees_weights_edited_through_data() -> None:
    """Weights changed through ``.data`` keep their id and _version; the engine must still
    score the new weights, not its cached base losses of the old ones."""
    arch = Arch("linear", (6,), "tanh", True, 4, 3, 0)
    model = build_model(arch).eval()
    train, queries = make_data(arch, 10, 1.0, 0), make_data(arch, 2, 1.0, 1)
    fi = ForwardInf(model, device="cpu")
    fi.pairwise(train, queries)
    with torch.no_grad():
        for p in model.parameters():
            p.data.mul_(1.5)
    got = fi.pairwise(train, queries)
    want = ForwardInf(model, device="cpu").pairwise(train, queries)
    torch.testing.assert_close(got, want)


def _confident_model() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    model = nn.Linear(2, 2)
    with torch.no_grad():  # logits (47.5, -47.5) on x = (1, 0); column 2 only inflates ||theta||
        model.weight.copy_(torch.tensor([[47.5, 1000.0], [-47.5, 1000.0]]))
        model.bias.zero_()
    return model, torch.tensor([[1.0, 0.0], [0.0, 0.0]]), torch.tensor([0, 0])


def test_confident_model_fast_path_self_influence_is_finite() -> None:
    """The low-rank self-influence path takes the same step without overflowing."""
    model, x, y = _confident_model()
    fi = ForwardInf(model, device="cpu")
    out = fi.self_influence((x, y))
    assert fi.last_report is not None and fi.last_report.path == "lowrank"
    assert torch.isfinite(out).all() and bool((out >= 0).all())


@pytest.mark.parametrize(
    ("verb", "fast_path"),
    [
        ("pairwise", "auto"),  # the fast path's check against the generic path sees NaN
        ("pairwise", "off"),
        ("self_influence", "off"),
        ("group", "auto"),
        ("group", "off"),
    ],
)
def test_confident_model_gives_finite_scores(verb: str, fast_path: str) -> None:
    """A training point fit with margin 95 (loss ~e^-95) has a gradient of norm ~1e-41, a
    float32 subnormal: its score should be finite (0 at worst, or redone in float64)."""
    model, x, y = _confident_model()
    steps = 1 if verb == "group" else None  # group's default Adam fit is sign-like: no overflow
    fi = ForwardInf(model, config("plain", fast_path=fast_path, steps=steps), device="cpu")
    args = () if verb == "self_influence" else ((x[:1], y[:1]),)
    out = getattr(fi, verb)((x, y), *args)
    assert torch.isfinite(out).all()


def test_tolerance_has_teeth() -> None:
    """The permutation tolerance is far below the scores: un-permuted rows fail the check."""
    arch = Arch("linear", (6,), "tanh", True, 4, 3, 0)
    model = build_model(arch).eval()
    x, y = make_data(arch, 12, 1.0, 0)
    fi = ForwardInf(model, device="cpu")
    scores = fi.pairwise((x, y), (x[:3], y[:3]))
    floor = noise_floor(fi, model, x, y)
    assert 8 * floor < 0.05 * float(scores.abs().max())
    perm = torch.roll(torch.arange(12), 1)
    assert_close_up_to(scores, scores, floor, "identity")
    with pytest.raises(AssertionError):
        assert_close_up_to(scores, scores[perm], floor, "rolled rows")


@pytest.mark.parametrize("verb", ["pairwise", "group"])
def test_anchored_single_training_row(verb: str) -> None:
    """Plain mode scores one training row; anchored mode should too (a basis of one row)."""
    arch = Arch("linear", (), "identity", True, 2, 2, 0)
    model = build_model(arch).eval()
    train, queries = make_data(arch, 1, 1.0, 0), make_data(arch, 1, 1.0, 1)
    assert ForwardInf(model, device="cpu").pairwise(train, queries).shape == (1, 1)
    out = getattr(ForwardInf(model, config("anchored"), device="cpu"), verb)(train, queries)
    assert torch.isfinite(out).all() and out.shape[0] == 1
