"""The generic path batched over rows and the rank-1 path on exported graphs (issue 14).

Vectorised self-influence equals the per-row loop (the engine's own fallback, forced by a real
op vmap cannot batch) and a by-hand SGD step; MLPs, CNNs with BatchNorm and transformer
encoders run batched (no loop, no vmap fallback); a model loaded from MLflow's pt2 format takes
the exact rank-1 path with the nn.Sequential model's scores, and the caller's model is unchanged.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from mlflow_helpers import fluent_tracking_uri
from torch import nn
from torch.func import functional_call

from mirrorinf import ForwardInf, ForwardInfConfig
from mirrorinf.tasks.model import ExportedModel, load_model_uri

F64 = ForwardInfConfig(precision="float64", fast_path="off")


class _Unbatchable(nn.Module):
    """``inner`` plus a data-dependent Python branch (.item()): vmap cannot batch it, so the
    engine must loop over rows; the outputs are the inner model's."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.inner(x)
        if out.detach().abs().sum().item() < 0:  # never true; only vmap cannot follow it
            out = -out
        return out


class _Encoder(nn.Module):
    def __init__(self, d_in: int = 4, d: int = 8, n_cls: int = 3) -> None:
        super().__init__()
        self.emb = nn.Linear(d_in, d)
        self.enc = nn.TransformerEncoderLayer(d, 2, 16, dropout=0.1, batch_first=True)
        self.head = nn.Linear(d, n_cls)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(self.emb(x)).mean(dim=1))


def _mlp() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3)).eval()
    return model, torch.randn(40, 6), torch.randint(0, 3, (40,))


def _cnn() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3)
    )
    model.train()
    model(torch.randn(32, 1, 6, 6))  # running statistics that are not 0/1
    return model.eval(), torch.randn(30, 1, 6, 6), torch.randint(0, 3, (30,))


def _transformer() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(2)
    return _Encoder().eval(), torch.randn(25, 5, 4), torch.randint(0, 3, (25,))


