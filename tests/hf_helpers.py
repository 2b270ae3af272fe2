"""A word-level tokenizer for the tests of HuggingFace transformers models (test_hf_model,
test_transformers_e2e): built offline from a word list, no download."""

from __future__ import annotations

from typing import Any

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]


def word_tokenizer(words: list[str]) -> Any:
    """A word-level tokenizer over ``SPECIAL + words`` (tokenizers, wrapped for transformers)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIAL + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
        sep_token="[SEP]",
    )  # fmt: skip
