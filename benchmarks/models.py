"""Pairwise scoring vs the bare forward limit on larger architectures (for the GPU run).

A ResNet-18-size CNN (BasicBlocks [2, 2, 2, 2], widths 64-512, 32x32 inputs, 11M parameters)
and a small transformer encoder classifier (4 layers, d=256, 64 tokens), on synthetic data.
The bare limit is m inference-mode forward passes over N at the best of a few batch sizes;
TFLOP/s counts forward FLOPs (torch.utils.flop_counter) of the m passes over N.

Variants (--variants): fp32 (default engine), bf16 (autocast="bf16": its own bare limit is the
bf16-autocast forward), compile (compile=True; first call compiles, the timed call reuses it).
"Spearman" is the mean per-query rank agreement of the variant's scores with fp32's.

Run: python benchmarks/models.py [--model cnn|transformer|all] [--n 8192] [--queries 8]
     [--variants fp32,bf16,compile]
"""

from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from mirrorinf import ForwardInf
from mirrorinf.metrics import spearman


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.skip = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.b1(self.c1(x)))
        return torch.relu(self.b2(self.c2(h)) + self.skip(x))


def resnet18(n_cls: int = 10) -> nn.Module:
    layers: list[nn.Module] = [nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU()]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [Block(cin, cout, stride), Block(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, n_cls)]
    return nn.Sequential(*layers)


class Encoder(nn.Module):
    def __init__(self, vocab: int = 1000, d: int = 256, n_cls: int = 10) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 4, enable_nested_tensor=False)
        self.head = nn.Linear(d, n_cls)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(self.emb(x)).mean(dim=1))


def data(kind: str, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = (
        torch.randn(n, 3, 32, 32, generator=g)
        if kind == "cnn"
        else torch.randint(0, 1000, (n, 64), generator=g)
    )
    return x, torch.randint(0, 10, (n,), generator=g)


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def bare_limit(
    model: nn.Module, xd: torch.Tensor, m: int, device: torch.device, autocast: bool
) -> float:
    """Best time of m inference forward passes over xd, over a few batch sizes."""
    best = float("inf")
    for bs in (256, 1024, 4096):

        def run(bs: int = bs) -> None:
            with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16,
                                                        enabled=autocast):  # fmt: skip
                for _ in range(m):
                    for s in range(0, len(xd), bs):
                        model(xd[s : s + bs])

        run()
        best = min(best, timed(run, device))
    return best


def mean_spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(np.nanmean(spearman(a.double().numpy(), b.double().numpy())))


def bench(kind: str, n: int, m: int, device: torch.device, variants: list[str]) -> None:
    torch.manual_seed(0)
    model = (resnet18() if kind == "cnn" else Encoder()).eval()
    x, y = data(kind, n, 0)
    xq, yq = data(kind, m, 1)
    dev_model = copy.deepcopy(model).to(device)
    xd = x.to(device)
    counter = copy.deepcopy(dev_model).train()  # train mode: no fused fast path
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        counter(xd[:8])
    flops = fc.get_total_flops() / 8 * n * m
    params = sum(p.numel() for p in model.parameters()) / 1e6
    ref = None
    for variant in variants:
        cfg: dict[str, object] = {"train_batch": 4096}
        if variant == "bf16":
            cfg["autocast"] = "bf16"
        elif variant == "compile":
            cfg["compile"] = True
        best = bare_limit(dev_model, xd, m, device, autocast=variant == "bf16")
        fi = ForwardInf(model, cfg, device=device)
        fi.pairwise((x, y), (xq[:1], yq[:1]))  # warm-up: base losses cached, compiled
        out: list[torch.Tensor] = []
        t = timed(lambda fi=fi, out=out: out.append(fi.pairwise((x, y), (xq, yq))), device)
        ref = out[0] if ref is None else ref
        rho = mean_spearman(out[0], ref)
        print(
            f"| {kind} ({params:.1f}M params) | {variant} | {n} | {m} | {best:.3f} | {t:.3f} | "
            f"{t / best:.2f} | {flops / best / 1e12:.1f} | {flops / t / 1e12:.1f} | "
            f"{fi.last_report.path} | {rho:.3f} |",
            flush=True,
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="all", choices=["cnn", "transformer", "all"])
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--queries", type=int, default=8)
    ap.add_argument("--device", default="auto")
    ap.add_argument(
        "--variants",
        default="fp32,bf16,compile",
        help="comma-separated: fp32 (first: the reference), bf16, compile",
    )
    args = ap.parse_args()
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    print(f"# models: device={device}")
    print(
        "| model | variant | N | m | bare limit (s) | pairwise (s) | ratio | bare TFLOP/s | "
        "pairwise TFLOP/s | path | Spearman vs fp32 |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|"
    )
    for kind in ["cnn", "transformer"] if args.model == "all" else [args.model]:
        bench(kind, args.n, args.queries, device, args.variants.split(","))


if __name__ == "__main__":
    main()
