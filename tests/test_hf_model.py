"""mlflow.transformers models (mirrorinf.tasks.hf_model): a tiny BERT built from a config and
saved with ``mlflow.transformers.save_model`` is rebuilt offline with its tokenizer, gives the
same logits, takes vmapped per-example gradients equal to one-by-one ones, and the unsafe or
unreadable cases are refused with the way out. Token inputs show as decoded text in the review.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from hf_helpers import word_tokenizer
from review_helpers import review_inputs

from mirrorinf.engine.updates import batchable
from mirrorinf.errors import ModelError
from mirrorinf.review import write_report
from mirrorinf.tasks.hf_model import TransformersModel, decode_rows, token_ids, tokenizer_of
from mirrorinf.tasks.model import load_model_uri, predict_labels

WORDS = [f"w{i}" for i in range(12)]


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any, Any]:
    """(model directory written by mlflow.transformers.save_model, model, tokenizer)."""
    import mlflow.transformers
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=4 + len(WORDS), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=16, num_labels=3,
    )  # fmt: skip
    model = BertForSequenceClassification(config).eval()
    tokenizer = word_tokenizer(WORDS)
    path = tmp_path_factory.mktemp("hf") / "model"
    mlflow.transformers.save_model(
        {"model": model, "tokenizer": tokenizer}, str(path), task="text-classification",
        pip_requirements=["transformers"],
    )  # fmt: skip
    return path, model, tokenizer


def batch() -> dict[str, torch.Tensor]:
    ids = torch.tensor([[2, 4, 5, 6, 3, 0], [2, 7, 8, 3, 0, 0], [2, 9, 3, 0, 0, 0]])
    return {"input_ids": ids, "attention_mask": (ids != 0).long()}


def test_loads_offline_with_tokenizer_and_same_logits(saved) -> None:
    path, model, tokenizer = saved
    loaded, ref = load_model_uri(str(path), tracking_uri="sqlite:///unused.db")
    assert ref is None and isinstance(loaded, TransformersModel) and not loaded.training
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch()).logits, model(**batch()).logits)
    assert tokenizer_of(loaded).decode([4, 5]) == tokenizer.decode([4, 5]) == "w0 w1"
    assert tokenizer_of(model) is None  # only a loaded transformers model carries one


def test_per_example_gradients_batch_under_vmap(saved) -> None:
    """The attention loaded for the engine lets vmap batch per-example gradients (transformers'
    default SDPA mask reads the mask's values, which vmap refuses) with the same numbers."""
    from torch.func import functional_call, grad, vmap

    loaded, _ = load_model_uri(str(saved[0]), tracking_uri="sqlite:///unused.db")
    params = {k: v.detach() for k, v in loaded.named_parameters()}

    def loss(p: dict, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = functional_call(loaded, p, (), {"input_ids": ids[None], "attention_mask": mask[None]})
        return out.logits.logsumexp(-1).sum()

    x = batch()
    with batchable():  # as the engine runs it: SDPA's math kernel, which vmap batches
        batched = vmap(grad(loss), in_dims=(None, 0, 0))(
            params, x["input_ids"], x["attention_mask"]
        )
    for i in range(3):
        one = grad(loss)(params, x["input_ids"][i], x["attention_mask"][i])
        for name, g in one.items():
            torch.testing.assert_close(batched[name][i], g, atol=1e-6, rtol=1e-5)


UNPICKLE = """
import pickle, sys, torch
model = pickle.loads(open(sys.argv[1], "rb").read())
batch = torch.load(sys.argv[2])
torch.save(model(**batch).logits.detach(), sys.argv[3])
"""


def test_loaded_model_runs_in_another_process(saved, tmp_path: Path) -> None:
    """The sharded path on Dask pickles the model to worker processes: unpickled in a fresh
    process (where mirrorinf registered no attention), it gives the same logits."""
    import pickle
    import subprocess
    import sys

    path, _, _ = saved
    loaded, _ = load_model_uri(str(path), tracking_uri="sqlite:///unused.db")
    (tmp_path / "model.pkl").write_bytes(pickle.dumps(loaded))
    torch.save(batch(), tmp_path / "batch.pt")
    args = [str(tmp_path / f) for f in ("model.pkl", "batch.pt", "logits.pt")]
    proc = subprocess.run([sys.executable, "-c", UNPICKLE, *args], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with torch.no_grad():
        want = loaded(**batch()).logits
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), want)


def _copy(saved, tmp_path: Path) -> Path:
    logged = tmp_path / "logged"
    shutil.copytree(saved[0], logged)
    return logged


def _load(path: Path, **kw: Any) -> Any:
    return load_model_uri(str(path), tracking_uri="sqlite:///unused.db", **kw)[0]


def test_refuses_remote_code(saved, tmp_path: Path) -> None:
    logged = _copy(saved, tmp_path)
    config_path = logged / "model" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "auto_map": {"AutoModel": "mine.Model"}}))
    with pytest.raises(ModelError, match="trust_remote_code"):
        _load(logged)


