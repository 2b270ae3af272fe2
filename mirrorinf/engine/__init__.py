"""The Forward-INF engine: mirrored influence from forward passes (pure torch + numpy).

Layout: ``facade`` (ForwardInf, the three verbs) picks a scorer from the mode once;
``scorer`` (the Scorer interface, plain mode), ``generic`` and ``rank1`` (the two plain paths),
``group_fit`` and ``anchored`` are the methods; ``runtime`` (model state, forward, precision,
device), ``updates`` (gradients and steps), ``execution`` (batches, out-of-memory retry,
progress, cache), ``scores`` (the typed result, scale, health, report), ``inputs``, ``losses``,
``curvature``, ``examples`` and ``config`` are shared by all of them.
"""

from mirrorinf.engine.config import ForwardInfConfig, SphereConfig
from mirrorinf.engine.examples import DataLike, Examples, as_examples
from mirrorinf.engine.facade import ForwardInf
from mirrorinf.engine.losses import LossFn, cross_entropy
from mirrorinf.engine.runtime import ModelState
from mirrorinf.engine.scorer import Scorer
from mirrorinf.engine.scores import ScoreReport, Scores

__all__ = [
    "DataLike",
    "Examples",
    "ForwardInf",
    "ForwardInfConfig",
    "LossFn",
    "ModelState",
    "ScoreReport",
    "Scorer",
    "Scores",
    "SphereConfig",
    "as_examples",
    "cross_entropy",
]
