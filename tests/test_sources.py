"""Data sources beyond .npz / .parquet: an image folder, a HuggingFace datasets folder and the
user's Dataset factory, each read whole and by row range, from a folder and (images) from a real
DVC repository at a revision; bad input is one DataError naming the problem and the fix."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from dvc_helpers import dvc_add_commit, git, make_dvc_repo
from PIL import Image

from mirrorinf.errors import DataError, InputError
from mirrorinf.params import params_from_dict
from mirrorinf.tasks.data import load_dataset
from mirrorinf.tasks.sources import Columns, ImageOptions
from mirrorinf.tasks.sources.factory import FactorySource
from mirrorinf.tasks.sources.hf import HFFolder
from mirrorinf.tasks.sources.images import ImageFolder

COLOURS = {"blue": (0, 0, 255), "red": (255, 0, 0), "green": (0, 255, 0)}


def write_images(root: Path, per_class: int = 4, size: tuple[int, int] = (6, 5)) -> dict:
    """PNG files root/<class>/<i>.png with a colour per class and a per-file pattern."""
    rng = np.random.default_rng(0)
    pixels = {}
    for name, rgb in COLOURS.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = (np.asarray(rgb) * 0.5 + rng.integers(0, 100, (*size, 3))).astype(np.uint8)
            Image.fromarray(arr, "RGB").save(root / name / f"{i:03d}.png")
            pixels[f"{name}/{i:03d}.png"] = arr
    return pixels


def test_image_folder_reads_classes_ids_and_pixels(tmp_path: Path) -> None:
    pixels = write_images(tmp_path / "imgs")
    split = load_dataset(tmp_path / "imgs", name="train")
    assert split.x.shape == (12, 3, 6, 5) and split.x.dtype.is_floating_point
    # classes: sorted folder names; ids: the path relative to the root
    assert split.classes == ("blue", "green", "red") == split.provenance.classes
    assert split.ids[0] == "blue/000.png" and split.ids[-1] == "red/003.png"
    assert split.y.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    want = pixels["green/002.png"].transpose(2, 0, 1) / 255.0
    assert np.allclose(split.x[list(split.ids).index("green/002.png")].numpy(), want, atol=1e-6)
    assert split.provenance.format == "images"


def test_image_options_grayscale_resize_normalise(tmp_path: Path) -> None:
    pixels = write_images(tmp_path / "imgs", per_class=1)
    gray = load_dataset(tmp_path / "imgs", image={"mode": "L", "size": [4, 3]})
    assert gray.x.shape == (3, 1, 4, 3)
    norm = load_dataset(
        tmp_path / "imgs", image={"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    )
    raw = pixels["blue/000.png"].transpose(2, 0, 1) / 255.0
    assert np.allclose(norm.x[0].numpy(), (raw - 0.5) / 0.25, atol=1e-5)


def test_image_row_ranges_equal_the_full_read(tmp_path: Path) -> None:
    write_images(tmp_path / "imgs")
    folder = ImageFolder(tmp_path / "imgs", ImageOptions(), "t")
    full = folder.rows(0, len(folder))
    part = folder.rows(5, 9)
    assert np.array_equal(part.x, full.x[5:9]) and list(part.ids) == list(full.ids[5:9])
    assert np.array_equal(part.y, full.y[5:9])
    x, y = folder[7]  # a torch Dataset too
    assert np.array_equal(x.numpy(), full.x[7]) and y == full.y[7]


def test_image_provenance_changes_when_one_file_changes(tmp_path: Path) -> None:
    write_images(tmp_path / "imgs")
    before = load_dataset(tmp_path / "imgs").provenance.md5
    assert load_dataset(tmp_path / "imgs").provenance.md5 == before
    img = np.zeros((6, 5, 3), np.uint8)
    Image.fromarray(img, "RGB").save(tmp_path / "imgs" / "red" / "001.png")
    changed = load_dataset(tmp_path / "imgs").provenance.md5
    assert changed != before
    # the same bytes under a new name (same place in the order): the names count too
    (tmp_path / "imgs" / "red" / "001.png").rename(tmp_path / "imgs" / "red" / "001b.png")
    assert load_dataset(tmp_path / "imgs").provenance.md5 not in (before, changed)


def test_bad_image_folders_name_the_problem_and_fix(tmp_path: Path) -> None:
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "flat" / "a.png")
    with pytest.raises(DataError, match="class subfolders"):
        load_dataset(tmp_path / "flat", fmt="images")
    with pytest.raises(DataError, match="image folder"):  # auto: neither hf nor images
        load_dataset(tmp_path / "flat")
    write_images(tmp_path / "mixed", per_class=1)
    Image.new("RGB", (8, 8)).save(tmp_path / "mixed" / "red" / "big.png")
    with pytest.raises(DataError, match=r"differ in size.*data\.image\.size"):
        load_dataset(tmp_path / "mixed")
    assert load_dataset(tmp_path / "mixed", image={"size": [8, 8]}).x.shape == (4, 3, 8, 8)
    write_images(tmp_path / "broken", per_class=1)
    (tmp_path / "broken" / "red" / "bad.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"red/bad\.png"):
        load_dataset(tmp_path / "broken")
    with pytest.raises(DataError, match="one per channel"):
        load_dataset(tmp_path / "mixed", image={"size": [8, 8], "mean": [0.5]})
    with pytest.raises(DataError, match="not found"):
        load_dataset(tmp_path / "nothing-here")


def test_image_folder_from_a_dvc_repo_at_each_revision(tmp_path: Path) -> None:
    repo = make_dvc_repo(tmp_path / "repo")
    pixels = write_images(repo / "imgs", per_class=2)
    git(repo, "rm", "-q", "--cached", "-r", "--ignore-unmatch", "imgs")
    v1 = dvc_add_commit(repo, ["imgs"], "v1", tag="v1")
    Image.new("RGB", (5, 6), (9, 9, 9)).save(repo / "imgs" / "red" / "000.png")
    v2 = dvc_add_commit(repo, ["imgs"], "v2", tag="v2")
    old = load_dataset("imgs", name="train", source="dvc", repo=repo, rev="v1")
    new = load_dataset("imgs", name="train", source="dvc", repo=repo, rev="v2")
    local_v2 = load_dataset(repo / "imgs")
    assert old.provenance.commit == v1 and new.provenance.commit == v2
    assert new.provenance.md5 == local_v2.provenance.md5 != old.provenance.md5
    assert list(old.ids) == list(local_v2.ids) and old.classes == ("blue", "green", "red")
    red0 = list(old.ids).index("red/000.png")
    assert np.allclose(old.x[red0].numpy(), pixels["red/000.png"].transpose(2, 0, 1) / 255)
    assert np.allclose(new.x[red0].numpy(), 9 / 255)
    with pytest.raises(DataError, match="not found"):
        load_dataset("nope", source="dvc", repo=repo, rev="v1")


def save_hf(path: Path, n: int = 10, ragged: bool = False) -> dict:
    import datasets

    rng = np.random.default_rng(1)
    ids = rng.integers(1, 50, (n, 6))
    if ragged:
        ids = [row[: 3 + i % 3].tolist() for i, row in enumerate(ids)]
    cols = {
        "input_ids": ids if ragged else ids.tolist(),
        "attention_mask": np.ones((n, 6), int).tolist(),
        "feat": rng.normal(size=(n, 4)).astype(np.float32).tolist(),
        "label": (np.arange(n) % 2).tolist(),
        "name": [f"doc-{i}" for i in range(n)],
    }
    datasets.Dataset.from_dict(cols).save_to_disk(str(path))
    return cols


def test_hf_folder_named_inputs_ids_and_ranges(tmp_path: Path) -> None:
    cols = save_hf(tmp_path / "ds")
    columns = {"inputs": ["input_ids", "attention_mask"], "id": "name"}
    split = load_dataset(tmp_path / "ds", name="train", columns=columns)
    assert set(split.x) == {"input_ids", "attention_mask"}
    assert split.x["input_ids"].dtype.is_floating_point is False
    assert np.array_equal(split.x["input_ids"].numpy(), np.asarray(cols["input_ids"]))
    assert list(split.ids) == cols["name"] and split.y.tolist() == cols["label"]
    one = load_dataset(tmp_path / "ds", columns={"inputs": ["feat"]})
    assert one.x.shape == (10, 4) and one.x.dtype.is_floating_point
    assert one.provenance.format == "hf"
    folder = HFFolder(tmp_path / "ds", Columns(inputs=("input_ids", "feat")), "t")
    full, part = folder.rows(0, len(folder)), folder.rows(3, 7)
    for k in ("input_ids", "feat"):
        assert np.array_equal(part.x[k], full.x[k][3:7])
    assert np.array_equal(part.y, full.y[3:7])


def test_hf_provenance_and_errors(tmp_path: Path) -> None:
    save_hf(tmp_path / "a")
    save_hf(tmp_path / "b")
    opts = {"columns": {"inputs": ["feat"]}}
    md5 = load_dataset(tmp_path / "a", **opts).provenance.md5
    assert load_dataset(tmp_path / "b", **opts).provenance.md5 == md5  # same content
    import datasets

    ds = datasets.load_from_disk(str(tmp_path / "a"))
    ds.map(lambda r: {"label": 1 - r["label"]}).save_to_disk(str(tmp_path / "c"))
    assert load_dataset(tmp_path / "c", **opts).provenance.md5 != md5
    with pytest.raises(DataError, match=r"unknown column.*'pixels'.*data\.columns"):
        load_dataset(tmp_path / "a", columns={"inputs": ["pixels"]})
    save_hf(tmp_path / "ragged", ragged=True)
    with pytest.raises(DataError, match=r"different lengths.*pad"):
        load_dataset(tmp_path / "ragged", columns={"inputs": ["input_ids"]})
    with pytest.raises(DataError, match="is not one"):
        load_dataset(tmp_path / "a" / "state.json", fmt="hf")


FACTORY = """
import torch

