"""Your own model, trained, registered in MLflow and checked by mirrorinf right after training.

A small network and loss of your own (a tanh MLP, label-smoothed cross-entropy) on scikit-learn's
breast cancer data. Run it in a scratch folder: ``cd /tmp/demo && python .../custom_model.py``.
It writes train/val/query .npz files and the MLflow store (mirrorinf's default,
``mlruns/mlflow.db``) there, then prints the gate verdict; ``mirrorinf gate --model breast-mlp
--version N`` in that folder answers the same. With PREFECT_API_URL set and ``mirrorinf serve``
running, ``mirrorinf.trigger`` submits the run to that deployment and prints its flow-run id.
"""

import os

import mlflow
import numpy as np
import torch
from sklearn.datasets import load_breast_cancer
from torch import nn

import mirrorinf


class Net(nn.Module):
    def __init__(self, d_in: int = 30, hidden: int = 16, n_classes: int = 2) -> None:
        super().__init__()
        self.hidden, self.out = nn.Linear(d_in, hidden), nn.Linear(hidden, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.hidden(x)))


x, y = load_breast_cancer(return_X_y=True)
x = ((x - x.mean(0)) / x.std(0)).astype(np.float32)
perm = np.random.default_rng(0).permutation(len(y))
splits = {"train": perm[:400], "val": perm[400:500], "query": perm[500:]}
for name, rows in splits.items():
    np.savez(f"{name}.npz", x=x[rows], y=y[rows])

net, loss_fn = Net(), nn.CrossEntropyLoss(label_smoothing=0.05)
opt = torch.optim.Adam(net.parameters(), lr=0.01, weight_decay=1e-3)
xt, yt = torch.from_numpy(x[splits["train"]]), torch.from_numpy(y[splits["train"]])
for _ in range(200):
    opt.zero_grad()
    loss_fn(net(xt), yt).backward()
    opt.step()

os.makedirs("mlruns", exist_ok=True)
mlflow.set_tracking_uri("sqlite:///mlruns/mlflow.db")  # mirrorinf's default store
with mlflow.start_run():  # logged as pt2 (torch.export), MLflow 3's default: no pickle
    info = mlflow.pytorch.log_model(net, name="model", registered_model_name="breast-mlp",
                                    input_example=x[:2], pip_requirements=["torch"])  # fmt: skip

data = {"source": "file", "train": "train.npz", "val": "val.npz", "query": "query.npz"}
result = mirrorinf.trigger("breast-mlp", info.registered_model_version, params={"data": data})
done = hasattr(result, "verdict")  # an InfluenceResult, or the id of a submitted flow run
print(f"gate {result.verdict}: {result.reasons}" if done else f"submitted: flow run {result}")