class _Recurrent(nn.Module):
    """Embedding -> GRU / LSTM / RNN (two layers for the GRU) -> last step -> linear head."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.emb = nn.Linear(4, 6)
        layer = {"gru": nn.GRU, "lstm": nn.LSTM, "rnn": nn.RNN}[kind]
        self.rnn = layer(6, 8, num_layers=2 if kind == "gru" else 1, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.rnn(torch.tanh(self.emb(x)))
        return self.head(h[:, -1])


def _recurrent(kind: str) -> Callable[[], tuple[nn.Module, torch.Tensor, torch.Tensor]]:
    def make() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
        torch.manual_seed(3)
        return _Recurrent(kind).eval(), torch.randn(20, 5, 4), torch.randint(0, 3, (20,))

    return make


MODELS = {"mlp": _mlp, "cnn_batchnorm": _cnn, "transformer": _transformer,
          **{k: _recurrent(k) for k in ("gru", "lstm", "rnn")}}  # fmt: skip


def _by_hand_self(model: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float) -> torch.Tensor:
    """loss_i(theta) - loss_i(theta - lr * grad loss_i), one row at a time, float64, by hand."""
    params = {k: v.detach().double() for k, v in model.named_parameters()}
    buffers = {k: v.double() for k, v in model.named_buffers()}
    out = []
    for i in range(len(x)):
        p = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        xi, yi = x[i : i + 1], y[i : i + 1]
        xi = xi.double() if xi.is_floating_point() else xi
        loss = nn.functional.cross_entropy(functional_call(model, {**buffers, **p}, (xi,)), yi)
        gs = torch.autograd.grad(loss, list(p.values()))
        stepped = {k: v.detach() - lr * g for (k, v), g in zip(p.items(), gs, strict=True)}
        with torch.no_grad():
            after = nn.functional.cross_entropy(
                functional_call(model, {**buffers, **stepped}, (xi,)), yi
            )
        out.append(float(loss.detach() - after))
    return torch.tensor(out, dtype=torch.float64)


def _loop_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "looping over examples" in r.getMessage()]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_vectorised_self_influence_equals_the_row_loop(
    name: str, caplog: pytest.LogCaptureFixture
) -> None:
    model, x, y = MODELS[name]()
    calls = []
    model.register_forward_pre_hook(lambda *_: calls.append(1))
    for cfg in (F64, F64.replace(lr=1e-2)):
        caplog.clear()
        calls.clear()
        with (
            caplog.at_level(logging.WARNING, logger="mirrorinf.engine"),
            warnings.catch_warnings(record=True) as caught,
        ):
            warnings.simplefilter("always")
            fast = ForwardInf(model, cfg).self_influence((x, y)).double()
        # batched: a few model calls for all rows (not one a row), no engine loop and no vmap
        # fallback (torch's "performance drop" warning)
        assert len(calls) < 6, len(calls)
        assert not _loop_warnings(caplog)
        assert not [w for w in caught if "batching rule" in str(w.message)]
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="mirrorinf.engine"):
            loop = ForwardInf(_Unbatchable(model), cfg).self_influence((x, y)).double()
        assert len(_loop_warnings(caplog)) == 1  # the loop ran, and said so once
        torch.testing.assert_close(fast, loop, rtol=1e-6, atol=1e-12)  # float32 results
    got = ForwardInf(model, F64.replace(lr=1e-2)).self_influence((x, y)).double()
    torch.testing.assert_close(got, _by_hand_self(model, x, y, 1e-2).float().double())


@pytest.mark.parametrize("name", sorted(MODELS))
def test_vectorised_self_influence_float64_equals_the_loop_exactly(name: str) -> None:
    """The float64 scores of the batched and looped paths before the float32 return cast."""
    from mirrorinf.engine.generic import generic_self
    from mirrorinf.engine.runtime import Runtime

    model, x, y = MODELS[name]()
    results = []
    for m in (model, _Unbatchable(model)):
        rt = Runtime(m, F64, None, "cpu", torch.float64)
        with rt.scoring() as state:
            drop, lr = generic_self(rt, state, x, y)
        results.append(drop / lr)
        assert state.vmap_ok is (m is model)
    torch.testing.assert_close(results[0], results[1], rtol=1e-10, atol=1e-14)


def test_unbatchable_model_still_scores_pairwise_and_self(
    caplog: pytest.LogCaptureFixture,
) -> None:
    model, x, y = _mlp()
    wrapped = _Unbatchable(model)
    with caplog.at_level(logging.WARNING, logger="mirrorinf.engine"):
        fi = ForwardInf(wrapped, F64)
        pw = fi.pairwise((x, y), (x[:3], y[:3]))
        si = fi.self_influence((x, y))
    assert len(_loop_warnings(caplog)) == 1  # once per model, not per call
    ref = ForwardInf(model, F64)
    torch.testing.assert_close(pw, ref.pairwise((x, y), (x[:3], y[:3])))
    torch.testing.assert_close(si, ref.self_influence((x, y)))


# ---------------------------------------------------------------- models loaded from pt2


def _fingerprint(model: nn.Module) -> tuple[object, ...]:
    """Everything a call could change: tensors (bitwise, with identity), modules, graph code."""
    tensors = [(k, id(v), v.detach().clone()) for k, v in model.state_dict(keep_vars=True).items()]
    mods = [(k, type(m), m.training, tuple(m._modules)) for k, m in model.named_modules()]
    code = [m.code for m in model.modules() if isinstance(m, torch.fx.GraphModule)]
    return tensors, mods, code


def _assert_unchanged(model: nn.Module, before: tuple[object, ...]) -> None:
    after = _fingerprint(model)
    assert [t[:2] for t in after[0]] == [t[:2] for t in before[0]]  # type: ignore[index]
    for (_, _, a), (k, _, b) in zip(after[0], before[0], strict=True):  # type: ignore[call-overload]
        assert torch.equal(a, b), f"{k} changed"
    assert after[1:] == before[1:]


@pytest.fixture(scope="module")
def pt2_models(
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, tuple[nn.Module, nn.Module, torch.Tensor, torch.Tensor]]:
    """Each model, and the same model logged with mlflow.pytorch (pt2) to a SQLite store and
    loaded back as the flow loads it (mirrorinf.tasks.model.load_model_uri)."""
    import mlflow
    import mlflow.pytorch

    root = tmp_path_factory.mktemp("pt2")
    uri = f"sqlite:///{root}/mlflow.db"
    out = {}
    with fluent_tracking_uri(uri):
        exp = mlflow.create_experiment("pt2", artifact_location=str(root / "artifacts"))
        for name, make in MODELS.items():
            model, x, y = make()
            with mlflow.start_run(experiment_id=exp):
                mlflow.pytorch.log_model(
                    model, name="m", registered_model_name=name, input_example=x[:2].numpy(),
                    pip_requirements=["torch"],
                )  # fmt: skip
            loaded, _ = load_model_uri(f"models:/{name}/1", tracking_uri=uri)
            out[name] = (model, loaded, x, y)
    return out


def test_pt2_mlp_takes_the_rank1_path_with_the_sequential_scores(pt2_models) -> None:  # type: ignore[no-untyped-def]
    model, loaded, x, y = pt2_models["mlp"]
    assert isinstance(loaded, nn.Module) and not isinstance(loaded, nn.Sequential)
    before = _fingerprint(loaded)
    for cfg in (ForwardInfConfig(precision="float64"), ForwardInfConfig()):
        want = ForwardInf(model, cfg)
        got = ForwardInf(loaded, cfg)
        si = got.self_influence((x, y))
        assert got.last_report is not None and got.last_report.path == "lowrank"
        torch.testing.assert_close(si, want.self_influence((x, y)), rtol=1e-6, atol=0)
        pw = got.pairwise((x, y), (x[:4], y[:4]))
        assert got.last_report.path == "lowrank"
        torch.testing.assert_close(pw, want.pairwise((x, y), (x[:4], y[:4])), rtol=1e-6, atol=0)
        _assert_unchanged(loaded, before)
    # and against the generic path on the loaded graph itself, in float64
    generic = ForwardInf(loaded, F64).self_influence((x, y))
    fast = ForwardInf(loaded, F64.replace(fast_path="auto")).self_influence((x, y))
    torch.testing.assert_close(fast, generic, rtol=1e-6, atol=1e-12)
    _assert_unchanged(loaded, before)


@pytest.mark.parametrize("name", ["cnn_batchnorm", "transformer", "gru", "lstm", "rnn"])
def test_pt2_cnn_transformer_and_rnns_run_batched_with_the_modules_scores(
    pt2_models, name: str, caplog: pytest.LogCaptureFixture
) -> None:  # type: ignore[no-untyped-def]
    model, loaded, x, y = pt2_models[name]
    before = _fingerprint(loaded)
    calls = []
    loaded.register_forward_pre_hook(lambda *_: calls.append(1))
    with (
        caplog.at_level(logging.WARNING, logger="mirrorinf.engine"),
        warnings.catch_warnings(record=True) as caught,
    ):
        warnings.simplefilter("always")
        got = ForwardInf(loaded, F64).self_influence((x, y))
    assert len(calls) < 6 and not _loop_warnings(caplog)
    assert not [w for w in caught if "batching rule" in str(w.message)]
    torch.testing.assert_close(got, ForwardInf(model, F64).self_influence((x, y)))
    _assert_unchanged(loaded, before)


def test_decomposed_graph_addmm_takes_the_rank1_path() -> None:
    """Core-ATen graphs (linear decomposed into permute + addmm) are recognised too."""
    model, x, y = _mlp()
    dyn = ({0: torch.export.Dim.AUTO},)
    program = torch.export.export(model, (x[:2],), dynamic_shapes=dyn).run_decompositions()
    graph = ExportedModel(program.module())  # as the loader wraps it (the graph refuses eval())
    targets = {n.target for n in graph.graph.graph.nodes if n.op == "call_function"}
    assert torch.ops.aten.addmm.default in targets and torch.ops.aten.linear.default not in targets
    before = _fingerprint(graph)
    fi = ForwardInf(graph)
    got = fi.self_influence((x, y))
    assert fi.last_report is not None and fi.last_report.path == "lowrank"
    torch.testing.assert_close(got, ForwardInf(model).self_influence((x, y)), rtol=1e-6, atol=0)
    _assert_unchanged(graph, before)


# ---------------------------------------------------------------- the factored self-influence path


class _StridedCnn(nn.Module):
    """Convs with stride, padding, dilation, a non-square kernel and no bias, one conv called
    twice (its gradient sums both calls), BatchNorm and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(2, 3, 3, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(3)
        self.c2 = nn.Conv2d(3, 3, (2, 3), padding=(1, 2), dilation=2)  # keeps 5x4
        self.head = nn.Linear(3 * 5 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.c1(x)))
        h = torch.tanh(self.c2(torch.relu(self.c2(h))))
        return self.head(h.flatten(1))


