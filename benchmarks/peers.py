"""Side-by-side benchmark: mirrorinf (plain, anchored) against installed attribution peers.

Same model, same training data, same queries, one run. Peers (each optional):

- captum ``TracInCP`` (exact TracIn at the final checkpoint, all layers),
- TRAK (``traker``; one model, its CPU ``BasicProjector``, normal projection, ``--trak-dim``
  128: better than 256 and 512 at 1000 training points; TRAK is meant for model ensembles),
- dattri ``TracInAttributor`` (its default random projection to 512 dims) and dattri
  ``IFAttributorCG`` (influence function by conjugate gradients, 10 iterations, damping
  ``--if-damping`` 0.01: the best of 1e-3 / 1e-2 / 1e-1 on the small setting; with 1e-3, the
  weight decay, CG on this indefinite Hessian sent some queries' scores the wrong way),
- Kronfluence EK-FAC (``kronfluence``).

Three settings on scikit-learn's bundled digits (no downloads):

1. ``small``: the quality benchmark's 64-128-10 ReLU MLP (about 9.6k parameters), where
   per-example gradients are cheap;
2. ``wide``: a 64-1024-10 ReLU MLP (about 77k parameters, ``--wide-hidden``), where per-example
   gradients (one vector of every parameter per training example) are the expensive part;
3. ``cnn``: a small CNN (conv 1->8 3x3, ReLU, conv 8->16 3x3, ReLU, flatten, linear 256->10,
   about 4k parameters), where the Hessian is far from a linear model's.

Per method it prints:

- LDS: linear datamodeling score (``mirrorinf.metrics.lds``) against models retrained IN this
  script on random 50% subsets (``_common.lds_subsets``, same init and recipe as the model).
- self-check: the 3 training points the model fits worst are appended as extra queries (not
  used for LDS); each one's own training copy must get a positive score near the top of its
  column. ``ok 1/1/1`` lists the ranks (``ok``: all in the top 5%); ``FAIL``: some own copy
  scored as an opponent; ``SIGN?``: all did (the orientation below would be wrong).
- time: wall seconds of the method call only (construction, fitting, scoring), in a fresh child
  process, after imports, data loading and one warm-up call on a 64-point slice (so that
  library cold starts are not counted).
- memory: peak resident set size (RSS) of that child during the call minus its RSS just before
  (Linux ``VmHWM`` after resetting it through ``/proc/self/clear_refs``; ``ru_maxrss`` if that is
  not allowed). RSS sees torch's CPU allocations, which ``tracemalloc`` does not; it also counts
  pages a tool maps from its own files (TRAK and Kronfluence write to a temporary folder).
- ratios of time and memory to mirrorinf plain (the product's default).

Orientation: every score matrix is converted to ``[n_train, n_query]`` with positive = proponent
(training on the example lowers the query's loss). captum and Kronfluence return
``[n_query, n_train]`` (transposed here); TRAK and dattri return ``[n_train, n_query]``. All
tools used here already score "positive = helpful" (gradient dot products, TRAK's margin, IF with
the ``g_train^T H^-1 g_query`` convention); the self-check verifies it on every run.

Install the peers with ``pip install -e '.[bench]'`` (captum, traker, dattri). Kronfluence
declares ``torchvision`` as a dependency (never imported), which makes pip replace the CPU torch
with a multi-GB CUDA build; install it without dependencies::

    pip install accelerate einops einconv opt_einsum safetensors
    pip install --no-deps kronfluence

Threads: every method (and the retraining) runs with ``--threads`` torch threads, default 1: on
a shared 2-core machine two OpenMP threads under load ran small-model training 10-100x slower
than one. Measure with more threads on a dedicated machine.

A missing peer gets a "not installed" row, a failing one its error; the script never stops.
The machine is shared: times and RSS are what one run saw, not a controlled measurement.

Run:  python benchmarks/peers.py [--quick] [--seed 0] [--only small|wide|cnn]
      (about 5 minutes on a shared 2-core machine with defaults, about 2 with --quick)
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import logging
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import MlpRecipe, digits_split, lds_subsets, make_mlp, query_losses, train_mlp

from mirrorinf.metrics import lds

# ---------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Setting:
    name: str
    n_train: int
    n_query: int
    hidden: int
    recipe: MlpRecipe
    n_subsets: int
    arch: str = "mlp"

    def describe(self, n_params: int) -> str:
        net = "CNN 1-8-16 conv + linear" if self.arch == "cnn" else f"MLP 64-{self.hidden}-10"
        return f"{net} ({n_params:,} parameters)"


@dataclass
class Problem:
    """What every method sees: the trained model and the data (loaded in the child process)."""

    model: nn.Sequential
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_query: torch.Tensor
    y_query: torch.Tensor
    weight_decay: float
    if_damping: float
    trak_dim: int
    workdir: Path


@dataclass
class Row:
    method: str
    lds: float = float("nan")
    self_check: str = ""
    seconds: float = float("nan")
    delta_mb: float = float("nan")
    note: str = ""
    error: str | None = None


SELF_CHECKS = 3  # training points appended as queries for the orientation check
BATCH = 250  # training-set batch size handed to the peers

# ---------------------------------------------------------------------------- the methods
# Each builder imports its tool (outside the measured region) and returns the call to measure;
# the call returns scores [n_train, n_query], positive = proponent.

Builder = Callable[[Problem], Callable[[], torch.Tensor]]


def _mirrorinf(mode: str) -> Builder:
    def build(p: Problem) -> Callable[[], torch.Tensor]:
        from mirrorinf import ForwardInf, ForwardInfConfig

        cfg = ForwardInfConfig(mode=mode, weight_decay=p.weight_decay)

        def run() -> torch.Tensor:
            fi = ForwardInf(p.model, config=cfg)
            return fi.pairwise((p.x_train, p.y_train), (p.x_query, p.y_query))  # [n, m], + = pro

        return run

    return build


def _captum(p: Problem) -> Callable[[], torch.Tensor]:
    from captum.influence import TracInCP

    def run() -> torch.Tensor:
        tracin = TracInCP(
            p.model,
            TensorDataset(p.x_train, p.y_train),
            checkpoints=["final"],  # the model already holds the final weights
            checkpoints_load_func=lambda _model, _path: 1.0,  # learning rate 1: a dot product
            loss_fn=nn.CrossEntropyLoss(reduction="sum"),
            batch_size=BATCH,
            sample_wise_grads_per_batch=True,
        )
        scores = tracin.influence((p.x_query, p.y_query))  # [m, n], grad . grad: + = proponent
        return scores.T

    return run


def _trak(p: Problem) -> Callable[[], torch.Tensor]:
    from trak import TRAKer

    def run() -> torch.Tensor:
        traker = TRAKer(
            model=p.model,
            task="image_classification",  # margin output; works for any (x, label) classifier
            train_set_size=len(p.y_train),
            save_dir=str(p.workdir / "trak"),  # a fresh folder per run
            device="cpu",  # -> BasicProjector, normal projection (no fast_jl / CUDA)
            proj_dim=p.trak_dim,
            use_half_precision=False,
            logging_level=logging.WARNING,
        )
        state = p.model.state_dict()
        traker.load_checkpoint(state, model_id=0)
        for lo in range(0, len(p.y_train), BATCH):
            batch = (p.x_train[lo : lo + BATCH], p.y_train[lo : lo + BATCH])
            traker.featurize(batch=batch, num_samples=len(batch[1]))
        traker.finalize_features()
        proj = traker.projector
        if getattr(proj, "num_blocks", 0) == 1 and not proj.proj_matrix_available:
            # finalize_features frees the matrix; a one-block BasicProjector never rebuilds it
            proj.generate_sketch_matrix(proj.generator_states[0])
        traker.start_scoring_checkpoint(
            exp_name="queries", checkpoint=state, model_id=0, num_targets=len(p.y_query)
        )
        traker.score(batch=(p.x_query, p.y_query), num_samples=len(p.y_query))
        scores = traker.finalize_scores(exp_name="queries")  # [n, m]; + = raises query margin
        return torch.as_tensor(np.asarray(scores), dtype=torch.float32)

    return run


def _dattri_task(p: Problem) -> Any:
    from dattri.task import AttributionTask

    model = p.model

    def loss(
        params: dict[str, torch.Tensor], data: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        x, y = data  # one example (vmapped) or a whole batch (Hessian products)
        logits = torch.func.functional_call(model, params, (x.reshape(-1, x.shape[-1]),))
        return F.cross_entropy(logits, y.reshape(-1))

    return AttributionTask(loss_func=loss, model=model, checkpoints=model.state_dict())


def _loaders(p: Problem) -> tuple[DataLoader, DataLoader]:
    train = DataLoader(TensorDataset(p.x_train, p.y_train), batch_size=BATCH, shuffle=False)
    query = DataLoader(
        TensorDataset(p.x_query, p.y_query), batch_size=len(p.y_query), shuffle=False
    )
    return train, query


def _dattri_tracin(p: Problem) -> Callable[[], torch.Tensor]:
    from dattri.algorithm.tracin import TracInAttributor

    def run() -> torch.Tensor:
        attributor = TracInAttributor(
            task=_dattri_task(p), weight_list=torch.ones(1), normalized_grad=False, device="cpu"
        )
        return attributor.attribute(*_loaders(p))  # [n, m], grad . grad: + = proponent

    return run


def _dattri_if_cg(p: Problem) -> Callable[[], torch.Tensor]:
    from dattri.algorithm.influence_function import IFAttributorCG

    def run() -> torch.Tensor:
        attributor = IFAttributorCG(task=_dattri_task(p), device="cpu", regularization=p.if_damping)
        train, query = _loaders(p)
        attributor.cache(train)
        return attributor.attribute(train, query)  # [n, m], g_i H^-1 g_q: + = proponent

    return run


def _kronfluence(p: Problem) -> Callable[[], torch.Tensor]:
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.task import Task

    class _Classify(Task):
        def compute_train_loss(
            self, batch: Any, model: nn.Module, sample: bool = False
        ) -> torch.Tensor:
            x, y = batch
            logits = model(x)
            if sample:  # true Fisher: labels drawn from the model
                with torch.no_grad():
                    y = torch.multinomial(torch.softmax(logits.detach(), -1), 1).flatten()
            return F.cross_entropy(logits, y, reduction="sum")

        def compute_measurement(self, batch: Any, model: nn.Module) -> torch.Tensor:
            x, y = batch
            return F.cross_entropy(model(x), y, reduction="sum")

    def run() -> torch.Tensor:
        task = _Classify()
        model = prepare_model(p.model, task)
        analyzer = Analyzer(
            "peers",
            model=model,
            task=task,
            cpu=True,
            disable_tqdm=True,
            output_dir=str(p.workdir / "kronfluence"),
            log_level=logging.WARNING,
        )
        train = TensorDataset(p.x_train, p.y_train)
        analyzer.fit_all_factors(
            "ekfac", dataset=train, per_device_batch_size=BATCH, overwrite_output_dir=True
        )
        analyzer.compute_pairwise_scores(
            "queries",
            "ekfac",
            query_dataset=TensorDataset(p.x_query, p.y_query),
            train_dataset=train,
            per_device_query_batch_size=len(p.y_query),
            per_device_train_batch_size=BATCH,
            overwrite_output_dir=True,
        )
        scores = analyzer.load_pairwise_scores("queries")["all_modules"]  # [m, n]
        return scores.T  # g_q H^-1 g_i of losses: + = proponent

    return run


@dataclass(frozen=True)
class Method:
    label: str
    package: str  # import name checked before spawning the child
    build: Builder


METHODS: dict[str, Method] = {
    "plain": Method("mirrorinf plain (default)", "mirrorinf", _mirrorinf("plain")),
    "anchored": Method("mirrorinf anchored", "mirrorinf", _mirrorinf("anchored")),
    "captum": Method("captum TracInCP", "captum", _captum),
    "trak": Method("TRAK (1 model)", "trak", _trak),
    "dattri-tracin": Method("dattri TracIn (proj 512)", "dattri", _dattri_tracin),
    "dattri-if": Method("dattri IF-CG", "dattri", _dattri_if_cg),
    "kronfluence": Method("Kronfluence EK-FAC", "kronfluence", _kronfluence),
}

# ------------------------------------------------------------------------- child process


def _status_kb(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process; False if not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def worker(method: str, workdir: Path, threads: int) -> int:
    """Child: load the problem, build the method, measure one call, write scores + stats."""
    torch.manual_seed(0)
    torch.set_num_threads(threads)
    blob = torch.load(workdir / "problem.pt", weights_only=False)
    model = make_mlp(0, hidden=blob["hidden"], arch=blob["arch"])
    model.load_state_dict(blob["state"])
    model.eval()
    p = Problem(
        model,
        blob["x_train"],
        blob["y_train"],
        blob["x_query"],
        blob["y_query"],
        blob["weight_decay"],
        blob["if_damping"],
        blob["trak_dim"],
        workdir,
    )
    build = METHODS[method].build
    # Warm-up on a 64-point slice, outside the measured region: library cold starts (lazy
    # imports, first-use kernel set-up, pages mapped on first touch) are not the method's cost.
    build(
        Problem(
            model,
            p.x_train[:64],
            p.y_train[:64],
            p.x_query[:2],
            p.y_query[:2],
            p.weight_decay,
            p.if_damping,
            min(p.trak_dim, 32),
            workdir / "warmup",
        )
    )()
    gc.collect()
    run = build(p)
    rss0 = _status_kb("VmRSS") or 0
    exact = _reset_peak() and _status_kb("VmHWM") is not None
    t0 = time.perf_counter()
    scores = run()
    seconds = time.perf_counter() - t0
    peak = (_status_kb("VmHWM") if exact else None) or resource.getrusage(
        resource.RUSAGE_SELF
    ).ru_maxrss
    scores = torch.as_tensor(scores).detach().double().cpu().numpy()
    np.save(workdir / f"{method}.npy", scores)
    stats = {
        "seconds": seconds,
        "delta_mb": max(0, peak - rss0) / 1024,
        "rss0_mb": rss0 / 1024,
        "peak_source": "VmHWM" if exact else "ru_maxrss",
    }
    print("STATS " + json.dumps(stats))
    return 0


# ------------------------------------------------------------------------- parent process


def _self_check(scores: np.ndarray, idx: np.ndarray) -> str:
    """Own-copy rank (1 = top) and sign for each training point appended as a query.

    ``ok``: every own score is positive and in the top 5% of its column; ``weak``: positive but
    lower; ``FAIL``: some own copy scored as an opponent (the method's answer for that query is
    wrong); ``SIGN?``: every own copy scored as an opponent (the orientation is wrong).
    """
    cols = scores[:, -len(idx) :]
    own = cols[idx, np.arange(len(idx))]
    ranks = [1 + int((cols[:, j] > own[j]).sum()) for j in range(len(idx))]
    if (own <= 0).all():
        verdict = "SIGN?"
    elif (own <= 0).any():
        verdict = "FAIL"
    else:
        verdict = "ok" if max(ranks) <= max(1, len(scores) // 20) else "weak"
    return f"{verdict} " + "/".join(map(str, ranks))


def _run_method(
    key: str,
    workdir: Path,
    timeout: float,
    n_query: int,
    masks: np.ndarray,
    losses: np.ndarray,
    idx: np.ndarray,
) -> Row:
    m = METHODS[key]
    row = Row(m.label)
    if importlib.util.find_spec(m.package) is None:
        row.error = f"not installed ({m.package})"
        return row
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        key,
        str(workdir),
        "--threads",
        str(torch.get_num_threads()),
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        row.error = f"timeout after {timeout:.0f}s"
        return row
    stats_line = [ln for ln in proc.stdout.splitlines() if ln.startswith("STATS ")]
    if proc.returncode != 0 or not stats_line:
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        row.error = (lines[-1] if lines else f"exit {proc.returncode}")[:160]
        return row
    stats = json.loads(stats_line[-1][6:])
    row.seconds, row.delta_mb = stats["seconds"], stats["delta_mb"]
    row.note = f"RSS before {stats['rss0_mb']:.0f} MB" + (
        "" if stats["peak_source"] == "VmHWM" else " (peak from ru_maxrss: an upper bound)"
    )
    scores = np.load(workdir / f"{key}.npy")
    if scores.shape != (len(masks[0]), n_query + len(idx)):
        row.error = f"unexpected score shape {scores.shape}"
        return row
    if not np.isfinite(scores).all():
        row.error = f"{int((~np.isfinite(scores)).sum())} non-finite scores"
        return row
    row.lds = lds(scores[:, :n_query], masks, losses)
    row.self_check = _self_check(scores, idx)
    return row


def _ratio(a: float, b: float) -> str:
    if np.isnan(a) or np.isnan(b) or b <= 0:
        return ""
    return f"{a / b:.2f}x"


def _print_table(title: str, rows: list[Row]) -> None:
    base = next((r for r in rows if r.method.startswith("mirrorinf plain") and not r.error), None)
    bt = base.seconds if base else float("nan")
    bm = max(base.delta_mb, 1.0) if base else float("nan")  # < 1 MB reads as 1 MB
    print(f"\n### {title}\n")
    print(
        "| method | LDS | self-check (ranks) | time (s) | time / plain | peak RSS delta (MB) "
        "| memory / plain | note |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---|")
    for r in rows:
        if r.error:
            print(f"| {r.method} | | | | | | | {r.error} |")
            continue
        print(
            f"| {r.method} | {r.lds:.3f} | {r.self_check} | {r.seconds:.2f} | "
            f"{_ratio(r.seconds, bt)} | {r.delta_mb:.1f} | {_ratio(max(r.delta_mb, 1.0), bm)} "
            f"| {r.note} |"
        )


def run_setting(st: Setting, args: argparse.Namespace, methods: list[str]) -> list[Row]:
    sp = digits_split(st.n_train, st.n_query, seed=args.seed, dtype=torch.float32)
    t0 = time.perf_counter()
    model = train_mlp(
        sp.x_train,
        sp.y_train,
        init_seed=args.seed,
        recipe=st.recipe,
        hidden=st.hidden,
        arch=st.arch,
    )
    t_train = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    acc = float((model(sp.x_query).argmax(1) == sp.y_query).float().mean())
    masks, losses, t_sub = lds_subsets(
        sp.x_train,
        sp.y_train,
        sp.x_query,
        sp.y_query,
        st.n_subsets,
        frac=0.5,
        seed=args.seed + 1,
        init_seed=args.seed,
        recipe=st.recipe,
        hidden=st.hidden,
        arch=st.arch,
    )
    # self-check queries: the training points the model fits worst (large gradients, so their
    # own copy should be a clear top proponent for every method)
    idx = query_losses(model, sp.x_train, sp.y_train).argsort(descending=True)[:SELF_CHECKS]
    idx = idx.numpy()
    print(
        f"\n[{st.name}] {st.describe(n_params)}, {st.n_train} train / "
        f"{st.n_query} queries (+{SELF_CHECKS} training points as self-check queries), "
        f"{st.recipe}: trained in {t_train:.1f}s (grad norm {model.grad_norm:.1e}, query acc "
        f"{acc:.3f}); {st.n_subsets} retrains on 50% subsets in {t_sub:.1f}s",
        flush=True,
    )
    rows = []
    with tempfile.TemporaryDirectory(prefix="mirrorinf-peers-") as tmp:
        workdir = Path(tmp)
        torch.save(
            {
                "state": model.state_dict(),
                "hidden": st.hidden,
                "arch": st.arch,
                "x_train": sp.x_train,
                "y_train": sp.y_train,
                "x_query": torch.cat([sp.x_query, sp.x_train[idx]]),
                "y_query": torch.cat([sp.y_query, sp.y_train[idx]]),
                "weight_decay": st.recipe.weight_decay,
                "if_damping": args.if_damping,
                "trak_dim": args.trak_dim,
            },
            workdir / "problem.pt",
        )
        for key in methods:
            row = _run_method(key, workdir, args.timeout, st.n_query, masks, losses, idx)
            if key == "trak":
                row.method = f"TRAK (1 model, proj {args.trak_dim})"
            print(
                f"  {row.method}: "
                + (
                    row.error
                    or f"LDS {row.lds:.3f}, {row.seconds:.2f}s, "
                    f"+{row.delta_mb:.0f} MB, self {row.self_check}"
                ),
                flush=True,
            )
            rows.append(row)
    _print_table(
        f"{st.name}: {st.describe(n_params)}, {st.n_train} "
        f"train, {st.n_query} queries, LDS over {st.n_subsets} half-subsets",
        rows,
    )
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes (about 2 minutes)")
    ap.add_argument("--seed", type=int, default=0, help="data split, init and subset seed")
    ap.add_argument("--only", choices=["small", "wide", "cnn"], help="run one setting")
    ap.add_argument(
        "--methods",
        default=",".join(METHODS),
        help=f"comma-separated subset of {','.join(METHODS)}",
    )
    ap.add_argument("--n-train", type=int, help="training points (both settings)")
    ap.add_argument("--n-query", type=int, help="held-out queries (both settings)")
    ap.add_argument("--subsets", type=int, help="LDS retrains (both settings)")
    ap.add_argument("--wide-hidden", type=int, help="hidden width of the wide setting")
    ap.add_argument(
        "--trak-dim",
        type=int,
        default=128,
        help="TRAK projection dimension (128 beat 256 and 512 at 1000 train)",
    )
    ap.add_argument(
        "--if-damping",
        type=float,
        default=1e-2,
        help="dattri IF-CG Hessian damping (best of 1e-3, 1e-2, 1e-1 on the small setting)",
    )
    ap.add_argument("--timeout", type=float, default=400.0, help="seconds per method")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads everywhere (parent and every method's child)",
    )
    ap.add_argument("--worker", nargs=2, metavar=("METHOD", "DIR"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.worker:
        return worker(args.worker[0], Path(args.worker[1]), args.threads)
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        ap.error(f"unknown methods {unknown}; choose from {list(METHODS)}")
    q = args.quick
    n_train = args.n_train or (500 if q else 1000)
    n_query = args.n_query or (10 if q else 50)
    small = Setting(
        "small",
        n_train,
        n_query,
        128,
        MlpRecipe(weight_decay=1e-3, lr=1e-2, steps=500),
        args.subsets or (15 if q else 50),
    )
    wide = Setting(
        "wide",
        n_train,
        n_query,
        args.wide_hidden or (512 if q else 1024),
        MlpRecipe(weight_decay=1e-3, lr=1e-2, steps=200),
        args.subsets or (10 if q else 40),
    )
    cnn = Setting(
        "cnn",
        n_train,
        n_query,
        0,
        MlpRecipe(weight_decay=1e-3, lr=1e-2, steps=500),
        args.subsets or (15 if q else 50),
        arch="cnn",
    )
    print(
        f"# mirrorinf vs peers (digits, seed={args.seed}, {'quick' if q else 'full'}, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads)"
    )
    t0 = time.perf_counter()
    for st in (small, wide, cnn):
        if args.only in (None, st.name):
            run_setting(st, args, methods)
    print(f"\ntotal wall time {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
