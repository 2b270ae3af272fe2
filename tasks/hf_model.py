"""Models logged with the ``mlflow.transformers`` flavour, loaded safely as torch modules.

What MLflow 3 writes by default (``save_pretrained=True``): ``MLmodel`` with
``flavors.transformers`` (``pipeline_model_type``: the model class, ``model_binary``: the folder
holding ``config.json`` and ``model.safetensors``, ``components``: e.g. ``tokenizer`` under
``components/tokenizer``). mirrorinf rebuilds the model itself, never through
``mlflow.transformers.load_model`` (which builds a pipeline and may fetch from the Hub):

- the model class must be one transformers ships (no ``auto_map`` / ``trust_remote_code``: a
  config that needs remote code is refused);
- files only (``local_files_only``): a model logged with ``save_pretrained=False`` (a reference
  to a Hub repository), a PEFT adapter or a base-model path is refused with the way out;
- weights from safetensors; pickled weights (``pytorch_model.bin``) only with
  ``model.allow_pickle``.

transformers is imported only here, when such a model is met (the ``hf`` extra).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mirrorinf.errors import ModelError

__all__ = ["TransformersModel", "decode_rows", "load_transformers", "token_ids", "tokenizer_of"]

logger = logging.getLogger(__name__)

EXTRA = "pip install 'mirrorinf[hf]'"


class TransformersModel(torch.nn.Module):
    """A transformers model as the engine calls it, with its tokenizer (None: not logged) kept
    beside it for the review (decoded text). ``forward`` passes everything to the model."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any = None, hf_task: str | None = None):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.hf_task = hf_task

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickled in another process (a Dask worker of the sharded path): register the
        attention the model was set to there too (transformers' registry is per process)."""
        super().__setstate__(state)
        config = getattr(self.model, "config", None)
        if getattr(config, "_attn_implementation", None) == VMAP_ATTENTION:
            _register_vmap_attention()


def tokenizer_of(model: Any) -> Any:
    """The tokenizer logged with a transformers model (None for any other model)."""
    return model.tokenizer if isinstance(model, TransformersModel) else None


def _transformers(what: str) -> Any:
    try:
        import transformers
    except ImportError:
        raise ModelError(
            f"{what} was logged with mlflow.transformers, which needs the transformers package: "
            f"{EXTRA}"
        ) from None
    return transformers


def _refuse_remote(flavor: dict[str, Any], what: str) -> None:
    """A model that is not in the artifacts themselves cannot be loaded offline."""
    if flavor.get("peft_adaptor"):
        raise ModelError(
            f"{what} is a PEFT adapter on a base model; mirrorinf does not load adapters: merge "
            "it (model.merge_and_unload()) and log the merged model with mlflow.transformers"
        )
    if not flavor.get("model_binary"):
        source = flavor.get("source_model_name") or flavor.get("local_base_model_path") or "?"
        raise ModelError(
            f"{what} holds no weights, only a reference to {source!r} (logged with "
            "save_pretrained=False or base_model_path); mirrorinf reads no Hub or outside "
            "path: log it again with mlflow.transformers.log_model(..., save_pretrained=True) "
            "(the default)"
        )


def _config(model_dir: Path, what: str) -> dict[str, Any]:
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise ModelError(f"{what}: no readable config.json in the logged model: {err}") from None
    if config.get("auto_map"):
        raise ModelError(
            f"{what}: its config names custom model code (auto_map), which would run code "
            "from the model store (trust_remote_code); mirrorinf never does: use a model class "
            "that transformers ships"
        )
    return config


def _weights_kind(model_dir: Path, what: str, allow_pickle: bool) -> bool:
    """True: safetensors; False: pickled weights (only when allowed)."""
    if any(model_dir.glob("*.safetensors")):
        return True
    if any(model_dir.glob("*.bin")):
        if not allow_pickle:
            raise ModelError(
                f"{what}: its weights are pickled (pytorch_model.bin); loading them unpickles "
                "and so can run arbitrary code. Save them as safetensors "
                "(model.save_pretrained(..., safe_serialization=True), the default) and log "
                "again, or if you trust the model store set model.allow_pickle: true"
            )
        logger.warning("%s: loading pickled weights (model.allow_pickle is true)", what)
        return False
    raise ModelError(f"{what}: no model weights (*.safetensors) in the logged model")


def _model_class(transformers: Any, flavor: dict[str, Any], config: dict[str, Any], what: str):
    name = flavor.get("pipeline_model_type") or (config.get("architectures") or [None])[0]
    cls = getattr(transformers, str(name), None) if name else None
    if cls is None or not issubclass(cls, transformers.PreTrainedModel):
        raise ModelError(
            f"{what}: model class {name!r} is not one transformers {transformers.__version__} "
            "ships; mirrorinf loads no custom model code (trust_remote_code)"
        )
    return cls


def _tokenizer(transformers: Any, local: Path, flavor: dict[str, Any], what: str) -> Any:
    """The logged tokenizer (None: none logged, or it cannot load without remote code)."""
    directory = local / "components" / "tokenizer"
    if "tokenizer" not in (flavor.get("components") or []) or not directory.is_dir():
        return None
    try:
        return transformers.AutoTokenizer.from_pretrained(
            str(directory), local_files_only=True, trust_remote_code=False
        )
    except Exception as err:  # display only: the review shows token ids instead
        logger.warning("%s: tokenizer not loaded (%s); the review shows token ids", what, err)
        return None


VMAP_ATTENTION = "mirrorinf_sdpa"


def _no_skip_mask(*args: Any, **kwargs: Any) -> Any:
    """transformers' SDPA mask, always built: its shortcut (no mask when nothing is padded)
    reads the mask's values, which vmap cannot batch (per-example gradients would loop)."""
    from transformers.masking_utils import sdpa_mask

    kwargs["allow_is_causal_skip"] = False
    kwargs["allow_is_bidirectional_skip"] = False
    return sdpa_mask(*args, **kwargs)


def _register_vmap_attention() -> None:
    """Register :data:`VMAP_ATTENTION` (SDPA with :func:`_no_skip_mask`) in this process."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    AttentionInterface.register(VMAP_ATTENTION, ALL_ATTENTION_FUNCTIONS["sdpa"])
    AttentionMaskInterface.register(VMAP_ATTENTION, _no_skip_mask)


def _vmap_friendly_attention(model: Any) -> None:
    """SDPA attention with an explicit mask (same numbers as sdpa / eager), so the engine's
    vmap batches per-example gradients; left as it was when this transformers cannot."""
    if getattr(model.config, "_attn_implementation", None) not in ("sdpa", "eager"):
        return
    try:
        _register_vmap_attention()
        model.set_attn_implementation(VMAP_ATTENTION)
    except Exception as err:  # older transformers, or a model without SDPA support
        logger.info("attention left as %s (%s)", model.config._attn_implementation, err)


def load_transformers(
    local: Path, flavor: dict[str, Any], what: str, allow_pickle: bool = False
) -> TransformersModel:
    """Rebuild a logged ``mlflow.transformers`` model from its files, in eval mode, float32."""
    _refuse_remote(flavor, what)
    model_dir = local / str(flavor["model_binary"])
    config = _config(model_dir, what)
    safetensors = _weights_kind(model_dir, what, allow_pickle)
    transformers = _transformers(what)
    cls = _model_class(transformers, flavor, config, what)
    try:
        model = cls.from_pretrained(
            str(model_dir),
            local_files_only=True,
            trust_remote_code=False,
            use_safetensors=safetensors,
        )
    except Exception as err:
        raise ModelError(f"{what}: cannot load the transformers model: {err}") from None
    if getattr(model.config, "use_cache", None):
        model.config.use_cache = False  # no key/value cache: only the logits are scored
    if any(p.is_floating_point() and p.dtype != torch.float32 for p in model.parameters()):
        model = model.float()  # influence in half precision would lose the small scores
    _vmap_friendly_attention(model)
    tokenizer = _tokenizer(transformers, local, flavor, what)
    return TransformersModel(model.eval(), tokenizer, flavor.get("task")).eval()


def token_ids(x: Any) -> tuple[np.ndarray, np.ndarray | None] | None:
    """(token ids [n, T], attention mask or None) when the inputs are token ids: one integer
    array, or the ``input_ids`` part of named inputs; else None."""

    def arr(v: Any) -> np.ndarray:
        return v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)

    if isinstance(x, dict):
        if "input_ids" not in x:
            return None
        ids, mask = arr(x["input_ids"]), x.get("attention_mask")
        mask = None if mask is None else arr(mask)
    else:
        ids, mask = arr(x), None
    if ids.dtype.kind not in "iu" or ids.ndim != 2:
        return None
    return ids, (mask if mask is not None and mask.shape == ids.shape else None)


class RowTexts:
    """Token rows as text (:func:`decode_rows`), decoded only for the rows indexed: the review
    shows a few dozen rows, and decoding every training row cost a tokenizer call and a string
    per row (minutes and hundreds of MB at 1M rows). ``fetch(positions)`` gives their
    (token ids, mask)."""

    def __init__(
        self,
        fetch: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray | None] | None],
        n: int,
        tokenizer: Any = None,
    ) -> None:
        self.fetch, self.n, self.tokenizer = fetch, n, tokenizer

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, (int, np.integer)):
            i = int(index) + (self.n if index < 0 else 0)
            if not 0 <= i < self.n:
                raise IndexError(f"row {index} of {self.n}")
            return self[np.array([i])][0]
        idx = np.arange(self.n)[index] if isinstance(index, slice) else np.asarray(index)
        got = self.fetch(idx.astype(np.int64))
        if got is None:
            raise ValueError("rows are not token ids")
        return decode_rows(got[0], got[1], self.tokenizer)


def decode_rows(
    ids: np.ndarray, mask: np.ndarray | None = None, tokenizer: Any = None, limit: int = 160
) -> np.ndarray:
    """Each row of token ids as text: decoded by the tokenizer (padding left out) or, without
    one, the ids themselves; ``limit`` characters at most. -100 (ignored label) shows as ``_``."""
    out = []
    pad = getattr(tokenizer, "pad_token_id", None)
    for i, row in enumerate(ids):
        keep = row if mask is None else row[mask[i] != 0]
        if tokenizer is not None:
            shown = [int(t) for t in keep if t >= 0 and t != pad]
            try:
                text = tokenizer.decode(shown)
            except Exception:  # an id outside the vocabulary: show the ids
                text = " ".join(map(str, shown))
        else:
            text = " ".join("_" if t < 0 else str(int(t)) for t in keep)
        out.append(text if len(text) <= limit else text[: limit - 3] + "...")
    return np.asarray(out, dtype=object)