def _strided_cnn() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(3)
    model = _StridedCnn()
    model.train()
    model(torch.randn(16, 2, 9, 8))
    return model.eval(), torch.randn(20, 2, 9, 8), torch.randint(0, 3, (20,))


def _factored_vs_generic(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: ForwardInfConfig, **task: str
):
    """(factored, generic) raw float64 drops per unit lr of the same rows, and the path;
    ``task``: the engine's ``kind`` / ``output``."""
    from mirrorinf.engine.factored import FactoredPath
    from mirrorinf.engine.generic import generic_self
    from mirrorinf.engine.runtime import Runtime

    rt = Runtime(model, cfg, None, "cpu", torch.float64, **task)
    path = FactoredPath.for_model(rt)
    assert path is not None
    with rt.scoring() as state:
        got, lr = path.self_chunk(state, x, y)
        want, want_lr = generic_self(rt, state, x, y)
    torch.testing.assert_close(lr, want_lr, rtol=1e-12, atol=0)
    return got / lr, want / want_lr, path


@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("name", ["cnn_batchnorm", "transformer"])
def test_factored_self_influence_equals_generic_on_pt2_models(
    pt2_models, name: str, steps: int
) -> None:  # type: ignore[no-untyped-def]
    """Linear (incl. MultiheadAttention's in_proj_weight) and conv layers as factors, BatchNorm
    and LayerNorm under vmap: the generic path's float64 scores, on the graph loaded from pt2."""
    model, loaded, x, y = pt2_models[name]
    cfg = F64.replace(fast_path="auto", steps=steps, lr=1e-2 if steps > 1 else None)
    before = _fingerprint(loaded)
    for m in (loaded, model):
        got, want, path = _factored_vs_generic(m, x, y, cfg)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    # on the loaded graph every linear/conv weight is a factor: only norm parameters stay dense
    _, _, path = _factored_vs_generic(loaded, x, y, cfg)
    dense = {k for k in path.rt.trainable if k not in path._factored()}
    assert dense and all(".1." in k or "norm" in k for k in dense), dense
    if name == "transformer":
        assert any(k.endswith("self_attn.in_proj_weight") for k in path._factored())
    # and the engine takes the path (it agrees with its own check), with the generic scores
    fi = ForwardInf(loaded, cfg)
    got_fi = fi.self_influence((x, y))
    assert fi.last_report is not None and fi.last_report.path == "factored"
    ref = ForwardInf(loaded, cfg.replace(fast_path="off")).self_influence((x, y))
    torch.testing.assert_close(got_fi, ref, rtol=1e-6, atol=1e-12)
    _assert_unchanged(loaded, before)


def _factored_equals_generic_at_1_and_2_steps(model, x, y, **task) -> list:  # type: ignore[no-untyped-def]
    """Factored self-influence equals the generic path's in float64 (one step with the automatic
    lr, two with a fixed one); the factored paths, for checks of which sites they cover."""
    paths = []
    for steps in (1, 2):
        cfg = F64.replace(fast_path="auto", steps=steps, lr=1e-2 if steps > 1 else None)
        got, want, path = _factored_vs_generic(model, x, y, cfg, **task)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
        paths.append(path)
    return paths


