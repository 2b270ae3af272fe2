"""Dataset loading (local files and a real DVC repo at revisions) and the embedded demo."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from dvc_helpers import dvc_add_commit, make_dvc_repo

from mirrorinf.demo import build_model, make_demo, train_demo_model
from mirrorinf.tasks.data import (
    DataError,
    check_labels,
    load_dataset,
    prepare_demo,
    read_json,
    write_npz,
)


def _xy(n: int = 20, d: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)).astype(np.float32), rng.integers(0, 3, size=n)


# --------------------------------------------------------------------------- local files


def test_npz_roundtrip_with_provenance(tmp_path: Path) -> None:
    x, y = _xy()
    path = tmp_path / "train.npz"
    md5 = write_npz(path, x, y, ids=np.arange(100, 120))
    data = load_dataset(path, name="train")
    assert data.x.dtype == torch.float32 and data.y.dtype == torch.int64
    assert np.array_equal(data.x.numpy(), x) and np.array_equal(data.y.numpy(), y)
    assert data.ids.tolist() == list(range(100, 120))
    assert data.provenance.md5 == md5 == hashlib.md5(path.read_bytes()).hexdigest()
    assert data.provenance.source == "file" and data.provenance.rev is None
    assert len(data.head(5)) == 5 and data.head(None) is data


def test_parquet_with_label_and_id_columns(tmp_path: Path) -> None:
    x, y = _xy()
    df = pd.DataFrame(x, columns=[f"f{i}" for i in range(x.shape[1])])
    df["target"] = y
    df["id"] = [f"row-{i}" for i in range(len(y))]
    path = tmp_path / "train.parquet"
    df.to_parquet(path)
    data = load_dataset(path, label_column="target")
    assert data.x.shape == (20, 4) and data.ids[0] == "row-0"
    with pytest.raises(DataError, match="label column 'label' not found"):
        load_dataset(path)


@pytest.mark.parametrize(
    ("arrays", "needle"),
    [
        ({"x": np.full((3, 2), np.nan), "y": np.zeros(3, int)}, "contain NaN"),
        ({"x": np.zeros((3, 2)), "y": np.array([0, -1, 2])}, "labels out of range"),
        ({"x": np.zeros((3, 2)), "y": np.array([0.5, 1.0, 2.0])}, "integer class indices"),
        ({"x": np.zeros((3, 2)), "y": np.array([0.0, np.nan, 1.0])}, "labels contain NaN"),
        ({"x": np.zeros((3, 2))}, "missing array(s) y"),
        ({"x": np.zeros((3, 2)), "y": np.zeros(4, int)}, "one label per row"),
        ({"x": np.zeros((3, 2)), "y": np.zeros(3, int), "ids": np.array([1, 1, 2])}, "not unique"),
        ({"x": np.zeros((0, 2)), "y": np.zeros(0, int)}, "empty"),
    ],
)
def test_bad_contents_name_the_problem(tmp_path: Path, arrays: dict, needle: str) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=r"bad\.npz") as info:
        load_dataset(path, name="train")
    assert needle in str(info.value)


def test_missing_corrupt_and_unsupported_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data file not found"):
        load_dataset(tmp_path / "nope.npz")
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"PK\x03\x04 definitely not a zip archive")
    with pytest.raises(DataError, match=r"corrupt or unreadable \.npz"):
        load_dataset(corrupt)
    bad_parquet = tmp_path / "bad.parquet"
    bad_parquet.write_bytes(b"not parquet")
    with pytest.raises(DataError, match="corrupt or unreadable parquet"):
        load_dataset(bad_parquet)
    with pytest.raises(DataError, match=r"unsupported dataset format '\.csv'"):
        load_dataset(tmp_path / "x.csv")


def test_labels_beyond_the_model_outputs(tmp_path: Path) -> None:
    x, _ = _xy()
    y = np.arange(20) % 12
    write_npz(tmp_path / "t.npz", x, y)
    data = load_dataset(tmp_path / "t.npz", name="train")
    check_labels(data, 12)
    with pytest.raises(DataError, match=r"labels out of range: 2 label\(s\) >= 10 \(max 11\)"):
        check_labels(data, 10)


# --------------------------------------------------------------------------- DVC


@pytest.fixture(scope="module")
def dvc_repo(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A DVC repo with data.npz at tag v1 and a changed data.npz at tag v2."""
    repo = make_dvc_repo(tmp_path_factory.mktemp("dvcrepo"))
    x, y = _xy(seed=1)
    write_npz(repo / "data.npz", x, y)
    (repo / "truth.json").write_text('{"flipped_ids": [1]}')
    v1 = dvc_add_commit(repo, ["data.npz"], "v1", tag="v1")
    write_npz(repo / "data.npz", x[:10], y[:10])
    v2 = dvc_add_commit(repo, ["data.npz"], "v2", tag="v2")
    return {"repo": repo, "v1": v1, "v2": v2, "x": x}


def test_dvc_reads_each_revision(dvc_repo: dict) -> None:
    repo = dvc_repo["repo"]
    old = load_dataset("data.npz", name="train", source="dvc", repo=repo, rev="v1")
    new = load_dataset("data.npz", name="train", source="dvc", repo=repo, rev="v2")
    assert len(old) == 20 and len(new) == 10
    assert np.array_equal(old.x.numpy(), dvc_repo["x"])
    assert old.provenance.commit == dvc_repo["v1"] and new.provenance.commit == dvc_repo["v2"]
    assert old.provenance.md5 != new.provenance.md5
    assert old.provenance.rev == "v1" and old.provenance.source == "dvc"
    # the DVC md5 of the tracked file is the md5 of the bytes we read
    dvc_file = (repo / "data.npz.dvc").read_text()
    assert new.provenance.md5 in dvc_file
    head = load_dataset("data.npz", name="train", source="dvc", repo=repo)
    assert head.provenance.md5 == new.provenance.md5
    assert read_json("truth.json", source="dvc", repo=repo, rev="v1") == {"flipped_ids": [1]}


