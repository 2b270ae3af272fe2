"""Exported graphs (``torch.export``, MLflow's pt2 format) as modules the fast paths can use.

A graph loaded from pt2 calls aten ops on its parameters: ``aten.linear`` (or ``addmm`` of a
transposed weight after decomposition) instead of ``nn.Linear`` modules, so the exact rank-1
path never saw a Linear layer; and ``aten.sym_size``, which vmap cannot batch, so the batched
generic path fell back to a loop. :func:`engine_view` returns a copy whose graph calls
``nn.Linear`` / ``nn.Conv2d`` / ``nn.Conv1d`` / ``nn.Embedding`` submodules (or, for a
projection owned by a larger module such as nn.MultiheadAttention's ``in_proj_weight``, a
:class:`ParamLinear`) holding the *same* Parameter objects (same names, same order), reads sizes
in Python and computes inference-mode batch norm as a per-channel scale and shift. Fused
recurrent ops (``aten.gru`` / ``lstm`` / ``rnn_tanh`` / ``rnn_relu``, which vmap cannot batch)
run as torch's own decomposition into time steps, and tensors the graph creates (an RNN's zero
initial state, traced as float32 on the CPU) take the dtype and device of its parameters, so a
float64 or GPU run works. The same model (to rounding); the caller's model is never changed.
Plain ``nn.Module`` layers get views of their own (:mod:`mirrorinf.engine.module_view`).
"""

from __future__ import annotations

import copy
import logging
import operator
from typing import Any, cast

import torch
from torch import fx, nn

from mirrorinf.engine.module_view import RECURRENT_OPS, module_view, shallow, unrolled

log = logging.getLogger(__name__)

aten = torch.ops.aten
_LINEAR = (aten.linear.default, torch._C._nn.linear, nn.functional.linear)
_CONV_OPS_STR = {aten.conv1d.padding: 3, aten.conv2d.padding: 4, aten.conv3d.padding: 5}
_CONV_OPS = {
    aten.conv1d.default: 3,
    aten.conv2d.default: 4,
    aten.conv3d.default: 5,
    **_CONV_OPS_STR,
}


def engine_view(model: nn.Module) -> nn.Module:
    """``model`` itself when it holds no exported graph or layer to rewrite, else a rewritten
    copy that shares every parameter and buffer (and any module the rewrite did not touch):
    graphs as above, BatchNorm and nn.MultiheadAttention as :mod:`module_view` views."""
    if isinstance(model, fx.GraphModule):
        return _graph_view(model) or model
    layer = module_view(model)
    if layer is not None:
        return layer
    changed = {}
    for name, child in model._modules.items():
        if child is not None:
            view = engine_view(child)
            if view is not child:
                changed[name] = view
    if not changed:
        return model
    clone = shallow(model)  # its own dicts: swapping tensors in it must not touch the original
    clone._modules.update(changed)
    return clone


def _dim_size(t: torch.Tensor, dim: int) -> int:
    """``t.size(dim)``; what ``aten.sym_size.int`` computes, but batchable by vmap."""
    return t.size(dim)


def _eval_batch_norm_call(node: fx.Node) -> bool:
    """An inference-mode ``aten.batch_norm`` with weight, bias and running statistics."""
    args = list(node.args)
    return (
        node.target is aten.batch_norm.default
        and not node.kwargs
        and len(args) == 9
        and args[5] is False
        and all(isinstance(a, fx.Node) for a in args[:5])
    )


def _eval_batch_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    training: bool,
    momentum: float,
    eps: float,
    cudnn: bool,
) -> torch.Tensor:
    """``aten.batch_norm`` in inference mode as one per-channel scale and shift: the same
    function (to rounding), whose per-example parameter gradients vmap batches as plain
    elementwise products (its batch_norm backward rule cost a quarter of a CNN's
    self-influence)."""
    scale = weight * torch.rsqrt(var + eps)
    shift = bias - mean * scale
    view = (-1,) + (1,) * (x.ndim - 2)
    return x * scale.reshape(view) + shift.reshape(view)


