"""Typed, validated configuration of the Forward-INF engine.

Every field has a documented default; ``ForwardInfConfig.from_dict`` / ``to_dict`` round-trip
through JSON and YAML so the exact config can be saved beside every result and checked on rerun.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar, cast

_T = TypeVar("_T")

_CHOICES: dict[str, tuple[str, ...]] = {
    "mode": ("plain", "anchored"),
    "optimizer": ("sgd", "adam"),
    "direction": ("descent", "ascent"),
    "score": ("signed", "abs"),
    "precision": ("auto", "float32", "float64"),
    "fast_path": ("auto", "off"),
    "autocast": ("off", "bf16", "fp16"),
}


def _positive(name: str, value: Any, *, allow_none: bool = False, integer: bool = False) -> None:
    if value is None and allow_none:
        return
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not value > 0:
        what = "a positive integer" if integer else "a positive number"
        extra = " or null (automatic)" if allow_none else ""
        raise ValueError(f"ForwardInfConfig.{name} must be {what}{extra}, got {value!r}")


@dataclass(frozen=True)
class SphereConfig:
    """Perturb queries the model already fits (loss below ``loss_floor``) on a small sphere.

    As in the authors' leakage code: a random direction of length ``radius`` (relative to the
    input's norm) is added; the radius grows by ``growth`` until the loss exceeds the floor or
    ``max_tries`` is reached. Without it, a query with loss ~0 gives no signal.
    """

    radius: float = 0.01
    growth: float = 2.0
    loss_floor: float = 1e-3
    max_tries: int = 10

    def __post_init__(self) -> None:
        _positive("sphere.radius", self.radius)
        _positive("sphere.loss_floor", self.loss_floor)
        _positive("sphere.max_tries", self.max_tries, integer=True)
        if not isinstance(self.growth, (int, float)) or self.growth <= 1:
            raise ValueError(f"ForwardInfConfig.sphere.growth must be > 1, got {self.growth!r}")


@dataclass(frozen=True)
class ForwardInfConfig:
    """Knobs of mirrored-influence scoring. Defaults are what users should run.

    Fields:
        mode: "plain" = fit-on-query steps on loss(q) alone (TracIn-equivalent quality, forward
            passes only); "anchored" = the mirror point of the training objective with the
            query's weight added, -F(H) g_q with F a damped inverse of the training Hessian H
            applied through one Lanczos basis built once per model and training set, each
            training row's loss drop measured by forward passes (closer to retraining on
            D + {q}; much more faithful; costs the basis once, ~100-300 Hessian-vector products
            on up to 2048 rows, then per query a gradient and a forward pass over the training
            set). See mirrorinf/engine/anchored.py and curvature.py for the derivations.
        steps: plain mode: optimizer steps of the update. None = automatic: 1 for pairwise and
            self-influence; for group influence 50 Adam steps of lr 0.01*rms(theta) (a real fit
            of the set). Anchored mode: the size of the Lanczos basis (Hessian-vector
            products), fixed; None = automatic: grown until the part of a gradient outside the
            basis has curvature below a quarter of the damping (convex: within 25% of the
            flattest direction found), at most min(P, 300, 2^26 / P) vectors.
        lr: plain mode's step size. None = automatic: a normalised step of length
            ``rel_step * ||theta||`` per query (any gradient norm rises above float precision),
            scores per unit learning rate. A number = that lr, scores as raw loss drops.
            Anchored mode takes no steps: lr must be null there (use ``damping``).
        rel_step: length of the automatic plain step relative to the parameter norm; in
            anchored mode, the length of the finite-difference move along the mirror direction.
        optimizer: "sgd" (first-order equal to TracIn at the final checkpoint) or "adam"
            (the released code's choice; sign-like first step).
        direction: "descent" fits the query; "ascent" unlearns it. Signs are flipped for ascent
            so that positive always means proponent.
        score: "signed" or "abs" (|delta|, as the released leakage code ranks).
        weight_decay: the L2 coefficient the model was trained with (anchored mode's objective:
            mean training loss + weight_decay/2 ||theta - theta0||^2).
        anchor_eps: anchored mode: weight w of the query. The mirror point is theta - w F(H) g_q
            (first order in w) and scores are loss drops per unit of w. None (default) = the
            first-order limit, measured with a move of rel_step * ||theta||.
        damping: anchored mode: delta in F(H) = (|H| + delta)^-1. None (default) = automatic: 0
            when the Hessian is positive definite (convex models: the L2 term damps), else
            4 * tr(H) / P (4 x the mean eigenvalue: on a plateau with 8 over 12 held-out cases, see
            mirrorinf/engine/curvature.py). Ignored in plain mode.
        bn_update: let BatchNorm running statistics move during the update (scoring is always in
            eval mode). Default False: the scores then depend on the weights alone.
        sphere: optional perturbation of already-fit queries (SphereConfig); None = off.
        query_batch: queries scored together (one parameter set each).
        train_batch: rows per forward pass (training examples x queries in a chunk).
            None = 8192 on a CPU, 131072 on a GPU (where launch overhead dominates).
        precision: dtype of the updates and forward passes. "auto" = float32 in plain mode and
            float64 in anchored mode (its finite differences over a move of 1e-4 ||theta|| would
            keep only ~3 digits in float32). Loss differences are always float64.
        fast_path: "auto" uses the exact low-rank rewrite of SGD updates of Linear layers when
            the model allows it, and for self-influence of other models linear/conv layers as
            per-example factors (each verified against the generic path on the first batch);
            "off" always uses the generic path.
        autocast: run forward passes in "bf16" or "fp16" autocast (GPU speed); "off" (default)
            keeps ``precision``. Loss differences stay float64, and the automatic plain step is
            at least 1e-2 (bf16) / 2e-3 (fp16) of ||theta||, because a smaller step is below the
            format's resolution and every difference would be zero. Columns that still vanish
            are recomputed without autocast in float64 (report.upcast).
        compile: torch.compile the batched forward of the generic path (the hot loop over the
            training set). Pays a compile (seconds to a minute) once per engine; helps on GPUs
            where small models are launch-bound, not on CPUs (measured slower there).
        seed: seeds the sphere perturbation and the curvature estimate (anchored mode's Lanczos
            start and probes).
    """

    mode: str = "plain"
    steps: int | None = None
    lr: float | None = None
    rel_step: float = 1e-4
    optimizer: str = "sgd"
    direction: str = "descent"
    score: str = "signed"
    weight_decay: float = 0.0
    anchor_eps: float | None = None
    damping: float | None = None
    bn_update: bool = False
    sphere: SphereConfig | None = None
    query_batch: int = 32
    train_batch: int | None = None
    precision: str = "auto"
    fast_path: str = "auto"
    autocast: str = "off"
    compile: bool = False
    seed: int = 0

    _NESTED: ClassVar[dict[str, type[Any]]] = {"sphere": SphereConfig}

    def __post_init__(self) -> None:
        autocast: object = self.autocast
        if autocast is False or autocast is None:  # YAML reads a bare `off` as false
            object.__setattr__(self, "autocast", "off")
        for name, allowed in _CHOICES.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(
                    f"ForwardInfConfig.{name} must be one of {', '.join(map(repr, allowed))}, "
                    f"got {value!r}"
                )
        _positive("steps", self.steps, allow_none=True, integer=True)
        _positive("lr", self.lr, allow_none=True)
        _positive("rel_step", self.rel_step)
        _positive("anchor_eps", self.anchor_eps, allow_none=True)
        if self.damping is not None and (
            isinstance(self.damping, bool)
            or not isinstance(self.damping, (int, float))
            or not self.damping >= 0
        ):
            raise ValueError(
                f"ForwardInfConfig.damping must be a number >= 0 or null (automatic), "
                f"got {self.damping!r}"
            )
        if self.mode == "anchored" and self.lr is not None:
            raise ValueError(
                f"ForwardInfConfig.lr={self.lr!r} has no meaning in anchored mode (it solves "
                "with a Lanczos basis, it takes no steps); set lr: null, and damping (or steps: "
                "the basis size) to change how it solves"
            )
        _positive("query_batch", self.query_batch, integer=True)
        _positive("train_batch", self.train_batch, allow_none=True, integer=True)
        if not isinstance(self.compile, bool):
            raise ValueError(
                f"ForwardInfConfig.compile must be true or false, got {self.compile!r}"
            )
        if isinstance(self.weight_decay, bool) or not isinstance(self.weight_decay, (int, float)):
            raise ValueError(
                f"ForwardInfConfig.weight_decay must be a number, got {self.weight_decay!r}"
            )
        if self.weight_decay < 0:
            raise ValueError(
                f"ForwardInfConfig.weight_decay must be >= 0, got {self.weight_decay!r}"
            )
        if not isinstance(self.bn_update, bool):
            raise ValueError(
                f"ForwardInfConfig.bn_update must be true or false, got {self.bn_update!r}"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"ForwardInfConfig.seed must be an integer, got {self.seed!r}")
        if isinstance(self.sphere, dict):
            object.__setattr__(self, "sphere", _build(SphereConfig, self.sphere, "sphere."))
        elif self.sphere is not None and not isinstance(self.sphere, SphereConfig):
            raise ValueError(
                f"ForwardInfConfig.sphere must be a mapping of radius, growth, loss_floor, "
                f"max_tries or null, got {self.sphere!r}"
            )

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> ForwardInfConfig:
        """Build from a plain mapping (parsed JSON/YAML); unknown keys are a ValueError."""
        return _build(cls, data or {}, "")

    def to_dict(self) -> dict[str, Any]:
        """Plain mapping that ``from_dict`` turns back into an equal config."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def fingerprint(self) -> str:
        """Short stable hash of the config, used to key caches and resumable results."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    def replace(self, **changes: Any) -> ForwardInfConfig:
        return dataclasses.replace(self, **changes)


def _build(cls: type[_T], data: Any, prefix: str) -> _T:
    if not isinstance(data, dict):
        raise ValueError(
            f"ForwardInfConfig{'.' + prefix.rstrip('.') if prefix else ''} must be a "
            f"mapping, got {type(data).__name__}"
        )
    known = {f.name for f in dataclasses.fields(cast(Any, cls))}
    unknown = sorted(set(data) - known)
    if unknown:
        close = [difflib.get_close_matches(u, known, n=1) for u in unknown]
        hint = "".join(f"; did you mean {prefix + c[0]!r}?" for c in close if c)
        raise ValueError(
            f"unknown ForwardInfConfig field(s) {', '.join(prefix + u for u in unknown)}{hint} "
            f"(allowed: {', '.join(sorted(prefix + k for k in known))})"
        )
    kwargs = dict(data)
    for key, sub in getattr(cls, "_NESTED", {}).items():
        if isinstance(kwargs.get(key), dict):
            kwargs[key] = _build(sub, kwargs[key], prefix + key + ".")
    return cls(**kwargs)


__all__ = ["ForwardInfConfig", "SphereConfig"]