def test_dvc_missing_rev_path_and_repo(dvc_repo: dict, tmp_path: Path) -> None:
    repo = dvc_repo["repo"]
    with pytest.raises(DataError, match="unknown git revision 'v9'"):
        load_dataset("data.npz", source="dvc", repo=repo, rev="v9")
    with pytest.raises(DataError, match=r"'nope\.npz' not found in DVC repo"):
        load_dataset("nope.npz", source="dvc", repo=repo, rev="v1")
    with pytest.raises(DataError):
        load_dataset("data.npz", source="dvc", repo=tmp_path / "no-repo", rev="v1")


# --------------------------------------------------------------------------- demo


def test_demo_plants_what_it_says() -> None:
    d = make_demo(n_train=300, n_val=50, n_query=20, flip_fraction=0.2, n_leaks=4, seed=3)
    assert d.train.x.shape == (300, 64) and d.val.x.shape == (50, 64) and d.query.x.shape[0] == 20
    assert len(d.flipped_ids) == 60 and len(set(d.flipped_ids)) == 60
    pos = {int(i): k for k, i in enumerate(d.train.ids)}
    flipped_pos = [pos[int(i)] for i in d.flipped_ids]
    assert (d.train.y[flipped_pos] != d.original_labels).all()
    qpos = {int(i): k for k, i in enumerate(d.query.ids)}
    for qid, tid in d.leak_pairs:
        assert np.array_equal(d.query.x[qpos[int(qid)]], d.train.x[pos[int(tid)]])
        assert d.query.y[qpos[int(qid)]] == d.train.y[pos[int(tid)]]
        assert int(tid) not in set(d.flipped_ids.tolist())
    # splits are disjoint apart from the planted copies; standardised on the training split
    fresh = set(d.query.ids.tolist()) - {int(q) for q, _ in d.leak_pairs}
    assert not (set(d.train.ids) & set(d.val.ids)) and not (fresh & set(d.train.ids))
    assert abs(float(d.train.x.mean())) < 1e-5
    again = make_demo(n_train=300, n_val=50, n_query=20, flip_fraction=0.2, n_leaks=4, seed=3)
    assert np.array_equal(again.train.x, d.train.x) and again.ground_truth() == d.ground_truth()


def test_demo_model_trains_deterministically_and_rebuilds() -> None:
    d = make_demo(n_train=200, n_val=50, n_query=5, flip_fraction=0.0, n_leaks=0)
    m1, info = train_demo_model(d.train.x, d.train.y, epochs=60)
    m2, _ = train_demo_model(d.train.x, d.train.y, epochs=60)
    for a, b in zip(m1.state_dict().values(), m2.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert info["train_accuracy"] > 0.9
    rebuilt = build_model(m1.spec())
    rebuilt.load_state_dict(m1.state_dict())
    x = torch.from_numpy(d.val.x)
    assert torch.equal(rebuilt(x), m1(x))
    with pytest.raises(ValueError, match="unknown architecture"):
        build_model({"arch": "resnet"})


def test_prepare_demo_skips_when_current(tmp_path: Path) -> None:
    demo = {"n_train": 100, "n_val": 20, "n_query": 10, "flip_fraction": 0.1, "n_leaks": 2,
            "seed": 0}  # fmt: skip
    paths = [tmp_path / f"{n}.npz" for n in ("train", "val", "query")]
    truth = prepare_demo(demo, *paths)
    assert truth == tmp_path / "ground_truth.json"
    stamp = [p.stat().st_mtime_ns for p in paths]
    prepare_demo(demo, *paths)
    assert [p.stat().st_mtime_ns for p in paths] == stamp
    prepare_demo({**demo, "seed": 1}, *paths)
    assert read_json(truth)["params"]["seed"] == 1
    assert len(load_dataset(paths[0])) == 100


def test_inputs_without_features_are_bad_input(tmp_path: Path) -> None:
    """x of shape [n, 0] crashed deep in the engine (exit 3); it is bad data, said at load."""
    write_npz(tmp_path / "t.npz", np.zeros((5, 0), np.float32), np.zeros(5, np.int64))
    with pytest.raises(DataError, match=r"x has no features \(rows of shape \(0,\)\)"):
        load_dataset(tmp_path / "t.npz", name="train")


@pytest.mark.parametrize(
    ("x", "got"),
    [
        (np.ones((6, 4), np.uint8), "int64 rows of shape (4,)"),
        (np.ones((6, 2, 2), np.float32), "float32 rows of shape (2, 2)"),
    ],
)
def test_demo_mlp_on_data_it_cannot_take_says_what_to_do(
    tmp_path: Path, x: np.ndarray, got: str
) -> None:
    """With no model named, the demo MLP is trained on the user's data: integer (token-like)
    or [n, a, b] inputs were a traceback (exit 3) after training; now a DataError first."""
    from mirrorinf.tasks.model import train_and_register

    write_npz(tmp_path / "t.npz", x, np.arange(6) % 2)
    split = load_dataset(tmp_path / "t.npz", name="train")
    with pytest.raises(DataError, match=re.escape(got) + ".*register your own model"):
        train_and_register(
            split, None, name="m", train_params={}, tracking_uri=f"sqlite:///{tmp_path}/m.db",
            experiment="e",
        )  # fmt: skip
    assert not (tmp_path / "m.db").exists()  # nothing was started