def test_factored_self_influence_convs_with_stride_padding_dilation_and_reuse() -> None:
    model, x, y = _strided_cnn()
    program = torch.export.export(model, (x[:2],), dynamic_shapes=({0: torch.export.Dim.AUTO},))
    graph = ExportedModel(program.module())
    for m in (model, graph):
        # the exported graph reads c2's weight twice: it stays an aten call (dense, vmap)
        want_sites = {"c1", "c2", "head"} if m is model else {"c1", "head"}
        for path in _factored_equals_generic_at_1_and_2_steps(m, x, y):
            assert {n.rpartition(".")[2] for n in path.active} == want_sites
    fi = ForwardInf(graph)  # float32, automatic step: the engine's default
    got = fi.self_influence((x, y))
    assert fi.last_report is not None and fi.last_report.path == "factored"
    torch.testing.assert_close(
        got, ForwardInf(model, ForwardInfConfig(fast_path="off")).self_influence((x, y)),
        rtol=1e-4, atol=1e-7,
    )  # fmt: skip


def test_factored_self_influence_follows_a_new_sequence_length() -> None:
    """The probes' shapes are found again when the rows' shape changes between calls."""
    model, _, _ = _transformer()
    fi = ForwardInf(model, F64.replace(fast_path="auto"))
    ref = ForwardInf(model, F64)
    for tokens in (5, 7, 5):
        x, y = torch.randn(12, tokens, 4), torch.randint(0, 3, (12,))
        got = fi.self_influence((x, y))
        assert fi.last_report is not None and fi.last_report.path == "factored"
        torch.testing.assert_close(got, ref.self_influence((x, y)), rtol=1e-6, atol=1e-12)


def test_pt2_inference_batch_norm_runs_as_scale_and_shift(pt2_models) -> None:  # type: ignore[no-untyped-def]
    """The engine's view of a pt2 graph computes eval-mode BatchNorm as a per-channel affine map
    (vmap batches its parameter gradients cheaply): the same outputs to rounding."""
    from mirrorinf.engine.graph_view import engine_view

    model, loaded, x, _ = pt2_models["cnn_batchnorm"]
    view = engine_view(loaded)
    targets = {
        n.target
        for m in view.modules()
        if isinstance(m, torch.fx.GraphModule)
        for n in m.graph.nodes
    }
    assert torch.ops.aten.batch_norm.default not in targets
    with torch.no_grad():
        torch.testing.assert_close(view(x), model(x), rtol=1e-5, atol=1e-6)


class _GroupedConvs(nn.Module):
    """Depthwise and grouped Conv2d (strided, dilated, non-square, no bias) and a Conv1d text
    branch (token embedding, a Conv1d and a depthwise Conv1d), BatchNorm and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.dw = nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=4)  # depthwise, 9x8 -> 5x4
        self.gc = nn.Conv2d(4, 6, (1, 3), padding=(0, 2), dilation=(1, 2), groups=2, bias=False)
        self.emb = nn.Embedding(11, 4)
        self.t1 = nn.Conv1d(4, 6, 3, padding=1)
        self.t2 = nn.Conv1d(6, 6, 3, padding=2, dilation=2, groups=6, stride=2)  # depthwise
        self.t3 = nn.Conv1d(6, 4, 1, groups=2, bias=False)
        self.head = nn.Linear(6 * 5 * 4 + 4, 3)

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.c1(x)))
        h = torch.tanh(self.gc(torch.relu(self.dw(h))))
        t = torch.relu(self.t1(self.emb(tokens).transpose(1, 2)))
        t = self.t3(torch.tanh(self.t2(t))).amax(dim=2)
        return self.head(torch.cat([h.flatten(1), t], dim=1))


def test_factored_self_influence_grouped_depthwise_and_conv1d() -> None:
    """Depthwise / grouped Conv2d and Conv1d weights as unfold factors, not vmap's per-example
    convolution backward: the generic path's float64 scores, as nn.Module and exported graph."""
    torch.manual_seed(4)
    model = _GroupedConvs()
    model.train()
    model(torch.randn(16, 2, 9, 8), torch.randint(0, 11, (16, 7)))
    model.eval()
    x = {"x": torch.randn(20, 2, 9, 8), "tokens": torch.randint(0, 11, (20, 7))}
    y = torch.randint(0, 3, (20,))
    convs = {"c1", "dw", "gc", "t1", "t2", "t3"}
    program = torch.export.export(
        model, (), {k: v[:2] for k, v in x.items()},
        dynamic_shapes={k: {0: torch.export.Dim.AUTO} for k in x},
    )  # fmt: skip
    graph = ExportedModel(program.module())
    for m in (model, graph):
        for path in _factored_equals_generic_at_1_and_2_steps(m, x, y):
            assert convs <= {n.rpartition(".")[2] for n in path.active}
    fi = ForwardInf(graph, ForwardInfConfig(precision="float64"))
    got = fi.self_influence((x, y))
    assert fi.last_report is not None and fi.last_report.path == "factored"
    ref = ForwardInf(model, ForwardInfConfig(precision="float64", fast_path="off"))
    torch.testing.assert_close(got, ref.self_influence((x, y)), rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("name", ["cnn_batchnorm", "transformer"])
def test_factored_self_influence_module_attention_and_batch_norm(name: str) -> None:
    """In a plain nn.Module, nn.MultiheadAttention's in_proj_weight and out_proj are factors
    and eval BatchNorm a scale and shift: the float64 scores of the generic path and of SGD by
    hand on the caller's (unviewed) model."""
    model, x, y = MODELS[name]()
    before = _fingerprint(model)
    for steps in (1, 2):
        cfg = F64.replace(fast_path="auto", steps=steps, lr=1e-2)
        got, want, path = _factored_vs_generic(model, x, y, cfg)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
        dense = {k for k in path.rt.trainable if k not in path._factored()}
        assert dense and all("norm" in k or k.startswith("1.") for k in dense), dense
    by_hand = _by_hand_self(model, x, y, 1e-2) / 1e-2
    cfg = F64.replace(fast_path="auto", lr=1e-2)
    got, _, path = _factored_vs_generic(model, x, y, cfg)
    torch.testing.assert_close(got, by_hand, rtol=1e-7, atol=1e-12)
    if name == "transformer":
        assert {"enc.self_attn.in_proj_weight", "enc.self_attn.out_proj.weight"} <= path._factored()
    fi = ForwardInf(model, cfg)
    fi.self_influence((x, y))
    assert fi.last_report is not None and fi.last_report.path == "factored"
    _assert_unchanged(model, before)


@pytest.mark.parametrize("batch_first", [True, False])
def test_module_view_attention_and_batch_norm_equal_the_layers(batch_first: bool) -> None:
    """The engine's views of nn.MultiheadAttention (masks, weights, both layouts) and of eval
    BatchNorm (1d/2d, with and without affine) give the layers' own outputs."""
    from mirrorinf.engine.module_view import module_view

    torch.manual_seed(5)
    mha = nn.MultiheadAttention(8, 2, batch_first=batch_first).double().eval()
    view = module_view(mha)
    assert view is not None
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    x = x if batch_first else x.transpose(0, 1)
    causal = torch.triu(torch.ones(5, 5, dtype=torch.bool), 1)
    pad = torch.zeros(3, 5, dtype=torch.bool)
    pad[1, 3:] = True
    calls = [
        {},
        {"need_weights": False},
        {"attn_mask": causal, "average_attn_weights": False},
        {"attn_mask": causal.double() * -3.0},
        {"attn_mask": causal, "key_padding_mask": pad},
        {"attn_mask": causal, "is_causal": True, "need_weights": False},
    ]
    taps = []
    view.in_tap.register_forward_hook(lambda *_: taps.append(1))
    with torch.no_grad():
        for kw in calls:
            want, got = mha(x, x, x, **kw), view(x, x, x, **kw)
            torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-12)
            assert (got[1] is None) is (want[1] is None)
            if want[1] is not None:
                torch.testing.assert_close(got[1], want[1], rtol=1e-10, atol=1e-12)
        assert len(taps) == len(calls)  # every call took the view's own attention
        y = torch.randn(3, 5, 8, dtype=torch.float64)  # cross attention: the layer's forward
        y = y if batch_first else y.transpose(0, 1)
        torch.testing.assert_close(view(x, y, y)[0], mha(x, y, y)[0])
    for bn, shape in (
        (nn.BatchNorm2d(4), (3, 4, 5, 5)), (nn.BatchNorm1d(4, affine=False), (3, 4)),
        (nn.BatchNorm1d(4), (3, 4, 6)),
    ):  # fmt: skip
        bn = bn.double().train()
        bn(torch.randn(*shape, dtype=torch.float64) * 3 + 1)
        if bn.affine:
            nn.init.normal_(bn.weight)
            nn.init.normal_(bn.bias)
        v = module_view(bn.eval())
        assert v is not None and isinstance(v, type(bn)) and v.weight is bn.weight
        z = torch.randn(*shape, dtype=torch.float64)
        with torch.enable_grad():  # the view's own scale and shift (no grad: the fused kernel)
            torch.testing.assert_close(v(z), bn(z), rtol=1e-10, atol=1e-12)