# ops that make a tensor from nothing; export bakes the dtype and device of the trace into them
# (an RNN's zero initial state: float32 on the CPU, whatever the engine computes in)
_CREATION = {
    aten.zeros.default, aten.ones.default, aten.full.default, aten.empty.memory_format,
    aten.scalar_tensor.default, aten.eye.default,
}  # fmt: skip


def _like(target: Any, ref: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """``target(*args, **kwargs)`` with ``ref``'s dtype (if it asked for a floating one) and
    device: a tensor the graph makes follows the engine's precision and device, as its
    parameters (``ref`` is one) do."""
    dtype = kwargs.get("dtype")
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        kwargs["dtype"] = ref.dtype
    if "device" in kwargs:
        kwargs["device"] = ref.device
    return cast(torch.Tensor, target(*args, **kwargs))


def _ref_param(gm: nn.Module, graph: fx.Graph) -> fx.Node | None:
    """A new get_attr node, at the top of ``graph``, of a floating parameter the graph already
    reads (so that no parameter it ignores, such as a tied model's dead copy, becomes read)."""
    params = {n for n, p in gm.named_parameters() if p.is_floating_point()}
    name = next(
        (n.target for n in graph.nodes if n.op == "get_attr" and n.target in params and n.users),
        None,
    )
    if not isinstance(name, str):
        return None
    first = next(n for n in graph.nodes if n.op != "placeholder")
    with graph.inserting_before(first):
        return graph.get_attr(name)


def _graph_view(gm: fx.GraphModule) -> fx.GraphModule | None:
    """The rewritten copy of one graph module, or None if nothing in it needs rewriting."""
    graph = copy.deepcopy(gm.graph)
    src = _split_tied(gm, graph)  # gm, or a shallow copy that also holds the aliases
    linears: dict[str, nn.Module] = {}
    sizes = 0
    ref: fx.Node | None = None
    for node in list(graph.nodes):
        if node.op != "call_function" or getattr(node, "_erased", False):
            continue
        if node.target in _CREATION and ("dtype" in node.kwargs or "device" in node.kwargs):
            ref = ref or _ref_param(src, graph)
            if ref is not None:
                node.args, node.target = (node.target, ref, *node.args), _like
                sizes += 1
            continue
        if node.target in RECURRENT_OPS:  # as module_view does for nn.GRU / LSTM / RNN
            node.args, node.target = (node.target, *node.args), unrolled
            sizes += 1
            continue
        if node.target is aten.sym_size.int:
            node.target = _dim_size
            sizes += 1
            continue
        if _eval_batch_norm_call(node):
            node.target = _eval_batch_norm
            sizes += 1
            continue
        bag = _bag_site(src, graph, node)
        if bag is not None and bag[0] not in linears:
            linears[bag[0]] = _rewrite_bag(src, graph, node, bag)
            continue
        conv = _conv_site(src, graph, node)
        emb = _embedding_site(src, graph, node) if conv is None else None
        layer = conv or emb
        site = _linear_site(src, graph, node) if layer is None else (*layer[:3], "weight")
        if site is None:
            continue
        owner, x, erase, field = site
        if owner in linears:  # one projection per module (a second stays an aten call)
            continue
        mod = src.get_submodule(owner)
        lin: nn.Module
        if conv is not None:
            lin = _shared_conv(mod, conv[3])
        elif emb is not None:
            lin = _shared_embedding(mod, emb[3])
        else:
            lin = _shared_linear(mod) if field == "weight" else ParamLinear(mod, field)
        with graph.inserting_before(node):
            call = graph.call_module(owner, (x,))
        call.meta = dict(node.meta)
        node.replace_all_uses_with(call)
        for dead in (node, *erase):
            graph.erase_node(dead)
        linears[owner] = lin
    if not linears and not sizes:
        return None
    for owner, mod in linears.items():  # a projection's module keeps its children: their views
        for name in mod._modules:
            mod._modules[name] = linears.get(f"{owner}.{name}", mod._modules[name])
    root: dict[str, Any] = {}
    for node in graph.nodes:
        if node.op == "get_attr":
            root[node.target] = _attr(src, node.target)
        elif node.op == "call_module":
            root[node.target] = linears.get(node.target) or src.get_submodule(node.target)
    view = fx.GraphModule(root, graph, class_name=type(gm).__name__)
    _restore_kinds(view, src, [n.target for n in graph.nodes if n.op == "get_attr"])
    _match_order(view, gm)
    fresh = fx.GraphModule(nn.Module(), fx.Graph()).__dict__
    for key, value in gm.__dict__.items():  # pytree specs, input checks, train/eval guards
        if key not in fresh or key in ("meta", "training"):
            view.__dict__[key] = value
    log.info(
        "exported graph: %d linear/conv call(s) as modules, %d size read(s) and batch norm(s) "
        "made batchable",
        len(linears),
        sizes,
    )
    return view


def _split_tied(gm: fx.GraphModule, graph: fx.Graph) -> nn.Module:
    """Give each use of a weight that several ``aten.linear`` / ``aten.embedding`` calls read
    (an LM head tied to the token embedding) a ``get_attr`` of its own, on an alias module
    (``<owner>_tied<k>``) holding the same Parameter, so that each call becomes a layer whose
    hooks see it; ``gm`` itself if no weight is tied so, else a shallow copy with the aliases.
    A tied weight with any other use, or whose owner holds anything else, is left as it is."""
    reads: dict[int, list[fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "get_attr" and isinstance(_attr(gm, node.target), nn.Parameter):
            reads.setdefault(id(_attr(gm, node.target)), []).append(node)
    src: nn.Module = gm
    for nodes in reads.values():
        uses = [(n, u) for n in nodes for u in n.users]
        if len(uses) < 2 or not all(_weight_use(n, u) for n, u in uses):
            continue
        owners = {str(n.target).rpartition(".")[0] for n in nodes}
        if any(not o or _holds_more(gm.get_submodule(o)) for o in owners):
            continue
        if src is gm:
            src = shallow(gm)
        for k, (n, u) in enumerate(uses[1:], 1):
            owner, _, field = str(n.target).rpartition(".")
            alias = _add_alias(src, owner, k)
            with graph.inserting_before(u):
                read = graph.get_attr(f"{alias}.{field}")
            read.meta = dict(n.meta)
            u.replace_input_with(n, read)
    return src


def _weight_use(w: fx.Node, user: fx.Node) -> bool:
    """``user`` reads ``w`` as the weight of an ``aten.linear`` or ``aten.embedding`` call only."""
    args = [*user.args, *user.kwargs.values()]
    if user.target in _LINEAR:
        return len(args) >= 2 and args[1] is w and args[0] is not w and w not in args[2:]
    if user.target is aten.embedding.default and not user.kwargs:
        return args[0] is w and w not in args[1:]
    return False


def _holds_more(mod: nn.Module) -> bool:
    """A module holding more than one weight (a bias, buffers or children)."""
    return bool(mod._modules or mod._buffers) or len(mod._parameters) != 1


def _add_alias(root: nn.Module, owner: str, k: int) -> str:
    """Register ``<owner>_tied<k>``, a shallow copy of ``owner`` (the same Parameter), in
    ``root`` (copying the path down to it, so the graph's own modules are untouched)."""
    *path, last = owner.split(".")
    mod = root
    for part in path:
        child = shallow(cast(nn.Module, mod._modules[part]))
        mod._modules[part] = child
        mod = child
    alias = f"{last}_tied{k}"
    while alias in mod._modules or alias in mod._parameters or alias in mod._buffers:
        alias += "_"
    mod._modules[alias] = shallow(cast(nn.Module, mod._modules[last]))
    return ".".join([*path, alias])


def _linear_site(
    gm: nn.Module, graph: fx.Graph, node: fx.Node
) -> tuple[str, fx.Node, list[fx.Node], str] | None:
    """(owner module, input node, nodes to erase, weight attribute) of a linear call on one
    module's own weight (and bias) that nothing else reads; None for anything else. The weight
    is ``weight`` of a Linear-like owner or ``<name>_weight`` (with ``<name>_bias``) of a larger
    module, such as nn.MultiheadAttention's ``in_proj_weight``."""
    args: list[Any] = [*node.args, *node.kwargs.values()]
    extra: list[fx.Node] = []
    if node.target in _LINEAR and len(args) in (2, 3):
        x, w, b = args[0], args[1], args[2] if len(args) == 3 else None
    elif node.target is aten.addmm.default and not node.kwargs and len(args) == 3:
        b, x, wt = args
        if not (isinstance(wt, fx.Node) and _is_transpose(wt) and len(wt.users) == 1):
            return None
        w, extra = wt.args[0], [wt]
    else:
        return None
    if not isinstance(x, fx.Node) or not _own_attr(w) or (b is not None and not _own_attr(b)):
        return None
    owner, _, field = str(w.target).rpartition(".")
    if not owner or not (field == "weight" or field.endswith("_weight")):
        return None
    bias_field = field[: -len("weight")] + "bias"
    if b is not None and b.target != f"{owner}.{bias_field}":
        return None
    mod = gm.get_submodule(owner)
    weight = mod._parameters.get(field)
    if not isinstance(weight, nn.Parameter) or weight.ndim != 2:
        return None
    if field == "weight":  # the owner becomes an nn.Linear: it must hold nothing else
        if mod._modules or mod._buffers:
            return None
        if set(mod._parameters) != {"weight", *(["bias"] if b is not None else [])}:
            return None
    elif b is None and mod._parameters.get(bias_field) is not None:
        return None  # a projection's bias exists but is not used here: leave it as it is
    nodes = [w] if b is None else [w, b]
    mine = {str(n.target) for n in nodes}
    own = {f"{owner}.{field}", f"{owner}.{bias_field}"} if field != "weight" else None
    reads = [
        n
        for n in graph.nodes
        if n.op == "get_attr"
        and (str(n.target) in own if own else str(n.target).startswith(owner + "."))
    ]
    if len(reads) != len(nodes) or not mine <= {str(n.target) for n in reads}:
        return None  # the owner's tensors are read elsewhere too (tied weights)
    return owner, x, [*extra, *nodes], field


def _conv_site(
    gm: nn.Module, graph: fx.Graph, node: fx.Node
) -> tuple[str, fx.Node, list[fx.Node], dict[str, Any]] | None:
    """(owner, input node, nodes to erase, Conv arguments) of an ``aten.conv1d`` / ``conv2d`` /
    ``conv3d`` call (numeric or "same" / "valid" padding) on one module's own 3-D / 4-D / 5-D
    weight (and bias) that nothing else reads; else None."""
    ndim = _CONV_OPS.get(cast(Any, node.target))
    if ndim is None or node.kwargs:
        return None
    names = ("x", "w", "b", "stride", "padding", "dilation", "groups")
    pad = "valid" if node.target in _CONV_OPS_STR else 0  # the overloads' default padding
    a: dict[str, Any] = {"b": None, "stride": 1, "padding": pad, "dilation": 1, "groups": 1}
    a.update(zip(names, node.args, strict=False))
    x, w, b = a["x"], a["w"], a["b"]
    if not isinstance(x, fx.Node) or not _own_attr(w) or (b is not None and not _own_attr(b)):
        return None
    owner = _sole_owner(gm, graph, w, b, ndim)
    if owner is None:
        return None
    args = {k: a[k] for k in ("stride", "padding", "dilation", "groups")}
    return owner, x, [w] if b is None else [w, b], args


def _sole_owner(
    gm: nn.Module, graph: fx.Graph, w: fx.Node, b: fx.Node | None, ndim: int
) -> str | None:
    """The module owning ``weight`` (an ``ndim``-D Parameter) and ``bias`` (or no bias) and
    nothing else, whose tensors no other node reads; None if there is none."""
    owner, _, field = str(w.target).rpartition(".")
    if not owner or field != "weight" or (b is not None and b.target != f"{owner}.bias"):
        return None
    mod = gm.get_submodule(owner)
    weight = mod._parameters.get("weight")
    if not isinstance(weight, nn.Parameter) or weight.ndim != ndim or mod._modules or mod._buffers:
        return None
    if set(mod._parameters) != {"weight", *(["bias"] if b is not None else [])}:
        return None
    reads = [n for n in graph.nodes if n.op == "get_attr" and str(n.target).startswith(owner + ".")]
    return owner if len(reads) == (1 if b is None else 2) else None


def _embedding_site(
    gm: nn.Module, graph: fx.Graph, node: fx.Node
) -> tuple[str, fx.Node, list[fx.Node], dict[str, Any]] | None:
    """(owner, indices node, nodes to erase, Embedding arguments) of an ``aten.embedding``
    call (no frequency scaling) on one module's own 2-D weight that nothing else reads."""
    if node.target is not aten.embedding.default or node.kwargs:
        return None
    defaults: tuple[Any, ...] = (-1, False, False)  # padding_idx, scale_grad_by_freq, sparse
    args: list[Any] = [*node.args, *defaults[len(node.args) - 2 :]]
    w, idx, padding_idx, by_freq, sparse = args
    if by_freq or not isinstance(idx, fx.Node) or not _own_attr(w):
        return None
    owner = _sole_owner(gm, graph, w, None, 2)
    if owner is None:
        return None
    pad = None if int(padding_idx) < 0 else int(padding_idx)
    return owner, idx, [w], {"padding_idx": pad, "sparse": bool(sparse)}


_BAGS = (aten.embedding_bag.default, aten.embedding_bag.padding_idx)
_FLAT = (aten.reshape.default, aten.view.default)


def _bag_site(
    gm: nn.Module, graph: fx.Graph, node: fx.Node
) -> tuple[str, fx.Node, fx.Node | None, dict[str, Any]] | None:
    """(owner, 2-D indices node, 2-D per-sample weights node or None, EmbeddingBag arguments)
    of an ``aten.embedding_bag`` call (sum or mean) on one module's own weight over fixed-length
    bags: the flattened 2-D indices with offsets ``arange(0, numel, L)`` (how torch.export
    writes ``EmbeddingBag(ids [B, L])``); else None."""
    if node.target not in _BAGS or node.kwargs:
        return None
    names = ("w", "idx", "off", "by_freq", "mode", "sparse", "psw", "last", "pad")
    a: dict[str, Any] = {"by_freq": False, "mode": 0, "sparse": False, "psw": None}
    a.update({"last": False, "pad": None})
    a.update(zip(names, node.args, strict=False))
    if a["by_freq"] or a["mode"] not in (0, 1) or a["last"] or not _own_attr(a["w"]):
        return None
    ids, off, psw = a["idx"], a["off"], a["psw"]
    if not (
        isinstance(ids, fx.Node) and ids.target in _FLAT and list(cast(Any, ids.args[1])) == [-1]
    ):
        return None
    x = ids.args[0]
    shape = getattr(x.meta.get("val"), "shape", None) if isinstance(x, fx.Node) else None
    if (
        not isinstance(x, fx.Node)
        or shape is None
        or len(shape) != 2
        or not isinstance(shape[1], int)
    ):
        return None  # a dynamic bag length: not handled
    if not (isinstance(off, fx.Node) and off.target is aten.arange.start_step):
        return None
    if list(off.args[:1]) != [0] or off.args[2:] != (shape[1],):
        return None
    w2: fx.Node | None = None
    if psw is not None:
        flat = isinstance(psw, fx.Node) and psw.target in _FLAT
        if not (flat and list(cast(Any, psw.args[1])) == [-1]):
            return None
        src = psw.args[0]
        if not isinstance(src, fx.Node):
            return None
        w2 = src
    if any(u.target is not operator.getitem or (u.args[1] != 0 and u.users) for u in node.users):
        return None
    owner = _sole_owner(gm, graph, a["w"], None, 2)
    if owner is None:
        return None
    pad = a["pad"] if a["pad"] is None or a["pad"] >= 0 else None
    return owner, x, w2, {"mode": ("sum", "mean")[a["mode"]], "padding_idx": pad}


def _rewrite_bag(gm: nn.Module, graph: fx.Graph, node: fx.Node, site: tuple[Any, ...]) -> nn.Module:
    """Replace an ``aten.embedding_bag`` call (see :func:`_bag_site`) by a call of the owner as
    an :class:`~mirrorinf.engine.module_view.EngineEmbeddingBag` view holding its weight."""
    owner, x, psw, args = site
    weight = gm.get_submodule(owner)._parameters["weight"]
    assert weight is not None
    num, dim = weight.shape
    bag = nn.EmbeddingBag(num, dim, mode=args["mode"], padding_idx=args["padding_idx"],
                          device="meta")  # fmt: skip
    bag.weight = weight
    view = module_view(bag)
    assert view is not None
    with graph.inserting_before(node):
        call = graph.call_module(owner, (x,) if psw is None else (x, None, psw))
    out = [u for u in node.users if u.args[1] == 0]
    call.meta = dict(out[0].meta) if out else {}
    for u in list(node.users):
        u.replace_all_uses_with(call)
        graph.erase_node(u)
    dead = [node, *[a for a in node.args if isinstance(a, fx.Node)]]
    for n in dead:
        if not n.users and n.op in ("call_function", "get_attr"):
            more = [a for a in n.args if isinstance(a, fx.Node)] if n is not node else []
            graph.erase_node(n)
            dead.extend(m for m in more if m not in dead)
    return view


def _shared_embedding(owner: nn.Module, args: dict[str, Any]) -> nn.Embedding:
    """An nn.Embedding holding ``owner``'s weight (the same Parameter object)."""
    weight = owner._parameters["weight"]
    assert weight is not None
    num, dim = weight.shape
    emb = nn.Embedding(num, dim, args["padding_idx"], sparse=args["sparse"], device="meta")
    emb.weight = weight
    emb.training = owner.training
    return emb


def _shared_conv(owner: nn.Module, args: dict[str, Any]) -> nn.Conv1d | nn.Conv2d | nn.Conv3d:
    """An nn.Conv1d / Conv2d / Conv3d (by the weight's dimensions) holding ``owner``'s weight
    and bias (the same Parameter objects)."""
    weight = owner._parameters["weight"]
    assert weight is not None
    bias = owner._parameters.get("bias")
    out_ch, in_per_group, *kernel = weight.shape
    groups = int(args["groups"])
    cls: Any = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[len(kernel) - 1]
    conv: nn.Conv1d | nn.Conv2d | nn.Conv3d = cls(
        in_per_group * groups, out_ch, tuple(kernel), stride=args["stride"],
        padding=args["padding"], dilation=args["dilation"], groups=groups,
        bias=bias is not None, device="meta",
    )  # fmt: skip
    conv.weight = weight
    if bias is not None:
        conv.bias = bias
    conv.training = owner.training
    return conv


def _is_transpose(n: fx.Node) -> bool:
    """A 2-D transpose: aten.t, permute [1, 0] or transpose(0, 1)."""
    rest: list[Any] = list(n.args[1:])
    if n.target is aten.t.default:
        return True
    if n.target is aten.permute.default:
        return len(rest) == 1 and list(rest[0]) == [1, 0]
    return n.target is aten.transpose.int and sorted(rest) in ([0, 1], [-2, -1])


def _own_attr(n: object) -> bool:
    """A get_attr node read by one node only."""
    return isinstance(n, fx.Node) and n.op == "get_attr" and len(n.users) == 1


def _shared_linear(owner: nn.Module) -> nn.Linear:
    """An nn.Linear holding ``owner``'s weight and bias (the same Parameter objects)."""
    weight = owner._parameters["weight"]
    assert weight is not None
    bias = owner._parameters.get("bias")
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    lin.weight = weight
    if bias is not None:
        lin.bias = bias
    lin.training = owner.training
    return lin


class ParamLinear(nn.Module):
    """A module of an exported graph (e.g. nn.MultiheadAttention's) whose one linear call on its
    own ``<name>_weight`` / ``<name>_bias`` becomes this module's forward, so that hooks see it;
    it holds the owner's Parameters, buffers and children under their own names."""

    def __init__(self, owner: nn.Module, weight: str) -> None:
        super().__init__()
        self.weight_attr = weight
        self.bias_attr = weight[: -len("weight")] + "bias"
        self._parameters.update(owner._parameters)
        self._buffers.update(owner._buffers)
        self._non_persistent_buffers_set.update(owner._non_persistent_buffers_set)
        self._modules.update(owner._modules)
        self.training = owner.training

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = getattr(self, self.bias_attr) if self.bias_attr in self._parameters else None
        return nn.functional.linear(x, getattr(self, self.weight_attr), bias)


def _attr(gm: nn.Module, target: str) -> Any:
    owner, _, field = target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, field)


def _restore_kinds(view: nn.Module, gm: nn.Module, targets: list[str]) -> None:
    """Attributes the original held as plain tensors (constants) or non-persistent buffers
    stay so (fx registers every non-Parameter tensor as a persistent buffer)."""
    for target in targets:
        owner, _, field = target.rpartition(".")
        old = gm.get_submodule(owner) if owner else gm
        new = view.get_submodule(owner) if owner else view
        if field in old._buffers:
            if field in old._non_persistent_buffers_set:
                new._non_persistent_buffers_set.add(field)
        elif field in new._buffers:
            value = new._buffers.pop(field)
            new.__dict__[field] = value


def _match_order(new: nn.Module, old: nn.Module) -> None:
    """Parameters, buffers and submodules in the original's order (fx installs them in graph
    order): the engine's parameter list, norms and stacking then match the original model's."""
    for attr in ("_parameters", "_buffers", "_modules"):
        mine, theirs = getattr(new, attr), getattr(old, attr)
        keys = [k for k in theirs if k in mine] + [k for k in mine if k not in theirs]
        new.__dict__[attr] = {k: mine[k] for k in keys}
    for name, child in new._modules.items():
        ref = old._modules.get(name)
        if child is not None and ref is not None and child is not ref:
            _match_order(child, ref)


def unread_params(model: nn.Module) -> set[str]:
    """Names of ``model``'s parameters that only exported graphs hold and that none of their
    live nodes reads (a pt2 graph of a tied LM head keeps the embedding's own copy of the
    weight, loaded as a separate Parameter, on a ``get_attr`` with no users): their gradient
    is zero for every input, so the engine need not differentiate or step them."""
    graphs = [m for m in model.modules() if isinstance(m, fx.GraphModule)]
    held: set[int] = set()
    read: set[int] = set()
    for gm in graphs:
        held |= {id(p) for p in gm.parameters()}
        for node in gm.graph.nodes:
            if node.op == "get_attr" and node.users:
                value = _attr(gm, str(node.target))
                if isinstance(value, nn.Module):
                    read |= {id(p) for p in value.parameters()}
                elif isinstance(value, torch.Tensor):
                    read.add(id(value))
            elif node.op == "call_module":
                read |= {id(p) for p in gm.get_submodule(str(node.target)).parameters()}
    inside = {id(m) for gm in graphs for m in gm.modules()}
    # a parameter also held by a module outside every graph (a wrapper's layer) may be read
    outside = {id(p) for m in model.modules() if id(m) not in inside for p in m.parameters(False)}
    unread = held - read - outside
    return {n for n, p in model.named_parameters() if id(p) in unread}
