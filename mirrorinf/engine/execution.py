"""How work is executed: batch sizes, out-of-memory retry, progress bars and the typed cache."""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Generic, TypeVar

import torch

from mirrorinf.engine.examples import Examples, Inputs, parts
from mirrorinf.errors import ResourceError

if TYPE_CHECKING:
    from mirrorinf.engine.curvature import KrylovBasis

log = logging.getLogger(__name__)

T = TypeVar("T")
K = TypeVar("K")
V = TypeVar("V")
Params = dict[str, torch.Tensor]
Key = tuple[object, ...]

STACK_BUDGET = 2**26  # floats held by stacked per-example parameter sets at once (256 MB fp32)
# rows per self-influence chunk on a CPU: its activations, gradients and factors then stay near
# the caches (measured, 1 thread: MLP 2.1x/1.6x one forward+backward at 1,024 rows vs 3.0-3.2x
# at 8,192; CNN 1.9x vs 3.0-3.2x; transformer 1.2-1.75x vs 1.4-2.0x)
SELF_CPU_ROWS = 1024


@dataclass
class BatchPlan:
    """Rows per forward pass and queries per chunk; both halve after an out-of-memory error."""

    train_batch: int
    query_batch: int

    def rows_per_copy(self, k: int) -> int:
        """Training rows per forward when k parameter copies share it: k*rows ~ train_batch."""
        return max(min(64, self.train_batch), self.train_batch // max(1, k))

    def query_chunk(self, numel: int) -> int:
        """Queries updated together: at most STACK_BUDGET stacked parameters."""
        return max(1, min(self.query_batch, STACK_BUDGET // max(1, numel)))

    def self_chunk(self, numel: int, stacked: bool, cpu: bool = False) -> int:
        """Training rows per self-influence chunk (``stacked``: one parameter copy per row;
        ``cpu``: at most SELF_CPU_ROWS)."""
        cap = STACK_BUDGET // max(1, numel) if stacked else self.train_batch
        return max(1, min(self.train_batch, cap, SELF_CPU_ROWS if cpu else cap))

    def sizes(self) -> dict[str, int]:
        """Current sizes (after any halving), for engines derived from this one."""
        return {"train_batch": self.train_batch, "query_batch": self.query_batch}

    def halve(self, err: BaseException, device: torch.device) -> None:
        """Halve both sizes; a ResourceError once both are 1."""
        if self.train_batch <= 1 and self.query_batch <= 1:
            raise ResourceError(
                f"out of memory on {device} even with train_batch=1 and query_batch=1: "
                "the model does not fit with its copies; use a device with more memory or "
                f"device: cpu ({str(err).splitlines()[0]})"
            ) from None
        self.train_batch = max(1, self.train_batch // 2)
        self.query_batch = max(1, self.query_batch // 2)
        log.warning(
            "out of memory on %s; retrying with train_batch=%d, query_batch=%d",
            device,
            self.train_batch,
            self.query_batch,
        )


def retry_on_oom(call: Callable[[], T], shrink: Callable[[BaseException], None]) -> T:
    """Run ``call``; after an out-of-memory error (any device torch reports it for), ``shrink``
    the batches and run it again, until it fits or ``shrink`` gives up (it raises)."""
    while True:
        try:
            return call()
        except torch.OutOfMemoryError as err:
            shrink(err)


class Memo(Generic[K, V]):
    """One remembered value and its key: a new key replaces the old entry."""

    def __init__(self) -> None:
        self._entry: tuple[K, V] | None = None

    def peek(self, key: K) -> V | None:
        if self._entry is not None and self._entry[0] == key:
            return self._entry[1]
        return None

    def put(self, key: K, value: V) -> V:
        self._entry = (key, value)
        return value

    def get(self, key: K, compute: Callable[[], V]) -> V:
        """The value for ``key``, computed after the old entry is dropped (frees its memory)."""
        found = self.peek(key)
        if found is not None:
            return found
        self._entry = None
        return self.put(key, compute())

    def clear(self) -> None:
        self._entry = None


@dataclass
class Cache:
    """What an engine remembers between calls, each entry keyed by model state and data."""

    resident: Memo[Key, tuple[Inputs, torch.Tensor]] = field(default_factory=Memo)
    base_losses: Memo[Key, torch.Tensor] = field(default_factory=Memo)
    curvature: Memo[Key, KrylovBasis] = field(default_factory=Memo)  # anchored mode's basis

    def clear(self) -> None:
        for memo in (self.resident, self.base_losses, self.curvature):
            memo.clear()


class _Same:
    """A cache-key part equal only to a wrapper of the very same object. It holds the object,
    so a freed tensor's id() cannot be reused by new data while the cache entry lives."""

    __slots__ = ("obj",)

    def __init__(self, obj: object) -> None:
        self.obj = obj

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Same) and other.obj is self.obj

    def __hash__(self) -> int:
        return id(self.obj)


def data_key(ex: Examples) -> Key:
    """Identity of a data set for the cache (the caller's tensors, or the Dataset or reader
    object)."""
    if ex.key is not None:
        return ex.key
    if ex.x is not None and ex.y is not None:
        xs = parts(ex.x)
        return (
            *((_Same(v), v._version, tuple(v.shape)) for v in xs),
            _Same(ex.y),
            ex.y._version,
        )
    if ex.reader is not None:
        return (_Same(ex.reader), ex.n)
    return (_Same(ex.dataset), ex.n)


def progress(it: Iterable[T], total: int, step: int, desc: str = "mirrorinf") -> Iterable[T]:
    """Progress bar (per query chunk / training batch) on long work, on a terminal only.

    Quiet when stderr is not a terminal (CI, pipes, pytest) or when the engine's logger is set
    above WARNING.
    """
    if total // max(1, step) < 8 or not log.isEnabledFor(logging.WARNING):
        return it
    if not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty()):
        return it
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return it
    bar: Iterator[T] = iter(
        tqdm(it, total=math.ceil(total / step), desc=desc, leave=False, file=sys.stderr)
    )
    return bar
