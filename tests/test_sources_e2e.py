"""Data sources end to end: a small CNN logged as MLflow pt2 and scored by ``run_influence``
with a real SQLite MLflow store on an RGB image folder of PNG files written here (planted flips
= images filed under another class's folder), and an MLP through ``data.factory`` via
``mirrorinf run``. The planted rows rank far above chance (AUROC printed and asserted); the
review draws the images in colour and its tables name rows by the user's ids (file names)."""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch
import yaml
from e2e_helpers import Bag, auroc, fit, mlp, register, run, train_table, uri
from PIL import Image
from torch import nn

from mirrorinf.cli import main
from mirrorinf.tasks.data import load_dataset
from mirrorinf.tasks.tracking import get_client

pytestmark = pytest.mark.slow

CLASSES = ("blue", "green", "red")
SIDE = 12
STATS = {"mean": [0.4, 0.4, 0.4], "std": [0.3, 0.3, 0.3]}


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sources")


def _picture(rng: np.random.Generator, cls: int) -> np.ndarray:
    """A noisy SIDE x SIDE RGB picture whose dominant channel (and stripe phase) is the class."""
    img = rng.uniform(0, 0.45, size=(SIDE, SIDE, 3))
    img[..., 2 - cls] += 0.45  # blue, green, red
    img[cls::3, :, :] += 0.1  # stripes: a spatial cue the convolution can use
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def write_folder(root: Path, n: int, rng: np.random.Generator, flip: int = 0) -> list[str]:
    """``n`` PNGs per class under root/<class>/; the first ``flip`` pictures are filed under
    another class (planted flips); returns the flipped files' ids."""
    planted = []
    pictures = [(c, i, _picture(rng, c)) for c in range(len(CLASSES)) for i in range(n)]
    flips = set(rng.choice(len(pictures), size=flip, replace=False).tolist())
    for k, (c, i, pic) in enumerate(pictures):
        folder = CLASSES[(c + 1 + int(rng.integers(2))) % 3] if k in flips else CLASSES[c]
        (root / folder).mkdir(parents=True, exist_ok=True)
        rel = f"{folder}/{CLASSES[c]}-{i:03d}.png"
        Image.fromarray(pic, "RGB").save(root / rel)
        if k in flips:
            planted.append(rel)
    return planted