def test_refuses_a_model_class_transformers_does_not_ship(saved, tmp_path: Path) -> None:
    logged = _copy(saved, tmp_path)
    meta = yaml.safe_load((logged / "MLmodel").read_text())
    meta["flavors"]["transformers"]["pipeline_model_type"] = "MyCustomBert"
    (logged / "MLmodel").write_text(yaml.safe_dump(meta))
    with pytest.raises(ModelError, match="'MyCustomBert' is not one transformers"):
        _load(logged)


def test_refuses_pickled_weights_unless_allowed(saved, tmp_path: Path) -> None:
    logged = _copy(saved, tmp_path)
    model_dir = logged / "model"
    state = _load(logged).model.state_dict()
    (model_dir / "model.safetensors").unlink()
    torch.save(state, model_dir / "pytorch_model.bin")
    with pytest.raises(ModelError, match=r"pickled \(pytorch_model.bin\).*allow_pickle"):
        _load(logged)
    loaded = _load(logged, allow_pickle=True)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch()).logits, saved[1](**batch()).logits)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"source_model_name": "bert-base-uncased"}, "save_pretrained=True"),
        ({"peft_adaptor": "peft"}, "PEFT adapter"),
    ],
)
def test_refuses_what_the_files_do_not_hold(saved, tmp_path: Path, change, match) -> None:
    logged = _copy(saved, tmp_path)
    meta = yaml.safe_load((logged / "MLmodel").read_text())
    flavor = meta["flavors"]["transformers"]
    if "source_model_name" in change:
        del flavor["model_binary"]
    flavor.update(change)
    (logged / "MLmodel").write_text(yaml.safe_dump(meta))
    with pytest.raises(ModelError, match=match):
        _load(logged)


def test_refuses_other_flavours_by_name(saved, tmp_path: Path) -> None:
    logged = _copy(saved, tmp_path)
    meta = yaml.safe_load((logged / "MLmodel").read_text())
    meta["flavors"] = {"python_function": {}, "sklearn": {}}
    (logged / "MLmodel").write_text(yaml.safe_dump(meta))
    with pytest.raises(ModelError, match="python_function, sklearn; mirrorinf reads"):
        _load(logged)