class _TokenModel(nn.Module):
    """Token and position embeddings (one with a padding row, one read twice), a Conv1d and a
    linear head: a small text classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(9, 4, padding_idx=0)
        self.pos = nn.Embedding(6, 4)
        self.conv = nn.Conv1d(4, 5, 3, padding=1)
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(x.shape[1], device=x.device)
        h = self.tok(x) + self.pos(pos) + 0.5 * self.pos(pos.flip(0))
        return self.head(torch.tanh(self.conv(h.transpose(1, 2))).mean(dim=2))


def test_factored_self_influence_embeddings() -> None:
    """Embedding weights as (token ids, output gradients) factors, repeated tokens and the
    padding row included: the float64 scores of the generic path and of SGD by hand."""
    torch.manual_seed(6)
    model = _TokenModel().eval()
    x, y = torch.randint(0, 4, (20, 6)), torch.randint(0, 3, (20,))  # many repeats, some pads
    x[0] = 0
    for steps, lr in ((1, None), (2, 1e-2)):  # automatic lr: the norms of the factors count
        cfg = F64.replace(fast_path="auto", steps=steps, lr=lr)
        got, want, path = _factored_vs_generic(model, x, y, cfg)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
        assert path._factored() == set(path.rt.trainable)  # nothing left per example
    got, _, _ = _factored_vs_generic(model, x, y, F64.replace(fast_path="auto", lr=1e-2))
    torch.testing.assert_close(got, _by_hand_self(model, x, y, 1e-2) / 1e-2, rtol=1e-7, atol=1e-12)
    program = torch.export.export(model, (x[:2],), dynamic_shapes=({0: torch.export.Dim.AUTO},))
    graph = ExportedModel(program.module())  # the exported graph's aten.embedding calls too
    got, want, path = _factored_vs_generic(graph, x, y, F64.replace(fast_path="auto"))
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    assert {n.rpartition(".")[2] for n in path.active} >= {"tok", "conv", "head"}
    fi = ForwardInf(graph, F64.replace(fast_path="auto"))
    fi.self_influence((x, y))
    assert fi.last_report is not None and fi.last_report.path == "factored"


class _WideConvs(nn.Module):
    """Convs whose weights outweigh their few output positions (text-like): a Conv1d called
    twice and a strided, dilated Conv2d, both run as factors of their unfolded patches."""

    def __init__(self) -> None:
        super().__init__()
        self.t = nn.Conv1d(12, 12, 5, padding=2)
        self.c = nn.Conv2d(3, 10, 3, stride=2, padding=1, dilation=2, bias=False)
        self.head = nn.Linear(12 + 10, 3)  # the Conv2d keeps 1x1 of 4x4

    def forward(self, x: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        t = torch.tanh(self.t(torch.tanh(self.t(x)))).mean(dim=2)
        return self.head(torch.cat([t, torch.tanh(self.c(img)).flatten(1)], dim=1))


def test_factored_self_influence_convs_as_patch_factors() -> None:
    """A conv with few output positions and a big ungrouped weight keeps no per-example weight
    copy: its update is (patches, output gradients) factors: the generic path's scores."""
    torch.manual_seed(7)
    model = _WideConvs().eval()
    x = {"x": torch.randn(20, 12, 3), "img": torch.randn(20, 3, 4, 4)}
    y = torch.randint(0, 3, (20,))
    for steps, lr in ((1, None), (2, 1e-2)):
        cfg = F64.replace(fast_path="auto", steps=steps, lr=lr)
        got, want, path = _factored_vs_generic(model, x, y, cfg)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
        assert path.moved == set() and {"t", "c"} <= path.active
    fi = ForwardInf(model, F64.replace(fast_path="auto"))
    fi.self_influence((x, y))
    assert fi.last_report is not None and fi.last_report.path == "factored"


