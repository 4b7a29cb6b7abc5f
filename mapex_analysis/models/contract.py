"""The model contract: what every project model (MAPEX, the dense ViT, every adapter) provides.

The names follow timm's, with timm's meanings:

* ``forward_features(x)``: tokens ``(B, T, D)`` after the final norm, ``num_prefix_tokens``
  prefix (CLS) tokens first;
* ``forward_head(tokens, pre_logits=False)``: the tokens pooled as the model declares
  (``pool``: ``"cls"`` or ``"mean"`` over the patch tokens); ``pre_logits=True`` stops before
  ``head``. Project models are headless (``head`` is the identity, timm's ``num_classes=0``),
  so both give the pooled features ``(B, D)``;
* ``forward(x)``: ``forward_head(forward_features(x))``, i.e. pooled features ``(B, D)``;
* ``forward_intermediates(x, indices=None, norm=False, intermediates_only=False)``: the
  tokens ``(B, T, D)`` after the blocks chosen by ``indices`` (timm's
  ``feature_take_indices``: ``None`` all, an int ``n`` the last ``n``, a list of indices,
  negative from the end), in block order; ``norm=True`` applies the final norm to them. It
  returns ``(final tokens, intermediates)``, or only the intermediates with
  ``intermediates_only=True``.

Unlike timm, ``x`` is a modality dict ``{name: (B, C, H, W)}`` in physical units (see
:mod:`mapex_analysis.modalities`) and the model declares which modalities it accepts. Plain timm
models (``timm/<name>`` sources) do not follow this contract; the operators and counters that
accept them say so.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, cast, runtime_checkable

from timm.models._features import feature_take_indices
from torch import Tensor, nn

from mapex_analysis.models.moe import MoEMLP

__all__ = [
    "FoundationModel",
    "is_moe",
    "is_moe_layer",
    "modalities_of",
    "moe_layers",
    "num_params",
    "take_indices",
]

Indices = int | Sequence[int] | None


@runtime_checkable
class FoundationModel(Protocol):
    """A project model (see the module docstring for the meaning of each member).

    Attributes:
        modalities: The modalities the model accepts, in model order.
        num_features: Width ``D`` of the pooled features.
        pool: ``"cls"`` or ``"mean"``.
        num_prefix_tokens: Prefix (CLS) tokens at the start of the token sequence.
        img_size: Square input size in pixels.
        patch_size: Patch size in pixels.
        blocks: The transformer blocks (what slimming and pruning act on).
    """

    modalities: tuple[str, ...]
    num_features: int
    pool: str
    num_prefix_tokens: int
    img_size: int
    patch_size: int

    @property
    def blocks(self) -> nn.ModuleList | nn.Sequential: ...

    def forward_features(self, x: Mapping[str, Tensor]) -> Tensor: ...

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor: ...

    def forward_intermediates(
        self,
        x: Mapping[str, Tensor],
        indices: Indices = None,
        norm: bool = False,
        intermediates_only: bool = False,
    ) -> Any: ...

    def forward(self, x: Mapping[str, Tensor]) -> Tensor: ...


def modalities_of(model: nn.Module) -> tuple[str, ...]:
    """The modalities a project model accepts (its :attr:`FoundationModel.modalities`).

    Raises:
        TypeError: for a module that declares none (a plain timm model, say).
    """
    mods = getattr(model, "modalities", None)
    if not mods:
        raise TypeError(
            f"{type(model).__name__} declares no modalities; it does not follow the model "
            "contract (build it with mapex_analysis.create_model)"
        )
    return tuple(mods)


def take_indices(depth: int, indices: Indices) -> list[int]:
    """Absolute block indices for ``forward_intermediates``, in block order (timm's rules).

    Args:
        depth: Number of blocks.
        indices: ``None`` (all), an int ``n`` (the last ``n``; ``1 <= n <= depth``) or indices
            (negative count from the end).

    Returns:
        Sorted, unique indices in ``[0, depth)``.

    Raises:
        IndexError: for an index, or a count, out of range (the range is named).
    """
    if isinstance(indices, Sequence) and not isinstance(indices, str):
        indices = list(indices)
    try:
        take, _ = feature_take_indices(depth, indices)
    except AssertionError as err:  # timm asserts; an index error is what callers expect
        raise IndexError(f"{err} (model depth {depth})") from None
    return sorted(set(take))


def is_moe_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a mixture-of-experts MLP: routed ``experts`` (a ModuleList) with
    one ``expert_groups`` label (modality or ``"shared"``) per expert, as
    :class:`~mapex_analysis.models.moe.MoEMLP` has (duck-typed, so counters accept other MoE
    layers of that shape)."""
    return isinstance(getattr(module, "experts", None), nn.ModuleList) and isinstance(
        getattr(module, "expert_groups", None), list | tuple
    )


def moe_layers(model: nn.Module) -> dict[str, MoEMLP]:
    """The mixture-of-experts MLPs of a model's blocks.

    Args:
        model: Any module; MAPEX models have :class:`~mapex_analysis.models.moe.MoEMLP` blocks.

    Returns:
        ``{"blocks.<i>.mlp": MoEMLP}`` in block order (empty for a model without experts).
    """
    blocks = getattr(model, "blocks", None)  # plain modules and some adapters have none
    if not isinstance(blocks, nn.ModuleList | nn.Sequential):
        return {}
    return {
        f"blocks.{i}.mlp": cast(MoEMLP, blk.mlp)
        for i, blk in enumerate(blocks)
        if is_moe_layer(getattr(blk, "mlp", nn.Identity()))
    }


def is_moe(model: nn.Module) -> bool:
    """Whether any block of ``model`` has a mixture-of-experts MLP."""
    return bool(moe_layers(model))


def num_params(module: nn.Module) -> int:
    """Number of parameters of ``module`` (every tensor, trainable or not)."""
    return sum(p.numel() for p in module.parameters())
