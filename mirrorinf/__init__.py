"""mirrorinf: mirrored influence (Forward-INF) from forward passes, as an MLOps step.

The engine (this package) is pure torch + numpy: no orchestration imports.
"""

from mirrorinf.config import ForwardInfConfig, SphereConfig
from mirrorinf.engine import ForwardInf, ScoreReport, cross_entropy

__all__ = ["ForwardInf", "ForwardInfConfig", "ScoreReport", "SphereConfig", "cross_entropy"]
__version__ = "0.1.0"