class _TiedLm(nn.Module):
    """A tiny causal LM whose head shares the token embedding (GPT-2's ``lm_head.weight is
    wte.weight``), with a padding row, a position embedding, a hidden linear with bias and a
    linear head read twice: next-token logits of the last position plus a pooled term."""

    def __init__(self, vocab: int = 13, d: int = 6) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d, padding_idx=0)
        self.pos = nn.Embedding(8, d)
        self.mid = nn.Linear(d, d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.tok.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tok(x) + self.pos(torch.arange(x.shape[1], device=x.device))
        h = torch.tanh(self.mid(h))
        return self.head(h[:, -1]) + 0.3 * self.head(h.mean(dim=1))


def test_factored_self_influence_tied_embedding_and_head() -> None:
    """A weight shared by an embedding and a linear head takes the factored path: its gradient
    is the sum of both uses' factors (norm with their cross terms, each use reading the other's
    step): the generic path's float64 scores, as nn.Module and as an exported graph whose one
    parameter feeds both aten.embedding and aten.linear; nothing left per example."""
    torch.manual_seed(8)
    model = _TiedLm().eval()
    x, y = torch.randint(0, 6, (20, 5)), torch.randint(0, 13, (20,))  # repeats and pads
    x[0, :2] = 0
    program = torch.export.export(model, (x[:2],), dynamic_shapes=({0: torch.export.Dim.AUTO},))
    graph = ExportedModel(program.module())
    for m in (model, graph):
        for path in _factored_equals_generic_at_1_and_2_steps(m, x, y):
            assert path._factored() == set(path.rt.trainable)  # the tied weight too
            tied = [path.sites[n] for n in path.tied]  # graph: each head call its own site
            assert {s.embed for s in tied} == {True, False} and set(path.tied) <= path.active
        fi = ForwardInf(m, F64.replace(fast_path="auto"))
        got = fi.self_influence((x, y))
        assert fi.last_report is not None and fi.last_report.path == "factored"
        ref = ForwardInf(model, F64).self_influence((x, y))
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-12)


def test_factored_self_influence_tied_head_from_saved_pt2_holds_nothing_dense(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A pt2 file of a tied LM loads the tie as two Parameters, the graph reading one of them
    and keeping the other on a get_attr no node uses: that one is held fixed, not stepped
    per example as a dense weight (vocab x dim per row); scores: the generic path's."""
    torch.manual_seed(8)
    model = _TiedLm().eval()
    x, y = torch.randint(0, 6, (20, 5)), torch.randint(0, 13, (20,))
    program = torch.export.export(model, (x[:2],), dynamic_shapes=({0: torch.export.Dim.AUTO},))
    torch.export.save(program, tmp_path / "m.pt2")
    graph = ExportedModel(torch.export.load(tmp_path / "m.pt2").module())
    names = {n for n, _ in graph.named_parameters()}
    assert {"graph.tok.weight", "graph.head.weight"} <= names  # the tie is broken on load
    for path in _factored_equals_generic_at_1_and_2_steps(graph, x, y):
        held = names - path.rt.trainable
        assert len(held) == 1 and held < {"graph.tok.weight", "graph.head.weight"}
        assert path._factored() == set(path.rt.trainable)  # nothing dense per example
    # the automatic lr reads ||theta||: the dead copy must not count the tie twice
    for cfg in (F64, F64.replace(lr=1e-2)):
        fi = ForwardInf(graph, cfg.replace(fast_path="auto"))
        got = fi.self_influence((x, y))
        assert fi.last_report is not None and fi.last_report.path == "factored"
        want = ForwardInf(model, cfg).self_influence((x, y))
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-12)
        pairs = ForwardInf(graph, cfg).pairwise((x, y), (x[:4], y[:4]))  # generic pairwise
        torch.testing.assert_close(pairs, ForwardInf(model, cfg).pairwise((x, y), (x[:4], y[:4])))


