"""HuggingFace transformers models end to end: built from a config (nothing downloaded), trained
here on synthetic tokens, logged with ``mlflow.transformers`` (model + tokenizer), registered and
pinned by version, scored by ``run_influence`` / ``mirrorinf run`` with a real SQLite store.

Text classification: a 2-layer BERT on "topic" sequences (the class is which topic's words a
sequence holds), inputs ``x_input_ids`` + ``x_attention_mask`` (padded), 5% planted label flips
and one query that is an exact copy of a training sequence (a leak). Sequence: a 2-layer GPT-2
causal LM on Markov-chain sequences (labels shifted, -100 last), 5% rows replaced by random tokens.
The loader's refusals are unit-tested in tests/test_hf_model.py.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from e2e_helpers import run, save_splits, train_table, uri
from hf_helpers import SPECIAL, word_tokenizer
from mlflow_helpers import training_run
from sklearn.metrics import roc_auc_score

from mirrorinf.cli import main
from mirrorinf.flows.influence import InfluenceResult
from mirrorinf.tasks.hf_model import TransformersModel, tokenizer_of
from mirrorinf.tasks.model import load_model_uri
from mirrorinf.tasks.tracking import get_client

pytestmark = pytest.mark.slow

TOPICS = 3  # classes
TOPIC_WORDS = 6  # words per topic
FILLER = 20


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hf")


def log_hf(project: Path, name: str, model: Any, tokenizer: Any, task: str) -> int:
    """Log with mlflow.transformers (the user's way) and register; returns the version."""
    import mlflow.transformers

    with training_run(project, uri(project)):
        info = mlflow.transformers.log_model(
            transformers_model={"model": model.eval(), "tokenizer": tokenizer}, name="model",
            task=task, registered_model_name=name, pip_requirements=["transformers"],
        )  # fmt: skip
    return int(info.registered_model_version)


def fit(model: torch.nn.Module, x: dict[str, torch.Tensor], loss: Any, steps: int) -> None:
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-2)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        loss(model(**x)).backward()
        opt.step()
    model.eval()


def auroc(table: pd.DataFrame, planted: np.ndarray) -> float:
    return float(roc_auc_score(table["id"].isin(planted), table["self_influence"]))


def artifacts(project: Path, run_id: str, path: str) -> Path:
    client = get_client(uri(project))
    return Path(client.download_artifacts(run_id, path, str(project / f"dl-{run_id}")))


