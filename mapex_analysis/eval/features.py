"""Frozen feature extraction with an on-disk cache.

:func:`extract_features` runs a model frozen (``eval()`` mode, ``torch.inference_mode``) on a
chosen modality subset (only those keys are fed: a model never sees a modality the task does
not have) and returns float32 numpy features per split, with the pooling declared:

* ``"cls"``: the CLS token of the final (normed) tokens;
* ``"mean"``: the mean of the final patch tokens (prefix tokens excluded);
* ``"patch"``: the final patch tokens ``(N, P, D)`` in raster order, averaged over the fed
  modalities token-by-token (a MAPEX model has one token per patch per modality), for the
  segmentation probe.

Prefix tokens (timm's convention): ``forward_features`` returns ``model.num_prefix_tokens``
tokens (CLS, then register / distillation tokens) before the patch tokens; a model that does not
declare ``num_prefix_tokens`` has one (a CLS token, as the project's token models). ``"mean"`` and
``"patch"`` drop exactly those; ``"cls"`` on a model without a CLS token (CROMA,
``num_prefix_tokens = 0``) is an error.

When the declared pool is the model's own ``model.pool``, the model's ``forward_head`` pools
(so any head norm the model applies is kept); otherwise the pooling above is applied to the
output of ``forward_features``.

Cache: one ``.npz`` file per split under ``cache_dir``, named by a hash of (model variant key,
data fingerprint, modalities, pool). The data fingerprint is a SHA-1 of the fed arrays and
labels, so a changed split never hits a stale cache. Writes are atomic (temporary file in the
same folder, then ``os.replace``): a killed run leaves either no file or a complete one.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from mapex_analysis.cache import ArrayCache
from mapex_analysis.modalities import validate_modalities
from mapex_analysis.ops.record import applied_ops, model_spec

__all__ = [
    "POOLS",
    "Features",
    "SplitFeatures",
    "as_arrays",
    "data_fingerprint",
    "extract_features",
    "model_fingerprint",
    "num_prefix_tokens",
    "patch_tokens",
    "pool_tokens",
]

logger = logging.getLogger(__name__)

Pool = Literal["cls", "mean", "patch"]
#: Pooling options of :func:`extract_features`.
POOLS: tuple[str, ...] = ("cls", "mean", "patch")
# 2: mean pooling drops ``num_prefix_tokens`` prefix tokens (version 1 always dropped one)
_CACHE_VERSION = 2


@dataclass(frozen=True)
class SplitFeatures:
    """Features of one data split.

    Attributes:
        X: float32 features, ``(N, D)`` (``cls``/``mean``) or ``(N, P, D)`` (``patch``).
        y: Labels of the split as the dataset gives them (``(N,)``, ``(N, K)`` or
            ``(N, H, W)``); empty ``(0,)`` when the data has no labels.
    """

    X: np.ndarray
    y: np.ndarray


@dataclass
class Features:
    """Frozen features of one model variant, per split.

    Attributes:
        splits: Split name -> :class:`SplitFeatures`.
        modalities: The modalities that were fed.
        pool: The declared pooling.
        model_key: The model variant key the cache is keyed by.
    """

    splits: dict[str, SplitFeatures]
    modalities: tuple[str, ...]
    pool: str
    model_key: str = field(default="")

    def __getitem__(self, split: str) -> SplitFeatures:
        """Features of ``split``.

        Raises:
            KeyError: naming the splits that were extracted.
        """
        try:
            return self.splits[split]
        except KeyError:
            raise KeyError(
                f"no features for split {split!r}; extracted splits: {', '.join(self.splits)}"
            ) from None

    @property
    def train(self) -> SplitFeatures:
        """The ``train`` split."""
        return self["train"]

    @property
    def val(self) -> SplitFeatures:
        """The ``val`` split."""
        return self["val"]

    @property
    def test(self) -> SplitFeatures:
        """The ``test`` split."""
        return self["test"]


#: Feature-extraction precision -> autocast dtype (``None``: plain float32).
_AUTOCAST: dict[str, torch.dtype | None] = {
    "fp32": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


def as_arrays(data: Any, modalities: Sequence[str]) -> dict[str, np.ndarray]:
    """The chosen modalities (and ``label``, if any) of a split as numpy arrays.

    Args:
        data: A dataset with an ``arrays()`` method (e.g. ``SynthEO``) or a mapping
            ``{modality: (N, C, H, W) array, "label": array}``.
        modalities: Modalities to keep.

    Returns:
        ``{modality: float32 (N, C, H, W)}`` plus ``"label"`` when present.

    Raises:
        TypeError: if ``data`` is neither.
        KeyError: naming the missing modality and the available ones.
        ValueError: if the arrays disagree on the number of samples.
    """
    if hasattr(data, "arrays") and callable(data.arrays):
        arrays = data.arrays()
    elif isinstance(data, Mapping):
        arrays = data
    else:
        raise TypeError(
            f"expected a dataset with .arrays() or a dict of arrays, got {type(data).__name__}"
        )
    available = [k for k in arrays if k != "label"]
    out: dict[str, np.ndarray] = {}
    for m in modalities:
        if m not in arrays:
            raise KeyError(f"modality {m!r} is not in the data; available: {', '.join(available)}")
        out[m] = np.ascontiguousarray(arrays[m], dtype=np.float32)
    if "label" in arrays:
        out["label"] = np.asarray(arrays["label"])
    lengths = {k: len(v) for k, v in out.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"arrays differ in number of samples: {lengths}")
    return out


def data_fingerprint(arrays: Mapping[str, np.ndarray]) -> str:
    """SHA-1 of the arrays' names, shapes, dtypes and bytes (sorted by name)."""
    h = hashlib.sha1()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}:{a.shape}:{a.dtype.str};".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def model_fingerprint(model: nn.Module) -> str:
    """A key for a model variant: its spec, applied operators and a SHA-1 of its weights."""
    h = hashlib.sha1()
    h.update(json.dumps(model_spec(model), sort_keys=True, default=str).encode())
    h.update(json.dumps(applied_ops(model) or None, sort_keys=True, default=str).encode())
    for name, t in model.state_dict().items():
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _batches(
    arrays: Mapping[str, np.ndarray],
    modalities: Sequence[str],
    bs: int,
    device: torch.device | None = None,
) -> Iterator:
    n = len(arrays[modalities[0]])
    for i in range(0, n, bs):
        yield {m: torch.from_numpy(arrays[m][i : i + bs]).to(device) for m in modalities}


