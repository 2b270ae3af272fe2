"""CUDA path: same scores as on the CPU, results on the CPU, the caller's model left in place."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mirrorinf import ForwardInf, ForwardInfConfig

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    x = torch.randn(3000, 32)
    y = (x @ torch.randn(32, 5)).argmax(1)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 5))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(200):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model, x, y


@pytest.mark.parametrize("fast_path", ["auto", "off"])
def test_cuda_matches_cpu(setup, fast_path):
    model, x, y = setup
    cfg = ForwardInfConfig(fast_path=fast_path, precision="float64")
    gpu = ForwardInf(model, cfg, device="auto")
    assert gpu.device.type == "cuda"
    s_gpu = gpu.pairwise((x, y), (x[:8], y[:8]))
    s_cpu = ForwardInf(model, cfg, device="cpu").pairwise((x, y), (x[:8], y[:8]))
    assert s_gpu.device.type == "cpu"
    assert torch.allclose(s_gpu, s_cpu, rtol=1e-4, atol=1e-6 * float(s_cpu.abs().max()))
    assert next(model.parameters()).device.type == "cpu"


def test_cuda_float32_self_and_group(setup):
    model, x, y = setup
    fi = ForwardInf(model, device="cuda")
    si = fi.self_influence((x, y))
    g = fi.group((x, y), (x[:100], y[:100]))
    ref = ForwardInf(model, device="cpu")
    assert torch.corrcoef(torch.stack([si, ref.self_influence((x, y))]))[0, 1] > 0.999
    assert torch.corrcoef(torch.stack([g, ref.group((x, y), (x[:100], y[:100]))]))[0, 1] > 0.999
    assert fi.last_report.zero_fraction < 0.01


def test_cuda_anchored_matches_cpu(setup):
    model, x, y = setup
    cfg = ForwardInfConfig(mode="anchored", steps=5)
    fi = ForwardInf(model, cfg, device="cuda")
    s = fi.pairwise((x[:500], y[:500]), (x[:3], y[:3]))
    ref = ForwardInf(model, cfg, device="cpu").pairwise((x[:500], y[:500]), (x[:3], y[:3]))
    assert s.shape == (500, 3) and s.device.type == "cpu"
    assert torch.allclose(s, ref, rtol=1e-4, atol=1e-6 * float(ref.abs().max()))


@pytest.mark.parametrize("autocast", ["bf16", "fp16"])
def test_cuda_autocast_ranks_like_float32(setup, autocast):
    from mirrorinf.metrics import spearman

    model, x, y = setup
    q = (x[:16], y[:16])
    ref = ForwardInf(model, ForwardInfConfig(fast_path="off"), device="cuda").pairwise((x, y), q)
    fi = ForwardInf(model, ForwardInfConfig(autocast=autocast, fast_path="off"), device="cuda")
    got = fi.pairwise((x, y), q)
    rho = spearman(ref.double().numpy(), got.double().numpy())
    assert torch.isfinite(got).all() and fi.last_report.n_constant_queries == 0
    assert float(rho.mean()) > 0.85, rho


def test_cuda_compile_matches_eager(setup):
    model, x, y = setup
    cfg = ForwardInfConfig(fast_path="off", train_batch=1024)
    eager = ForwardInf(model, cfg, device="cuda").pairwise((x, y), (x[:4], y[:4]))
    fi = ForwardInf(model, cfg.replace(compile=True), device="cuda")
    got = fi.pairwise((x, y), (x[:4], y[:4]))
    assert fi._rt._compiled not in (None, False)
    torch.testing.assert_close(got, eager, rtol=1e-4, atol=1e-6 * float(eager.abs().max()))


def test_cuda_out_of_memory_recovers(setup):
    """A real CUDA OOM: a training batch far beyond the device's memory halves until it fits."""
    model = nn.Sequential(nn.Linear(32, 8192), nn.ReLU(), nn.Linear(8192, 5))
    x = torch.randn(4096, 32)
    y = torch.randint(0, 5, (4096,))
    free, _ = torch.cuda.mem_get_info()
    rows = int(free // (8192 * 4 * 2))  # activations of one forward alone exceed free memory
    fi = ForwardInf(model, ForwardInfConfig(fast_path="off", train_batch=rows, query_batch=4),
                    device="cuda")  # fmt: skip
    x_big = x.repeat(max(1, rows // 4096 + 1), 1)
    y_big = y.repeat(max(1, rows // 4096 + 1))
    s = fi.pairwise((x_big, y_big), (x[:2], y[:2]))
    assert fi.train_batch < rows and torch.isfinite(s).all()