# --------------------------------------------------------------------------- text classification
def topic_data(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(input_ids [n, 12], attention_mask, labels): [CLS] words [SEP] [PAD]...; a sequence of
    class c holds 2-3 words of topic c among filler words."""
    rng = np.random.default_rng(seed)
    t_len, first_topic = 12, len(SPECIAL)
    first_filler = first_topic + TOPICS * TOPIC_WORDS
    ids = np.zeros((n, t_len), dtype=np.int64)
    mask = np.zeros((n, t_len), dtype=np.int64)
    y = rng.integers(0, TOPICS, size=n)
    for i in range(n):
        length = int(rng.integers(6, 11))  # words between [CLS] and [SEP]
        words = rng.integers(first_filler, first_filler + FILLER, size=length)
        k = int(rng.integers(2, 4))
        at = rng.choice(length, size=k, replace=False)
        words[at] = first_topic + y[i] * TOPIC_WORDS + rng.integers(0, TOPIC_WORDS, size=k)
        ids[i, : length + 2] = [2, *words, 3]
        mask[i, : length + 2] = 1
    return ids, mask, y


@pytest.fixture(scope="module")
def text(prefect_harness: Path, project: Path) -> dict[str, Any]:
    from transformers import BertConfig, BertForSequenceClassification

    words = [f"t{c}w{j}" for c in range(TOPICS) for j in range(TOPIC_WORDS)]
    words += [f"f{j}" for j in range(FILLER)]
    tokenizer = word_tokenizer(words)
    ids, mask, y = topic_data(400)
    tr, va, qu = np.arange(0, 300), np.arange(300, 360), np.arange(360, 400)
    rng = np.random.default_rng(1)
    y_tr = y[tr].copy()
    planted = rng.choice(len(tr), size=15, replace=False)  # 5% flipped labels
    y_tr[planted] = (y_tr[planted] + rng.integers(1, TOPICS, size=15)) % TOPICS
    dup = int(np.setdiff1d(np.arange(len(tr)), planted)[7])  # a clean training row
    q_ids, q_mask, q_y = ids[qu].copy(), mask[qu].copy(), y[qu].copy()
    q_ids[0], q_mask[0], q_y[0] = ids[tr][dup], mask[tr][dup], y_tr[dup]  # the planted leak

    started = time.perf_counter()
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(SPECIAL) + len(words), hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=64, max_position_embeddings=16,
        num_labels=TOPICS, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    model = BertForSequenceClassification(config)
    x = {"input_ids": torch.from_numpy(ids[tr]), "attention_mask": torch.from_numpy(mask[tr])}
    target = torch.from_numpy(y_tr)
    # 60 steps: it fits the topics (validation accuracy 1.0) without memorising the flips;
    # trained to 100% training accuracy (150 steps) the flips rank lower (see the README)
    fit(model, x, lambda out: torch.nn.functional.cross_entropy(out.logits, target), 60)
    with torch.no_grad():
        accuracy = float((model(**x).logits.argmax(1) == target).float().mean())
    trained = time.perf_counter()
    version = log_hf(project, "bert-topics", model, tokenizer, "text-classification")
    logged = time.perf_counter()
    data = save_splits(project, "topics", {
        "train": {"x_input_ids": ids[tr], "x_attention_mask": mask[tr], "y": y_tr, "ids": tr},
        "val": {"x_input_ids": ids[va], "x_attention_mask": mask[va], "y": y[va], "ids": va},
        "query": {"x_input_ids": q_ids, "x_attention_mask": q_mask, "y": q_y, "ids": qu},
    })  # fmt: skip
    result = run(project, "bert-topics", version, data, task={"output": "logits"})
    table = train_table(project, result)
    score = auroc(table, tr[planted])
    flagged = table.loc[table["flag_mislabel"], "id"].isin(tr[planted])
    print(f"flagged {len(flagged)}, of them planted {int(flagged.sum())} (of {len(planted)})")
    print(f"text (BERT, 5% flipped labels): train accuracy {accuracy:.3f}, AUROC {score:.3f}; "
          f"train {trained - started:.1f}s, log {logged - trained:.1f}s, flow stages "
          f"{ {k: round(v, 1) for k, v in result.stage_seconds.items()} }")  # fmt: skip
    return {
        "result": result, "auroc": score, "planted": tr[planted], "dup": int(tr[dup]),
        "query0": int(qu[0]), "version": version, "data": data, "tokenizer": tokenizer,
        "text0": tokenizer.decode([t for t in ids[tr][dup] if t != 0]),
    }  # fmt: skip


def test_text_classifier_flags_flips_and_the_duplicate(text: dict[str, Any]) -> None:
    result: InfluenceResult = text["result"]
    assert text["auroc"] > 0.9, text["auroc"]
    flagged = {row["id"] for row in result.summary["top_mislabels"]}
    # 5% of the set is planted: chance precision 0.05
    assert flagged and len(flagged & set(text["planted"].tolist())) / len(flagged) >= 0.6
    leaks = {(row["query_id"], row["train_id"]) for row in result.summary["leaks"]}
    assert (text["query0"], text["dup"]) in leaks
    assert all(row["query_id"] == text["query0"] for row in result.summary["leaks"])


def test_text_review_shows_decoded_text(text: dict[str, Any], project: Path) -> None:
    report = artifacts(project, text["result"].run_id, "report.md").read_text()
    assert text["text0"] in report  # the leak's query and training row, as words
    assert "[PAD]" not in report
    flagged = json.loads(artifacts(project, text["result"].run_id, "tables/flagged_train.json")
                         .read_text())  # fmt: skip
    assert "text" in flagged["columns"]
    assert any("t0w" in str(row) or "t1w" in str(row) for row in flagged["data"])


def test_text_model_loads_with_its_tokenizer(text: dict[str, Any], project: Path) -> None:
    model, ref = load_model_uri(f"models:/bert-topics/{text['version']}", tracking_uri=uri(project))
    assert isinstance(model, TransformersModel) and ref is not None
    assert tokenizer_of(model).decode([4, 5]) == text["tokenizer"].decode([4, 5])
    assert not model.training


def test_text_model_on_dask_shards_scores_as_in_process(
    text: dict[str, Any], project: Path
) -> None:
    """The sharded path on Dask worker processes (the model, its tokenizer with it, is pickled
    to them) scores what the in-process run scored, with the same verdict."""
    pytest.importorskip("prefect_dask")
    result = run(
        project, "bert-topics", text["version"], text["data"], task={"output": "logits"},
        runner="dask", dask={"workers": 1}, cache=False,
        sharding={"size": 150, "dir": "outputs/shards-bert"},
    )  # fmt: skip
    got, want = (
        np.load(artifacts(project, r.run_id, "scores/pairwise.npy"))
        for r in (result, text["result"])
    )
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-3 * np.abs(want).max())
    assert result.verdict == text["result"].verdict


def test_text_cli_run(text: dict[str, Any], project: Path, capsys) -> None:
    params = project / "params-bert.yaml"
    params.write_text(yaml.safe_dump({
        "data": text["data"], "model": {"name": "bert-topics", "version": text["version"]},
        "mlflow": {"tracking_uri": "sqlite:///mlruns/mlflow.db", "experiment": "hf"},
        "task": {"output": "logits"}, "threads": 1,
    }))  # fmt: skip
    assert main(["run", "--params", str(params)]) in (0, 1)
    assert "leak" in capsys.readouterr().out.lower()


def test_a_model_needing_remote_code_exits_2_with_one_line(
    text: dict[str, Any], project: Path, capsys
) -> None:
    """A registered transformers model whose config names custom code: exit 2, one line naming
    auto_map, no MLflow run left RUNNING."""
    client = get_client(uri(project))
    src = client.get_model_version_download_uri("bert-topics", str(text["version"]))
    custom = project / "custom-code-model"
    shutil.copytree(src.removeprefix("file://"), custom)
    config_path = custom / "model" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "auto_map": {"AutoModel": "mine.Model"}}))
    client.create_registered_model("bert-custom")
    version = client.create_model_version("bert-custom", source=str(custom)).version
    params = project / "params-custom.yaml"
    params.write_text(yaml.safe_dump({
        "data": text["data"], "model": {"name": "bert-custom", "version": int(version)},
        "mlflow": {"tracking_uri": "sqlite:///mlruns/mlflow.db", "experiment": "hf"},
        "task": {"output": "logits"}, "threads": 1,
    }))  # fmt: skip
    capsys.readouterr()
    assert main(["run", "--params", str(params)]) == 2
    err = capsys.readouterr().err
    assert "auto_map" in err and "trust_remote_code" in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    running = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], "attributes.status = 'RUNNING'"
    )
    assert running == []


# --------------------------------------------------------------------------- sequence (causal LM)
def chain_data(n: int, vocab: int, seed: int = 0) -> np.ndarray:
    """Sequences of 12 tokens from a Markov chain: each token is followed by one of two (v + 1
    or v + 3, mod vocab), so the model can learn it and sequences rarely repeat."""
    rng = np.random.default_rng(seed)
    x = np.zeros((n, 12), dtype=np.int64)
    x[:, 0] = rng.integers(0, vocab, size=n)
    for t in range(1, 12):
        x[:, t] = (x[:, t - 1] + rng.choice([1, 3], size=n)) % vocab
    return x + len(SPECIAL)


def test_causal_lm_sequence_flags_random_rows(prefect_harness: Path, project: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    words = [f"n{j}" for j in range(16)]
    tokenizer = word_tokenizer(words)
    x = chain_data(280, len(words))
    tr, va, qu = np.arange(0, 200), np.arange(200, 250), np.arange(250, 280)
    rng = np.random.default_rng(2)
    x_tr = x[tr].copy()
    planted = rng.choice(len(tr), size=10, replace=False)  # 5% rows of random tokens
    x_tr[planted] = rng.integers(len(SPECIAL), len(SPECIAL) + len(words), size=(10, 12))

    def shifted(ids: np.ndarray) -> np.ndarray:
        y = np.full_like(ids, -100)
        y[:, :-1] = ids[:, 1:]
        return y

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(SPECIAL) + len(words), n_positions=16, n_embd=32, n_layer=2, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=2, eos_token_id=3,
    )  # fmt: skip
    model = GPT2LMHeadModel(config)
    ids, labels = torch.from_numpy(x_tr), torch.from_numpy(shifted(x_tr))

    def lm_loss(out: Any) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(
            out.logits.flatten(0, 1), labels.flatten(), ignore_index=-100
        )

    # 80 steps: clean rows at the chain's entropy (loss ~0.65, ln 2 = 0.69), not memorised;
    # trained on until it memorises the sequences (150, 300 steps) the random rows rank at
    # chance or below (see the README)
    fit(model, {"input_ids": ids}, lm_loss, 80)
    version = log_hf(project, "gpt2-count", model, tokenizer, "text-generation")
    data = save_splits(project, "count", {
        "train": {"x_input_ids": x_tr, "y": shifted(x_tr), "ids": tr},
        "val": {"x_input_ids": x[va], "y": shifted(x[va]), "ids": va},
        "query": {"x_input_ids": x[qu], "y": shifted(x[qu]), "ids": qu},
    })  # fmt: skip
    result = run(
        project, "gpt2-count", version, data, task={"kind": "sequence", "output": "logits"}
    )
    table = train_table(project, result)
    score = auroc(table, tr[planted])
    flagged = table.loc[table["flag_mislabel"], "id"].isin(tr[planted])
    print(f"flagged {len(flagged)}, of them planted {int(flagged.sum())} (of {len(planted)})")
    print(f"sequence (GPT-2, 5% random rows): self-influence AUROC {score:.3f}")
    assert score > 0.9, score
    assert flagged.sum() >= 0.6 * len(flagged) > 0  # chance precision 0.05
    for leak in result.summary["leaks"]:  # a leak only where a query repeats a training row
        assert (x_tr[tr == leak["train_id"]] == x[qu == leak["query_id"]]).all()
    report = artifacts(project, result.run_id, "report.md").read_text()
    assert "predicted next tokens: `n" in report  # decoded by the logged tokenizer
