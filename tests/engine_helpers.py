"""Independent computations the engine is checked against (test_engine, test_properties)."""

from __future__ import annotations

import copy

import torch
from torch import nn


def brute_force_scores(
    model: nn.Module,
    train: tuple[torch.Tensor, torch.Tensor],
    queries: tuple[torch.Tensor, torch.Tensor],
    lr: float,
    optimizer: str = "sgd",
    bn_update: bool = False,
) -> torch.Tensor:
    """score(i, q) = loss_i(theta) - loss_i(theta after one step of ``lr`` on loss(q)), by hand:
    a float64 deepcopy of the model per query, torch's own cross-entropy and torch.optim (eval
    mode throughout, except BatchNorm during the step with ``bn_update``)."""
    x, y = train
    ref = copy.deepcopy(model).double().eval()
    xd = x.double() if x.is_floating_point() else x

    def losses(m: nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return nn.functional.cross_entropy(m(xd), y, reduction="none")

    base = losses(ref)
    cols = []
    for xq, yq in zip(*queries, strict=True):
        m = copy.deepcopy(ref)
        if bn_update:
            for mod in m.modules():
                if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                    mod.train()
        opt_cls = torch.optim.SGD if optimizer == "sgd" else torch.optim.Adam
        opt = opt_cls(m.parameters(), lr=lr)
        xqd = xq[None].double() if xq.is_floating_point() else xq[None]
        nn.functional.cross_entropy(m(xqd), yq[None]).backward()
        opt.step()
        m.eval()
        cols.append(base - losses(m))
    return torch.stack(cols, dim=1)