def test_factored_self_influence_hf_gpt2_tied_head() -> None:
    """A transformers GPT-2 causal LM (``lm_head.weight is wte.weight``) as the pipeline wraps
    it, per-token loss: the tied weight is a factor of both uses, the generic path's scores."""
    transformers = pytest.importorskip("transformers")
    from mirrorinf.tasks.hf_model import TransformersModel

    torch.manual_seed(9)
    config = transformers.GPT2Config(
        n_layer=2, n_embd=16, n_head=2, vocab_size=40, n_positions=8, bos_token_id=0,
        eos_token_id=0, attn_implementation="eager",
    )  # fmt: skip
    lm = transformers.GPT2LMHeadModel(config).eval()
    assert lm.lm_head.weight is lm.transformer.wte.weight
    model = TransformersModel(lm)
    ids = torch.randint(0, 40, (12, 6))
    x, y = {"input_ids": ids}, torch.cat([ids[:, 1:], torch.full((12, 1), -100)], dim=1)
    task = {"kind": "sequence", "output": "logits"}
    for path in _factored_equals_generic_at_1_and_2_steps(model, x, y, **task):
        assert set(path.tied) == {"model.transformer.wte", "model.lm_head"} <= path.active
        assert "model.transformer.wte.weight" in path._factored()
    fi = ForwardInf(model, F64.replace(fast_path="auto"), **task)  # type: ignore[arg-type]
    fi.self_influence((x, y))
    assert fi.last_report is not None and fi.last_report.path == "factored"


class _PaddedConvs(nn.Module):
    """Convs with string padding ("same" with even kernels: one zero more after than before;
    "valid"), grouped "same", Conv3d (strided, padded; and "same"), and a wide Conv1d "same"
    with few positions (patch factors)."""

    def __init__(self) -> None:
        super().__init__()
        self.s2 = nn.Conv2d(2, 4, (2, 3), padding="same", dilation=(1, 2))
        self.g2 = nn.Conv2d(4, 4, 4, padding="same", groups=2, bias=False)
        self.v2 = nn.Conv2d(4, 3, 3, padding="valid", stride=2)
        self.c3 = nn.Conv3d(1, 3, (2, 3, 3), stride=(1, 2, 1), padding=(1, 0, 1))
        self.s3 = nn.Conv3d(3, 2, 2, padding="same", dilation=(1, 2, 1))
        self.t = nn.Conv1d(12, 12, 4, padding="same")
        self.head = nn.Linear(3 * 3 * 2 + 2 * 4 * 3 * 4 + 12, 3)

    def forward(self, x: torch.Tensor, vol: torch.Tensor, seq: torch.Tensor) -> torch.Tensor:
        h = self.v2(torch.tanh(self.g2(torch.tanh(self.s2(x)))))  # 7x6 -> 3x2
        v = self.s3(torch.tanh(self.c3(vol)))  # 3x7x4 -> 4x3x4
        t = torch.tanh(self.t(torch.tanh(self.t(seq)))).mean(dim=2)
        return self.head(torch.cat([h.flatten(1), v.flatten(1), t], dim=1))


def test_factored_self_influence_same_padding_and_conv3d() -> None:
    """Convs with padding="same" (asymmetric for even kernels) or "valid", and Conv3d, as
    unfold factors (per-example weights or patch factors), not vmap's per-example conv
    backward: the generic path's float64 scores, as nn.Module and as an exported graph
    (aten.conv*d.padding and aten.conv3d calls)."""
    torch.manual_seed(10)
    model = _PaddedConvs().eval()
    x = {
        "x": torch.randn(20, 2, 7, 6),
        "vol": torch.randn(20, 1, 3, 7, 4),
        "seq": torch.randn(20, 12, 3),
    }
    y = torch.randint(0, 3, (20,))
    program = torch.export.export(
        model, (), {k: v[:2] for k, v in x.items()},
        dynamic_shapes={k: {0: torch.export.Dim.AUTO} for k in x},
    )  # fmt: skip
    graph = ExportedModel(program.module())
    convs = {"s2", "g2", "v2", "c3", "s3", "t"}
    for m in (model, graph):
        # the exported graph reads t's weight twice: it stays an aten call (dense, vmap)
        want = convs if m is model else convs - {"t"}
        for path in _factored_equals_generic_at_1_and_2_steps(m, x, y):
            assert want == {n.rpartition(".")[2] for n in path.active} - {"head"}
            assert "t" not in {n.rpartition(".")[2] for n in path.moved}  # patch factors
    fi = ForwardInf(graph, F64.replace(fast_path="auto"))
    fi.self_influence((x, y))
    assert fi.last_report is not None and fi.last_report.path == "factored"


