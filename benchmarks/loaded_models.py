"""Models as the pipeline loads them: pairwise and self-influence time ratios, nn.Module vs pt2.

For an MLP, a CNN with BatchNorm, a transformer encoder, a depthwise-separable CNN, a Conv1d
text model, GRU and LSTM token classifiers and a causal LM whose head is tied to its token
embedding, each both as the nn.Module
and as
logged with mlflow.pytorch.log_model (pt2, MLflow 3's default) to a temporary SQLite store and
loaded back through mirrorinf.tasks.model.load_model_uri, as the flow does. Ratios as in
throughput.py: pairwise time / the bare limit (m inference-mode forward passes over N at the
better of two batch sizes); self-influence time / one forward+backward pass over N.
Targets: self-influence <= 3x one forward+backward; pairwise near the bare limit.

Run: python benchmarks/loaded_models.py [--scale 1.0] [--queries 8] [--threads 1]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.throughput import best_of, fwd_bwd
from mirrorinf import ForwardInf


class Encoder(nn.Module):
    """A small transformer encoder classifier over real-valued token features."""

    def __init__(self, d_in: int = 16, d: int = 64, layers: int = 2, n_cls: int = 10) -> None:
        super().__init__()
        self.emb = nn.Linear(d_in, d)
        layer = nn.TransformerEncoderLayer(d, 4, 2 * d, dropout=0.1, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, n_cls)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(self.emb(x)).mean(dim=1))


class TextCnn(nn.Module):
    """A Conv1d text classifier: token embedding, two Conv1d layers, max over time."""

    def __init__(self, vocab: int = 1000, d: int = 32, ch: int = 64, n_cls: int = 10) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.c1 = nn.Conv1d(d, ch, 5, padding=2)
        self.c2 = nn.Conv1d(ch, ch, 3, padding=1)
        self.head = nn.Linear(ch, n_cls)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.c1(self.emb(x).transpose(1, 2)))
        return self.head(torch.relu(self.c2(h)).amax(dim=2))


class TiedLm(nn.Module):
    """A small causal language model whose head shares the token embedding (GPT-2's
    ``lm_head.weight is wte.weight``): token and position embeddings, causal transformer
    layers, next-token logits of the last position."""

    def __init__(self, vocab: int = 8000, d: int = 64, layers: int = 2, ctx: int = 16) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(ctx, d)
        layer = nn.TransformerEncoderLayer(d, 4, 2 * d, dropout=0.1, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.tok.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[1]
        h = self.tok(x) + self.pos(torch.arange(n, device=x.device))
        causal = torch.full((n, n), float("-inf"), device=x.device).triu(1)
        return self.head(self.enc(h, mask=causal, is_causal=True)[:, -1])


class Recurrent(nn.Module):
    """A token classifier: embedding, a one-layer GRU or LSTM, the last step's state, a head."""

    def __init__(self, kind: str, vocab: int = 1000, d: int = 32, h: int = 64) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.rnn = {"gru": nn.GRU, "lstm": nn.LSTM}[kind](d, h, batch_first=True)
        self.head = nn.Linear(h, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(self.emb(x))[0][:, -1])


def cases(scale: float) -> list[tuple[str, nn.Module, tuple[int, ...], int]]:
    """(name, model in eval mode, input shape of one row (negative: token ids below -v), N)."""
    torch.manual_seed(0)
    mlp = nn.Sequential(
        nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    )
    cnn = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 10),
    )  # fmt: skip
    cnn.train()
    dw = nn.Sequential(  # MobileNet-style: depthwise 3x3 then pointwise 1x1, with BatchNorm
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 10),
    )  # fmt: skip
    for m in (cnn, dw):
        m.train()
        with torch.no_grad():
            m(torch.randn(256, 3, 16, 16))  # BatchNorm statistics that are not 0/1
    return [
        ("MLP 64-256-256-10", mlp.eval(), (64,), int(20000 * scale)),
        ("CNN 2 conv+BN, 3x16x16", cnn.eval(), (3, 16, 16), int(4000 * scale)),
        ("transformer 2x(d64, 4 heads), 16 tokens", Encoder().eval(), (16, 16), int(4000 * scale)),
        ("depthwise CNN 5 conv+BN, 3x16x16", dw.eval(), (3, 16, 16), int(4000 * scale)),
        ("Conv1d text, 1000 vocab, 32 tokens", TextCnn().eval(), (-1000, 32), int(4000 * scale)),
        (
            "Conv1d text, 30k vocab x 128, 32 tokens",
            TextCnn(30000, 128).eval(),
            (-30000, 32),
            int(1000 * scale),
        ),
        ("GRU 64, 1000 vocab, 16 tokens", Recurrent("gru").eval(), (-1000, 16), int(4000 * scale)),
        (
            "LSTM 64, 1000 vocab, 16 tokens",
            Recurrent("lstm").eval(),
            (-1000, 16),
            int(4000 * scale),
        ),
        (
            "tied-head LM 2x(d64, 4 heads), 8k vocab, 16 tokens",
            TiedLm().eval(),
            (-8000, 16),
            int(2000 * scale),
        ),
    ]