def test_decode_rows_with_and_without_a_tokenizer(saved) -> None:
    ids = batch()["input_ids"].numpy()
    mask = batch()["attention_mask"].numpy()
    text = decode_rows(ids, mask, saved[2])
    assert text[1] == "[CLS] w3 w4 [SEP]"  # padding left out
    assert decode_rows(ids, mask)[2] == "2 9 3"
    assert decode_rows(np.array([[5, -100]]))[0] == "5 _"
    assert token_ids({"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)})
    assert token_ids(torch.zeros(3, 4)) is None  # float features are not tokens


def test_sequence_predictions_are_per_token(saved) -> None:
    """predict_labels of a sequence model: the most likely token per position."""
    from mirrorinf.params import TaskParams
    from mirrorinf.tasks.data import Split

    class Tagger(torch.nn.Module):
        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.one_hot((ids + 1) % 10, 10).float()

    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    split = Split("train", ids, torch.zeros_like(ids), np.arange(2), None)  # type: ignore[arg-type]
    pred = predict_labels(Tagger(), split, task=TaskParams(kind="sequence"))
    assert pred is not None and pred.tolist() == [[2, 3, 4], [5, 6, 7]]


def test_review_shows_token_inputs_as_text(tmp_path: Path) -> None:
    inp = review_inputs(16, 1)  # 16 features would be drawn as 4x4 images; as tokens they are text
    n, q = len(inp.train_x), len(inp.query_x)
    inp.train_text = np.asarray([f"train words {i}" for i in range(n)], dtype=object)
    inp.query_text = np.asarray([f"query words {i}" for i in range(q)], dtype=object)
    inp.query_text[0] = inp.train_text[0]  # the leak's query copies training row 0
    write_report(tmp_path, inp)
    report = (tmp_path / "report.md").read_text()
    assert "query: `train words 0`" in report and "train: `train words 0`" in report
    assert "Text of the top" in report and "First features" not in report


def test_review_shows_sequence_predictions_as_text(tmp_path: Path) -> None:
    inp = review_inputs(12, 0)
    n = len(inp.train_x)
    inp.kind = "sequence"
    inp.train_text = np.asarray([f"a b c {i}" for i in range(n)], dtype=object)
    inp.query_text = np.asarray(["q"] * len(inp.query_x), dtype=object)
    inp.pred_text = np.asarray([f"b c d {i}" for i in range(n)], dtype=object)
    write_report(tmp_path, inp)
    report = (tmp_path / "report.md").read_text()
    assert "predicted next tokens: `b c d" in report
    assert " label " not in report.split("Text of the top")[1].split("##")[0]


def test_without_task_output_the_error_names_it(saved) -> None:
    """A transformers model returns a ModelOutput: the message says to set task.output."""
    from mirrorinf.tasks.model import output_size

    loaded, _ = load_model_uri(str(saved[0]), tracking_uri="sqlite:///unused.db")
    with pytest.raises(ModelError, match=r"set task\.output: logits"):
        output_size(loaded, batch())
    assert output_size(loaded, batch(), "logits") == 3


def test_transformers_is_imported_only_when_met_and_its_absence_names_the_extra(saved) -> None:
    """Importing the pipeline does not import transformers; without it installed (blocked in a
    fresh interpreter), loading such a model names the extra to install."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import mirrorinf.flows.influence, mirrorinf.tasks.model as m\n"
        "assert 'transformers' not in sys.modules, 'imported eagerly'\n"
        "sys.modules['transformers'] = None  # as if not installed\n"
        "from mirrorinf.errors import ModelError\n"
        "try:\n"
        f"    m.load_model_uri({str(saved[0])!r}, tracking_uri='sqlite:///unused.db')\n"
        "except ModelError as err:\n"
        "    print(err)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "pip install 'mirrorinf[hf]'" in out.stdout


def test_a_logged_pipeline_loads_the_same(saved, tmp_path: Path) -> None:
    """mlflow.transformers also logs a transformers pipeline; it loads like a model + tokenizer."""
    import mlflow.transformers
    from transformers import pipeline

    _, model, tokenizer = saved
    path = tmp_path / "pipeline"
    pipe = pipeline("text-classification", model=model, tokenizer=tokenizer)
    mlflow.transformers.save_model(pipe, str(path), pip_requirements=["transformers"])
    loaded = _load(path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch()).logits, model(**batch()).logits)
    assert tokenizer_of(loaded) is not None