def num_prefix_tokens(model: nn.Module) -> int:
    """Tokens before the patch tokens in ``model``'s token output (timm's convention).

    Returns:
        ``model.num_prefix_tokens`` when declared, else 1 (a CLS token).

    Raises:
        ValueError: if the declared value is not a non-negative integer.
    """
    value = getattr(model, "num_prefix_tokens", 1)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(
            f"{type(model).__name__}.num_prefix_tokens must be a non-negative int, got {value!r}"
        )
    return value


def _no_cls_token(name: str) -> ValueError:
    return ValueError(f"{name} has no CLS token (num_prefix_tokens = 0); use pool='mean'")


def pool_tokens(
    tokens: torch.Tensor, pool: str, prefix: int, *, name: str = "model"
) -> torch.Tensor:
    """Pool final tokens ``(B, prefix + N, D)`` into ``(B, D)``.

    Args:
        tokens: Prefix tokens first, then the patch tokens.
        pool: ``"cls"`` (token 0) or ``"mean"`` (mean of the patch tokens ``tokens[:, prefix:]``).
        prefix: Number of prefix tokens.
        name: Model name for error messages.

    Returns:
        ``(B, D)``.

    Raises:
        ValueError: for ``"cls"`` without prefix tokens, no patch tokens, or another pool.
    """
    if tokens.dim() != 3 or tokens.shape[1] <= prefix:
        raise ValueError(
            f"{name}: expected tokens (B, {prefix} prefix + N patch tokens, D), got "
            f"{tuple(tokens.shape)}"
        )
    if pool == "cls":
        if prefix < 1:
            raise _no_cls_token(name)
        return tokens[:, 0]
    if pool == "mean":
        return tokens[:, prefix:].mean(dim=1)
    raise ValueError(f"pool_tokens pools 'cls' or 'mean', got {pool!r}")


