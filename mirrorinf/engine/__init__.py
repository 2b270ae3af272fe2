"""The Forward-INF engine: mirrored influence from forward passes (pure torch + numpy).

Layout: ``facade`` (ForwardInf, the three verbs) picks a scorer from the mode once;
``scorer`` (the Scorer interface, plain mode), ``generic`` and ``rank1`` (the two plain paths),
``group_fit`` and ``anchored`` are the methods; ``runtime`` (model state, forward, precision,
device), ``updates`` (gradients and steps), ``execution`` (batches, out-of-memory retry,
progress, cache), ``scores`` (the typed result, scale, health, report), ``inputs``, ``losses``,
``curvature``, ``examples`` and ``config`` are shared by all of them.
"""

from mirrorinf.engine.config import ForwardInfConfig, SphereConfig
from mirrorinf.engine.examples import DataLike, Examples, Inputs, RowReader, as_examples
from mirrorinf.engine.facade import ForwardInf
from mirrorinf.engine.losses import (
    KINDS,
    LossFn,
    TaskKind,
    binary_cross_entropy,
    cross_entropy,
    default_loss,
    multilabel_bce,
    sequence_cross_entropy,
    squared_error,
)
from mirrorinf.engine.outputs import OutputSpec, select_output
from mirrorinf.engine.runtime import ModelState
from mirrorinf.engine.scorer import Scorer
from mirrorinf.engine.scores import NonFiniteScores, ScoreReport, Scores, ScoreSink

__all__ = [
    "KINDS",
    "DataLike",
    "Examples",
    "ForwardInf",
    "ForwardInfConfig",
    "Inputs",
    "LossFn",
    "ModelState",
    "NonFiniteScores",
    "OutputSpec",
    "RowReader",
    "ScoreReport",
    "ScoreSink",
    "Scorer",
    "Scores",
    "SphereConfig",
    "TaskKind",
    "as_examples",
    "binary_cross_entropy",
    "cross_entropy",
    "default_loss",
    "multilabel_bce",
    "select_output",
    "sequence_cross_entropy",
    "squared_error",
]