CALLS = []

class Squares(torch.utils.data.Dataset):
    def __init__(self, split, n, form):
        self.split, self.n, self.form = split, n, form
    def __len__(self):
        return self.n
    def __getitem__(self, i):
        CALLS.append(i)
        x = torch.full((2, 3), float(i) + (100 if self.split == "query" else 0))
        if self.form == "dict":
            return {"x": {"a": x, "b": torch.tensor([i, i + 1])}, "y": i % 3, "id": f"s{i}"}
        return x, i % 3

def make(split):
    return Squares(split, 7, "tuple")

def named(split):
    return Squares(split, 5, "dict")

def broken(split):
    return (i for i in range(3))

def bad_items(split):
    return [1, 2, 3]
"""


@pytest.fixture
def factory_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    name = f"user_factory_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(FACTORY))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_factory_tuples_dicts_and_ranges(factory_module: str) -> None:
    train = load_dataset("unused", name="train", factory=f"{factory_module}:make")
    assert len(sys.modules[factory_module].CALLS) == 7  # each item read once (digest included)
    query = load_dataset("unused", name="query", factory=f"{factory_module}:make")
    assert train.x.shape == (7, 2, 3) and train.y.tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert float(query.x[0, 0, 0]) == 100.0  # called with the split name
    assert list(train.ids) == list(range(7)) and train.provenance.source == "factory"
    assert train.provenance.path == f"{factory_module}:make('train')"
    named = load_dataset("unused", name="train", factory=f"{factory_module}:named")
    assert set(named.x) == {"a", "b"} and named.x["b"].dtype.is_floating_point is False
    assert list(named.ids) == [f"s{i}" for i in range(5)]
    src = FactorySource(f"{factory_module}:make", "train", "t")
    assert np.array_equal(src.rows(2, 5).x, src.rows(0, 7).x[2:5])
    assert list(src.rows(2, 5).ids) == [2, 3, 4]
    assert train.provenance.md5 != query.provenance.md5


def test_factory_errors_and_params(factory_module: str, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not a map-style Dataset"):
        load_dataset("unused", factory=f"{factory_module}:broken")
    with pytest.raises(DataError, match=r"item 0 is int; return \(x, y\)"):
        load_dataset("unused", factory=f"{factory_module}:bad_items")
    with pytest.raises(InputError, match="no function 'nope'"):
        load_dataset("unused", factory=f"{factory_module}:nope")
    with pytest.raises(InputError, match=r"data\.source: file"):
        params_from_dict({"data": {"source": "dvc", "factory": "m:f"}}, root=tmp_path)
    p = params_from_dict({"data": {"source": "file", "factory": "m:f"}}, root=tmp_path)
    assert p.data.reader()["factory"] == "m:f" and p.data.format == "auto"


def test_cli_bad_image_folder_exits_2_with_one_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``mirrorinf score`` on a folder of mixed image sizes: exit 2, the problem and the fix in
    one line, nothing written (the data is read before the model)."""
    from mirrorinf.cli import main

    write_images(tmp_path / "imgs", per_class=1)
    Image.new("RGB", (8, 8)).save(tmp_path / "imgs" / "red" / "big.png")
    monkeypatch.chdir(tmp_path)
    code = main(["score", "--model-uri", "models:/m/1", "--train", "imgs", "--queries", "imgs",
                 "--out", "out", "--tracking-uri", f"sqlite:///{tmp_path}/m.db"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2, err
    assert "differ in size" in err and "data.image.size" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_provenance_tags_cap_many_class_names(tmp_path: Path) -> None:
    """1,000 class folders (ImageNet-like) must not make a tag MLflow refuses (8,000 chars)."""
    from mirrorinf.tasks.tracking import provenance_tags

    for i in range(1000):
        (tmp_path / "imgs" / f"n{i:08d}").mkdir(parents=True)
        Image.new("RGB", (4, 4), (i % 256, 0, 0)).save(tmp_path / "imgs" / f"n{i:08d}" / "a.png")
    split = load_dataset(tmp_path / "imgs", name="train")
    assert len(split.classes) == 1000 and split.classes[7] == "n00000007"
    tags = provenance_tags({"train": split.provenance})
    assert tags["mirrorinf.data.train.format"] == "images"
    assert len(tags["mirrorinf.data.train.classes"]) < 1100
    assert tags["mirrorinf.data.train.classes"].endswith("(1000 classes)")


def test_hf_folder_from_a_dvc_repo(tmp_path: Path) -> None:
    repo = make_dvc_repo(tmp_path / "repo")
    cols = save_hf(repo / "ds")
    v1 = dvc_add_commit(repo, ["ds"], "v1", tag="v1")
    opts = {"columns": {"inputs": ["input_ids"], "id": "name"}}
    split = load_dataset("ds", name="train", source="dvc", repo=repo, rev="v1", **opts)
    assert split.provenance.commit == v1 and split.provenance.format == "hf"
    assert split.provenance.md5 == load_dataset(repo / "ds", **opts).provenance.md5
    assert list(split.ids) == cols["name"]
    assert np.array_equal(split.x.numpy(), np.asarray(cols["input_ids"]))