def patch_tokens(model: nn.Module, x: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Final patch tokens ``(B, P, D)`` in raster order, averaged over modalities per patch.

    Args:
        model: A token model with ``tokenize`` and ``encode``.
        x: ``{modality: (B, C, H, W)}`` in physical units.

    Returns:
        ``(B, P, D)`` tokens (the ``num_prefix_tokens`` prefix tokens dropped).

    Raises:
        TypeError: if the model has no ``tokenize``/``encode``.
        ValueError: if the modalities have different numbers of patch tokens.
    """
    if not (hasattr(model, "tokenize") and hasattr(model, "encode")):
        raise TypeError(
            f"pool='patch' needs a token model with tokenize/encode; "
            f"{type(model).__name__} has neither"
        )
    net: Any = model  # contract methods, not nn.Module attributes
    tokens, modality_index = net.tokenize(x)  # (B, N, D), (B, N)
    prefix = num_prefix_tokens(model)
    out = net.encode(tokens, modality_index)[:, prefix:]  # drop prefix tokens -> (B, N, D)
    groups = [out[:, modality_index[0] == m] for m in torch.unique(modality_index[0])]
    sizes = {g.shape[1] for g in groups}
    if len(sizes) != 1:
        raise ValueError(f"modalities have different numbers of patch tokens: {sorted(sizes)}")
    return torch.stack(groups, dim=0).mean(dim=0)  # (B, P, D)


def _pooled(model: nn.Module, x: Mapping[str, torch.Tensor], pool: str) -> torch.Tensor:
    if pool == "patch":
        return patch_tokens(model, x)
    own_pool = getattr(model, "pool", None)
    if not hasattr(model, "forward_features"):
        if pool != own_pool:
            raise ValueError(
                f"{type(model).__name__} returns {own_pool!r}-pooled features only; "
                f"pool={pool!r} is not available"
            )
        return model(x)
    net: Any = model
    tokens = net.forward_features(x)  # (B, prefix + N, D)
    if pool == own_pool:
        return net.forward_head(tokens, pre_logits=True)
    return pool_tokens(tokens, pool, num_prefix_tokens(model), name=type(model).__name__)


def _split_inputs(data: Any) -> dict[str, Any]:
    """``{split name: data}`` from one split or a mapping of splits."""
    if isinstance(data, Mapping) and not all(isinstance(v, np.ndarray) for v in data.values()):
        return dict(data)
    return {str(getattr(data, "split", "data")): data}


def extract_features(
    model: nn.Module,
    data: Any,
    *,
    modalities: Sequence[str],
    pool: Pool | None = None,
    batch_size: int = 64,
    cache_dir: str | Path | None = None,
    cache_key: str | None = None,
    precision: str = "fp32",
) -> Features:
    """Frozen features of ``model`` on the chosen modalities of one or several splits.

    Args:
        model: A model following the registry contract (``forward_features`` /
            ``forward_head``, ``tokenize`` / ``encode`` for ``pool="patch"``).
        data: One split (a dataset with ``arrays()`` such as ``SynthEO``, or a dict of arrays)
            or a mapping ``{split name: split}``. A single dataset is stored under its
            ``split`` attribute (``"data"`` when it has none).
        modalities: Modalities to feed (only these keys reach the model).
        pool: ``"cls"``, ``"mean"`` or ``"patch"``; default: ``model.pool``.
        batch_size: Samples per forward pass.
        cache_dir: Folder for the feature cache; ``None`` disables caching.
        cache_key: Key of the model variant (e.g. ``"mapex_tiny|prune=sar"``); default: a
            fingerprint of the model's spec, applied operators and weights.
        precision: ``fp32``, or ``bf16`` / ``fp16`` to run the forward passes under
            ``torch.autocast`` on the model's device (features are stored as float32; the
            precision is part of the cache key).

    Returns:
        :class:`Features` with one :class:`SplitFeatures` per split.

    Raises:
        ValueError: for an unknown pool, a bad batch size or modality selection, or
            ``pool="cls"`` on a model without a CLS token (``num_prefix_tokens = 0``).
        KeyError: if a split lacks a requested modality.
    """
    allowed = getattr(model, "modalities", None)
    modalities = validate_modalities(modalities, allowed)
    pool = pool or getattr(model, "pool", None)
    if pool not in POOLS:
        raise ValueError(f"unknown pool {pool!r}; valid: {', '.join(POOLS)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if precision not in _AUTOCAST:
        raise ValueError(f"unknown precision {precision!r}; valid: {', '.join(_AUTOCAST)}")
    if pool == "cls" and getattr(model, "pool", None) != "cls" and num_prefix_tokens(model) == 0:
        raise _no_cls_token(type(model).__name__)  # before any data is read
    model_key = cache_key or (model_fingerprint(model) if cache_dir is not None else "")
    out: dict[str, SplitFeatures] = {}
    was_training = model.training
    # batches go where the model's weights are (a model training on a GPU, say)
    device = next((p.device for p in model.parameters()), None)
    model.eval()
    try:
        for split, split_data in _split_inputs(data).items():
            arrays = as_arrays(split_data, modalities)
            label = arrays.pop("label", np.zeros(0, dtype=np.int64))
            meta: dict[str, Any] = {}
            cache = None
            if cache_dir is not None:
                meta = {
                    "version": _CACHE_VERSION,
                    "model": model_key,
                    "data": data_fingerprint({**arrays, "label": label}),
                    "modalities": list(modalities),
                    "pool": pool,
                    **({"precision": precision} if precision != "fp32" else {}),
                }
                cache = ArrayCache(cache_dir)
                hit = cache.load(meta, "features")
                if hit is not None:
                    logger.info("features for split %r from cache %s", split, cache.folder)
                    out[split] = SplitFeatures(hit["X"], hit["y"])
                    continue
            chunks = []
            dtype = _AUTOCAST[precision]
            dev_type = device.type if device is not None else "cpu"
            with (
                torch.inference_mode(),
                torch.autocast(dev_type, dtype=dtype or torch.float32, enabled=dtype is not None),
            ):
                for x in _batches(arrays, modalities, batch_size, device):
                    chunks.append(_pooled(model, x, pool).float().cpu().numpy())
            feats = SplitFeatures(np.concatenate(chunks, axis=0).astype(np.float32), label)
            logger.info("extracted %s features for split %r", feats.X.shape, split)
            if cache is not None:
                cache.save(meta, {"X": feats.X, "y": feats.y}, "features")
            out[split] = feats
    finally:
        model.train(was_training)
    return Features(out, modalities, pool, model_key)
