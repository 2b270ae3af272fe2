"""``ForwardInf``: the engine's public face. It picks the scoring method once, validates
inputs, runs a scorer inside a model-state snapshot, recomputes what float32 could not resolve
in float64, and returns float32 CPU scores with a ``ScoreReport``.

score(i, q) = loss(z_i; theta) - loss(z_i; theta_q), theta_q = theta after fitting q.
Positive = proponent (fitting q lowers z_i's loss). Base losses are computed once per
(model, training set) and reused; loss differences are always taken in float64.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from mirrorinf.engine.anchored import AnchoredScorer
from mirrorinf.engine.config import ForwardInfConfig
from mirrorinf.engine.examples import DataLike, Examples, Inputs, as_examples, rows
from mirrorinf.engine.execution import retry_on_oom
from mirrorinf.engine.inputs import check_train, prepare_queries
from mirrorinf.engine.losses import KINDS, LossFn
from mirrorinf.engine.outputs import OutputSpec
from mirrorinf.engine.runtime import ModelState, Runtime
from mirrorinf.engine.scorer import PlainScorer, Scorer
from mirrorinf.engine.scores import (
    Columns,
    ScoreReport,
    Scores,
    ScoreSink,
    in_memory,
    make_report,
)

log = logging.getLogger(__name__)

_SCORERS: dict[str, type[PlainScorer] | type[AnchoredScorer]] = {
    "plain": PlainScorer,
    "anchored": AnchoredScorer,
}


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
        *,
        kind: str = "classification",
        output: OutputSpec = None,
    ) -> None:
        """``kind``: the task kind (classification | binary | regression | multilabel |
        sequence), which picks the default per-example loss and the target checks; ``loss_fn``
        replaces that loss (``f(outputs, targets) -> [n]``); ``output``: where the prediction is
        in the model's output (attribute/key such as ``"logits"``, tuple index, or callable)."""
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
        method = _SCORERS[self.config.mode]  # the one place the engine reads config.mode
        if kind not in KINDS:
            raise ValueError(f"unknown task kind {kind!r}; use one of {', '.join(KINDS)}")
        self.kind = kind
        self.output = output
        self._rt = Runtime(model, self.config, loss_fn, device, method.auto_dtype, kind, output)
        self._scorer: Scorer = method(self._rt)
        self._loss_given = loss_fn
        self.last_report: ScoreReport | None = None

    # ------------------------------------------------------------------ public API
    @property
    def loss_fn(self) -> LossFn:
        return self._rt.loss_fn

    @property
    def device(self) -> torch.device:
        return self._rt.device

    @property
    def dtype(self) -> torch.dtype:
        return self._rt.dtype

    @property
    def train_batch(self) -> int:
        """Rows per forward pass (halved after an out-of-memory error)."""
        return self._rt.plan.train_batch

    @property
    def query_batch(self) -> int:
        """Queries scored together (halved after an out-of-memory error)."""
        return self._rt.plan.query_batch

    def pairwise(
        self, train: DataLike, queries: DataLike, *, curvature: DataLike | None = None
    ) -> torch.Tensor:
        """Scores [n_train, n_query]: how much fitting each query lowers each training loss.

        ``curvature`` (anchored mode): the training set whose objective the mirror direction
        comes from, when ``train`` is only some of its rows (a shard): scores then equal those
        of the whole set's run. None = ``train``. Plain mode has no curvature and ignores it.
        """
        tr, qs = as_examples(train, "train"), as_examples(queries, "queries")
        out = in_memory(len(tr), len(qs))
        self.pairwise_into(tr, qs, out, curvature=curvature)
        return torch.from_numpy(out)

    def pairwise_into(
        self,
        train: DataLike,
        queries: DataLike,
        out: ScoreSink,
        *,
        curvature: DataLike | None = None,
    ) -> ScoreReport:
        """``pairwise`` written into ``out`` instead of returned: any [n_train, n_query] array
        with slice assignment (a ``np.memmap`` of a file, for a matrix larger than memory),
        filled one block of training rows x queries at a time in its dtype (float32: the
        values ``pairwise`` returns) and never read back, so the call holds O(rows per batch x
        queries) besides its inputs. Returns the call's report (also ``last_report``)."""
        tr, qs = as_examples(train, "train"), as_examples(queries, "queries")
        if tuple(out.shape) != (len(tr), len(qs)):
            raise ValueError(
                f"out has shape {tuple(out.shape)}; pairwise scores of {len(tr)} training rows "
                f"and {len(qs)} queries need ({len(tr)}, {len(qs)})"
            )
        self._run("pairwise", lambda: self._pairwise(tr, qs, out, curvature))
        assert self.last_report is not None
        return self.last_report

    def group(
        self, train: DataLike, queries: DataLike, *, curvature: DataLike | None = None
    ) -> torch.Tensor:
        """Scores [n_train] for one update on the whole query set (negative = harmful to it);
        ``curvature`` as in ``pairwise``. In anchored mode, the plain twin's group fit (what
        measured best at finding harmful examples: mirrorinf/engine/anchored.py). Each row's
        loss after the update: ``last_report.loss_after_fit`` (the harmful flag's score)."""
        if self._scorer.group_in_plain_twin:
            twin = self.plain_twin()
            out = twin.group(train, queries, curvature=curvature)
            self.last_report = twin.last_report
            return out
        return self._column("group", lambda: self._group(train, queries, curvature))

    def self_influence(self, train: DataLike) -> torch.Tensor:
        """Scores [n_train]: each training point's loss drop after fitting that point alone.

        Always the plain update with its automatic step (anchored self-influence would need
        n_train anchored runs), so it is on the same per-unit-lr scale as plain pairwise scores
        whatever the mode. Large = atypical, mislabeled or memorised.
        """
        if self._scorer.self_in_plain_twin:
            twin = self.plain_twin()
            out = twin.self_influence(train)
            self.last_report = twin.last_report
            return out
        return self._column("self", lambda: self._self(train))

    def plain_twin(self) -> ForwardInf:
        """This engine in plain mode with automatic steps (same model, loss, device): the scale
        on which self-influence and the leak rule's gradient cosine are defined."""
        return self._derived(mode="plain", steps=None, lr=None, precision="auto")

    # ------------------------------------------------------------------ one call
    def _column(self, kind: str, compute: Callable[[], Scores]) -> torch.Tensor:
        """One column of scores per training row (group, self), float32."""
        matrix = self._run(kind, compute).matrix
        assert isinstance(matrix, torch.Tensor)
        return matrix.float()[:, 0]

    def _run(self, kind: str, compute: Callable[[], Scores]) -> Scores:
        """Compute (halving batches after out-of-memory errors), report, return the scores."""
        t0 = time.perf_counter()
        scores = retry_on_oom(compute, self._rt.shrink)
        report = make_report(kind, self._scorer.mode, scores, time.perf_counter() - t0)
        self.last_report = report
        log.info(
            "%s: %d x %d scores in %.2fs (path %s, zero %.2f%%)",
            kind,
            report.n_train,
            report.n_query,
            report.seconds,
            report.path,
            100 * report.zero_fraction,
        )
        return scores

    @contextmanager
    def _prepared(
        self, train: DataLike, queries: DataLike, curvature: DataLike | None
    ) -> Iterator[tuple[ModelState, Examples, Inputs, torch.Tensor, Examples | None]]:
        """One scoring call's inputs, checked against the model, in its scoring state."""
        tr, qs = self._rt.resident(as_examples(train, "train")), as_examples(queries, "queries")
        curv = self._curvature(curvature)
        with self._rt.scoring() as state:
            check_train(self._rt, state, tr)
            if curv is not None:
                check_train(self._rt, state, curv)
            xq, yq = prepare_queries(self._rt, state, qs)
            yield state, tr, xq, yq, curv

    def _pairwise(
        self,
        train: DataLike,
        queries: DataLike,
        out: ScoreSink,
        curvature: DataLike | None = None,
    ) -> Scores:
        with self._prepared(train, queries, curvature) as (state, tr, xq, yq, curv):
            scores = self._scorer.pairwise(state, tr, xq, yq, out, curv)
        if len(tr) > 1 and scores.stats is not None:
            bad = scores.stats.vanished().nonzero().flatten()
            self._redo_in_float64(
                scores,
                bad,
                lambda hi: hi._pairwise(tr, (rows(xq, bad), yq[bad]), Columns(out, bad), curv),
            )
        return scores

    def _group(
        self, train: DataLike, queries: DataLike, curvature: DataLike | None = None
    ) -> Scores:
        with self._prepared(train, queries, curvature) as (state, tr, xq, yq, curv):
            return self._scorer.group(state, tr, xq, yq, curv)

    def _curvature(self, curvature: DataLike | None) -> Examples | None:
        """The validated curvature set (None: the scored training rows serve)."""
        if curvature is None:
            return None
        return self._rt.resident(as_examples(curvature, "curvature"))

    def _self(self, train: DataLike | Examples) -> Scores:
        tr = self._rt.resident(as_examples(train, "train"))
        with self._rt.scoring() as state:
            check_train(self._rt, state, tr)
            scores = self._scorer.self_influence(state, tr)
        assert isinstance(scores.matrix, torch.Tensor)
        zero = (scores.matrix[:, 0] == 0).nonzero().flatten()
        if len(zero) > 0.01 * len(tr):
            self._redo_in_float64(scores, zero, lambda hi: hi._self(tr.take(zero)), rows=True)
        return scores

    def _redo_in_float64(
        self,
        scores: Scores,
        idx: torch.Tensor,
        redo: Callable[[ForwardInf], Scores],
        rows: bool = False,
    ) -> None:
        """Recompute the columns (queries; or ``rows``) float32 could not resolve with a float64
        twin: rows are put into ``scores`` (rounded to float32, as the result is returned);
        columns the twin wrote into the call's output itself (``redo`` gives it the columns)."""
        hi = self._float64_twin() if len(idx) > 0 else None
        if hi is None:
            return
        fixed = redo(hi)
        if rows:
            assert isinstance(scores.matrix, torch.Tensor)
            assert isinstance(fixed.matrix, torch.Tensor)
            scores.matrix[idx, 0] = fixed.matrix[:, 0].float().double()
        else:
            if scores.stats is not None and fixed.stats is not None:
                scores.stats.replace(idx, fixed.stats)
            if scores.query_self_drop is not None and fixed.query_self_drop is not None:
                scores.query_self_drop[idx] = fixed.query_self_drop.float().double()
        scores.upcast = len(idx)

    # ------------------------------------------------------------------ derived engines
    def _float64_twin(self) -> ForwardInf | None:
        """A float64 twin, used to redo the few columns/rows float32 could not resolve."""
        if self.config.precision != "auto" or self.dtype == torch.float64:
            return None
        log.info("some scores vanished at float32; recomputing them in float64")
        return self._derived(precision="float64", sphere=None, autocast="off", compile=False)

    def _derived(self, **changes: Any) -> ForwardInf:
        """An engine on the same model, loss and device with ``changes`` to the config (and
        this engine's current batch sizes)."""
        cfg = self.config.replace(**changes, **self._rt.plan.sizes())
        return ForwardInf(
            self.model, cfg, self._loss_given, self.device, kind=self.kind, output=self.output
        )