class _Bags(nn.Module):
    """Fixed-length bags: an EmbeddingBag summing with per-sample weights and one averaging
    with a padding row, and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.sum = nn.EmbeddingBag(9, 4, mode="sum")
        self.mean = nn.EmbeddingBag(7, 4, mode="mean", padding_idx=0)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids, w = x[:, :5].long(), x[:, 5:]
        return self.head(torch.tanh(torch.cat([self.sum(ids, per_sample_weights=w),
                                               self.mean(ids.remainder(7))], dim=1)))  # fmt: skip


def test_factored_self_influence_embedding_bag() -> None:
    """nn.EmbeddingBag (sum with per-sample weights, mean with a padding row) as a lookup
    through a hookable tap and a weighted sum: the view equals the layer, and its weight is an
    embedding factor: the generic path's float64 scores and SGD by hand on the caller's model."""
    from mirrorinf.engine.module_view import module_view

    torch.manual_seed(11)
    model = _Bags().eval()
    ids = torch.randint(0, 5, (20, 5))  # repeats; padding rows of the mean bag
    ids[0] = 0
    x = torch.cat([ids.double(), torch.rand(20, 5, dtype=torch.float64)], dim=1)
    y = torch.randint(0, 3, (20,))
    for layer, kw in ((model.sum, {"per_sample_weights": x[:, 5:].float()}), (model.mean, {})):
        view = module_view(layer)
        assert view is not None
        torch.testing.assert_close(view(ids, **kw), layer(ids, **kw), rtol=1e-6, atol=1e-7)
    program = torch.export.export(model, (x[:2],), dynamic_shapes=({0: torch.export.Dim.AUTO},))
    graph = ExportedModel(program.module())  # aten.embedding_bag over flattened ids + offsets
    for m in (model, graph):
        for path in _factored_equals_generic_at_1_and_2_steps(m, x, y):
            assert {"sum.lookup", "mean.lookup"} <= {n.removeprefix("graph.") for n in path.active}
            assert path._factored() == set(path.rt.trainable)
    got, _, _ = _factored_vs_generic(model, x, y, F64.replace(fast_path="auto", lr=1e-2))
    torch.testing.assert_close(got, _by_hand_self(model, x, y, 1e-2) / 1e-2, rtol=1e-7, atol=1e-12)
    fi = ForwardInf(graph, F64.replace(fast_path="auto"))
    torch.testing.assert_close(
        fi.self_influence((x, y)), ForwardInf(model, F64).self_influence((x, y))
    )
    assert fi.last_report is not None and fi.last_report.path == "factored"


@pytest.mark.parametrize(
    "layer",
    [
        nn.GRU(3, 4, num_layers=2, bidirectional=True),  # sequence-first, two directions
        nn.LSTM(3, 4, num_layers=2, batch_first=True),
        nn.RNN(3, 4, nonlinearity="relu", batch_first=True),
    ],
    ids=["gru", "lstm", "rnn_relu"],
)
def test_unrolled_recurrent_view_equals_the_layer(layer: nn.Module) -> None:
    """module_view's GRU / LSTM / RNN: the layer's outputs and gradients (float64), with and
    without an initial state, and the layer itself untouched."""
    from mirrorinf.engine.module_view import module_view

    layer = layer.double()
    view = module_view(layer)
    assert view is not None and type(view) is not type(layer)
    torch.manual_seed(4)
    x = torch.randn(5, 6, 3, dtype=torch.float64)
    rnn: Any = layer
    depth = rnn.num_layers * (2 if rnn.bidirectional else 1)
    h = torch.randn(depth, 5 if rnn.batch_first else 6, 4, dtype=torch.float64)
    state = (h, torch.randn_like(h)) if isinstance(layer, nn.LSTM) else h
    for args in ((x,), (x, state)):
        want, got = layer(*args), view(*args)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        gw = torch.autograd.grad(want[0].square().sum(), list(layer.parameters()))
        gg = torch.autograd.grad(got[0].square().sum(), list(view.parameters()))
        torch.testing.assert_close(gg, gw, rtol=1e-10, atol=1e-12)
    assert all(p is q for p, q in zip(view.parameters(), layer.parameters(), strict=True))
    assert type(layer) in (nn.GRU, nn.LSTM, nn.RNN)


def test_stacked_bidirectional_lstm_batches_in_float32(caplog: pytest.LogCaptureFixture) -> None:
    """In float32, where the LSTM's input needs no gradient (here: it reads the data), torch's
    LSTM decomposition calls oneDNN's fused layer, which vmap cannot batch and got wrong for a
    stacked bidirectional LSTM ("mat1 and mat2 shapes cannot be multiplied"): a per-row loop.
    Unrolled with oneDNN off: batched, as the module and as its pt2 graph."""
    torch.manual_seed(5)
    model = _Recurrent("lstm")
    model.emb = nn.Identity()  # the LSTM reads the data: no input gradient in any pass
    model.rnn = nn.LSTM(4, 8, num_layers=2, bidirectional=True, batch_first=True)
    model.head = nn.Linear(16, 3)
    model.eval()
    x, y = torch.randn(24, 5, 4), torch.randint(0, 3, (24,))
    ep = torch.export.export(model, (x[:2],), dynamic_shapes=({0: torch.export.Dim("b")},))
    for m in (model, ExportedModel(ep.module()).eval()):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="mirrorinf.engine"):
            fi = ForwardInf(m)
            si, pw = fi.self_influence((x, y)), fi.pairwise((x, y), (x[:3], y[:3]))
        assert not _loop_warnings(caplog)
        ref = ForwardInf(model, F64)
        torch.testing.assert_close(
            si, ref.self_influence((x, y)).to(si.dtype), rtol=2e-3, atol=1e-6
        )
        torch.testing.assert_close(
            pw, ref.pairwise((x, y), (x[:3], y[:3])).to(pw.dtype), rtol=2e-3, atol=1e-5
        )


def test_onednn_off_overlapping_threads_restore_the_flag() -> None:
    """Two threads' LSTM calls overlap, the first leaves first: oneDNN stays off until the last
    leaves, then is back on (a save/restore per call would leave it off for the process)."""
    import threading

    from mirrorinf.engine.module_view import _onednn_off

    assert torch._C._get_mkldnn_enabled()
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    seen: list[bool] = []

    def first() -> None:
        with _onednn_off():
            a_in.set()
            b_in.wait(10)
        a_out.set()

    def second() -> None:
        a_in.wait(10)
        with _onednn_off():
            b_in.set()
            a_out.wait(10)
            seen.append(torch._C._get_mkldnn_enabled())

    threads = [threading.Thread(target=f) for f in (first, second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert seen == [False] and torch._C._get_mkldnn_enabled()