def log_and_load(name: str, model: nn.Module, example: torch.Tensor, root: str) -> nn.Module:
    """Log ``model`` with mlflow.pytorch (pt2) to a SQLite store in ``root``; load it back."""
    import mlflow
    import mlflow.pytorch

    from mirrorinf.tasks.model import load_model_uri

    uri = f"sqlite:///{root}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    exp = mlflow.get_experiment_by_name("bench") or mlflow.get_experiment(
        mlflow.create_experiment("bench", artifact_location=f"{root}/artifacts")
    )
    reg = "m" + str(abs(hash(name)) % 10**8)
    with mlflow.start_run(experiment_id=exp.experiment_id):
        mlflow.pytorch.log_model(
            model, name="m", registered_model_name=reg, input_example=example.numpy(),
            pip_requirements=["torch"],
        )  # fmt: skip
    loaded, _ = load_model_uri(f"models:/{reg}/1", tracking_uri=uri)
    return loaded


def bare(model: nn.Module, x: torch.Tensor, m: int, repeats: int) -> float:
    """m inference-mode forward passes over x, at the better of two batch sizes."""
    best = float("inf")
    for bs in (256, 2048):

        def run(bs: int = bs) -> None:
            with torch.inference_mode():
                for _ in range(m):
                    for s in range(0, len(x), bs):
                        model(x[s : s + bs])

        run()
        best = min(best, best_of(run, repeats, torch.device("cpu")))
    return best


def measure(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, m: int, repeats: int, pairwise: bool
) -> dict:
    """Times and ratios of one model (CPU); ``pairwise`` False: self-influence only."""
    cpu = torch.device("cpu")
    xq, yq = x[:m], y[:m]
    t_bare = bare(model, x, m, repeats) if pairwise else float("nan")
    t_fb = fwd_bwd(model, x, y, cpu, repeats)
    fi = ForwardInf(model, device="cpu")
    t_pw, path_pw = float("nan"), "-"
    if pairwise:
        fi.pairwise((x, y), (xq[:1], yq[:1]))  # warm-up + base-loss cache, as in a real run
        t_pw = best_of(lambda: fi.pairwise((x, y), (xq, yq)), repeats, cpu)
        path_pw = fi.last_report.path
    t_self = best_of(lambda: fi.self_influence((x, y)), repeats, cpu)
    return {
        "bare": t_bare,
        "fb": t_fb,
        "pairwise": t_pw,
        "self": t_self,
        "path": f"{path_pw}/{fi.last_report.path}",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=float, default=1.0, help="multiplies every N")
    ap.add_argument("--queries", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", default="", help="only models whose name contains this")
    ap.add_argument("--modules-only", action="store_true", help="skip the pt2 round trip")
    ap.add_argument("--self-only", action="store_true", help="skip pairwise and its bare limit")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("mlflow").setLevel(logging.ERROR)
    print(
        f"# loaded models: CPU, torch {torch.__version__}, {args.threads} thread(s), "
        f"m={args.queries} queries"
    )
    rows = []
    with tempfile.TemporaryDirectory() as root:
        for name, model, shape, n in cases(args.scale):
            if args.only not in name:
                continue
            g = torch.Generator().manual_seed(0)
            if shape[0] < 0:  # token ids
                x = torch.randint(0, -shape[0], (n, *shape[1:]), generator=g)
            else:
                x = torch.randn(n, *shape, generator=g)
            y = torch.randint(0, 10, (n,), generator=g)
            kinds = [("nn.Module", model)]
            if not args.modules_only:
                kinds.append(("pt2 (load_model_uri)", log_and_load(name, model, x[:2], root)))
            for how, mod in kinds:
                t0 = time.perf_counter()
                r = measure(mod, x, y, args.queries, args.repeats, not args.self_only)
                rows.append((name, how, n, r))
                print(f"  {name} as {how}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    print(
        "\n| model | as | N | path (pairwise/self) | bare limit | pairwise | ratio "
        "| fwd+bwd | self-influence | ratio |\n|---|---|---:|---|---:|---:|---:|---:|---:|---:|"
    )
    for name, how, n, r in rows:
        print(
            f"| {name} | {how} | {n:,} | {r['path']} | {r['bare']:.3f} s | {r['pairwise']:.3f} s "
            f"| **{r['pairwise'] / r['bare']:.2f}x** | {r['fb']:.3f} s | {r['self']:.3f} s "
            f"| **{r['self'] / r['fb']:.2f}x** |"
        )
    worst = max(r["self"] / r["fb"] for *_, r in rows)
    pw = [round(r["pairwise"] / r["bare"], 2) for *_, r in rows]
    verdict = "PASS" if worst <= 3 else "FAIL"
    print(f"\nself-influence <= 3x fwd+bwd: {verdict} (worst {worst:.2f}x); pairwise ratios {pw}")


if __name__ == "__main__":
    main()