class SmallCNN(nn.Module):
    """Conv(3->6, 3x3) + ReLU + 2x2 max-pool + linear head: a user's image classifier."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.head = nn.Linear(6 * (SIDE // 2) ** 2, len(CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.max_pool2d(torch.relu(self.conv(x)), 2)
        return self.head(h.flatten(1))


def test_cnn_on_an_rgb_image_folder_flags_planted_flips(
    prefect_harness: Path, project: Path
) -> None:
    rng = np.random.default_rng(7)
    planted = write_folder(project / "imgs" / "train", 70, rng, flip=12)  # 210 images, 6%
    write_folder(project / "imgs" / "val", 20, rng)
    write_folder(project / "imgs" / "query", 5, rng)
    train = load_dataset(project / "imgs" / "train", image=STATS)  # as the user trained
    model = fit(SmallCNN(), train.x, train.y, nn.CrossEntropyLoss(), 150, wd=1e-2)
    version = register(project, "rgb-cnn", model, train.x[:2].numpy())
    data = {"source": "file", "train": "imgs/train", "val": "imgs/val", "query": "imgs/query",
            "image": STATS}  # fmt: skip
    result = run(project, "rgb-cnn", version, data)
    table = train_table(project, result)
    score = auroc(table, np.asarray(planted))
    print(f"images (RGB folder, 3x{SIDE}x{SIDE}, 6% flips): mislabel AUROC {score:.3f}")
    assert score > 0.8, score
    assert set(table["id"]) == set(train.ids) and "green/green-000.png" in set(table["id"])
    flagged = {row["id"] for row in result.summary["top_mislabels"]}
    assert flagged & set(planted), "no planted flip among the flagged file names"
    client = get_client(uri(project))
    plot = client.download_artifacts(result.run_id, "plots/mislabels.png", str(project / "dl"))
    r, g, b = np.moveaxis(mpimg.imread(plot)[..., :3], -1, 0)
    # green pictures drawn as images: no grey scale or blue-red feature strip has green pixels
    green = (g > r + 0.2) & (g > b + 0.2)
    assert green.mean() > 0.005, f"only {green.mean():.3%} green pixels"
    flagged_table = client.download_artifacts(
        result.run_id, "tables/flagged_train.json", str(project / "dl")
    )
    text = Path(flagged_table).read_text()
    assert ".png" in text and '"class"' in text


FACTORY = '''
import numpy as np
import torch

def blobs(split):
    """Three Gaussian blobs in 6-d; 5% of the training labels flipped (rows named in FLIPPED)."""
    seed = {"train": 0, "val": 1, "query": 2}[split]
    n = {"train": 240, "val": 90, "query": 12}[split]
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    centres = np.random.default_rng(9).normal(0, 2.0, (3, 6))
    x = (centres[y] + rng.normal(size=(n, 6))).astype(np.float32)
    if split == "train":
        flip = rng.choice(n, size=12, replace=False)
        y[flip] = (y[flip] + 1 + rng.integers(0, 2, 12)) % 3
        FLIPPED[:] = [f"row-{i}" for i in flip]
    return [
        {"x": torch.from_numpy(x[i]), "y": int(y[i]), "id": f"row-{i}"} for i in range(n)
    ]

FLIPPED = []
'''


def test_factory_dataset_through_mirrorinf_run(
    prefect_harness: Path, project: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    code = project / "usercode"
    code.mkdir()
    (code / "my_data.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(code))
    train = load_dataset("-", name="train", factory="my_data:blobs")
    planted = list(sys.modules["my_data"].FLIPPED)
    model = fit(mlp(6, 3, 16), train.x, train.y, nn.CrossEntropyLoss(), 200, wd=1e-2)
    version = register(project, "blobs-mlp", model, train.x[:2].numpy())
    params = project / "params-factory.yaml"
    params.write_text(yaml.safe_dump({
        "data": {"source": "file", "factory": "my_data:blobs"},
        "model": {"name": "blobs-mlp", "version": version},
        "mlflow": {"tracking_uri": "sqlite:///mlruns/mlflow.db", "experiment": "sources"},
        "threads": 1,
    }))  # fmt: skip
    capsys.readouterr()
    assert main(["run", "--params", str(params)]) in (0, 1)
    out = capsys.readouterr().out
    assert "row-" in out  # the rows are named by the factory's ids
    client = get_client(uri(project))
    runs = client.search_runs(
        [client.get_experiment_by_name("sources").experiment_id], order_by=["start_time DESC"]
    )
    path = client.download_artifacts(runs[0].info.run_id, "tables/train.parquet", str(project))
    import pandas as pd

    table = pd.read_parquet(path)
    score = auroc(table, np.asarray(planted))
    print(f"factory (blobs, 5% flips): mislabel AUROC {score:.3f}")
    assert score > 0.8, score


def test_hf_datasets_folder_token_ids_through_run_influence(
    prefect_harness: Path, project: Path
) -> None:
    """A ``save_to_disk`` folder with an int token column, a label and an id column: ids stay
    integer, the rows are named by the id column, the planted flips rank high."""
    import datasets

    rng = np.random.default_rng(5)
    ids = rng.integers(0, 50, size=(300, 6))
    y = (ids < 10).any(axis=1).astype(np.int64)
    parts = {"train": np.arange(200), "val": np.arange(200, 270), "query": np.arange(270, 300)}
    y_tr = y[parts["train"]].copy()
    planted = rng.choice(200, size=10, replace=False)
    y_tr[planted] = 1 - y_tr[planted]
    for split, rows in parts.items():
        labels = y_tr if split == "train" else y[rows]
        datasets.Dataset.from_dict({
            "input_ids": ids[rows].tolist(), "label": labels.tolist(),
            "doc": [f"doc-{i}" for i in rows],
        }).save_to_disk(str(project / "hf" / split))  # fmt: skip
    torch.manual_seed(0)  # the same embedding whatever ran before
    model = fit(Bag(), torch.from_numpy(ids[:200]), torch.from_numpy(y_tr),
                nn.CrossEntropyLoss(), 150)  # fmt: skip
    version = register(project, "hf-bag", model, ids[:2])
    data = {"source": "file", "train": "hf/train", "val": "hf/val", "query": "hf/query",
            "columns": {"inputs": ["input_ids"], "id": "doc"}}  # fmt: skip
    result = run(project, "hf-bag", version, data)
    table = train_table(project, result)
    score = auroc(table, np.asarray([f"doc-{i}" for i in planted]))
    print(f"hf datasets folder (token ids, 5% flips): mislabel AUROC {score:.3f}")
    assert score > 0.8, score
    assert table["id"].iloc[0] == "doc-0"
