"""Sparse masked updates: the trainable parts of CNS as modules with merge, and the storage
form of a mask (packed bits).

Training never touches a frozen weight: a layer's effective weight is
``W = W_prev + scatter(M, delta)`` (METHOD.md), so elements outside ``M`` are bit-identical
by construction, and an optimizer's state cannot move them.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SparseDeltaLinear", "DenseLinearUpdate", "masked_update", "RowDeltaEmbedding", "pack_mask", "unpack_mask"]


class SparseDeltaLinear(nn.Module):
    """A linear layer whose weight is ``base.weight + scatter(mask, delta)``; only ``delta``
    (one value per True element of ``mask``, in row-major order) is trainable."""

    def __init__(self, base: nn.Linear, mask: torch.Tensor):
        super().__init__()
        if mask.shape != base.weight.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} != weight shape {tuple(base.weight.shape)}")
        self.base = base
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)
        self.register_buffer("flat_index", mask.flatten().nonzero().squeeze(1).to(base.weight.device), persistent=False)
        self.delta = nn.Parameter(torch.zeros(self.flat_index.numel(), dtype=base.weight.dtype, device=base.weight.device))

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def effective_weight(self) -> torch.Tensor:
        flat = self.base.weight.flatten().index_add(0, self.flat_index, self.delta.to(self.base.weight.dtype))
        return flat.view_as(self.base.weight)

    def current_values(self) -> torch.Tensor:
        """The weight's current values at the masked elements (differentiable)."""
        return self.base.weight.flatten()[self.flat_index] + self.delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.effective_weight()
        return F.linear(x, weight.to(x.dtype), None if self.base.bias is None else self.base.bias.to(x.dtype))

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """Write the update into the base weight and return the plain base layer."""
        self.base.weight.copy_(self.effective_weight())
        return self.base


class DenseLinearUpdate(nn.Module):
    """Plain fine-tuning of a whole weight (a mask that is all True): the base weight itself
    is the trainable parameter, with the interface of :class:`SparseDeltaLinear`."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base = base
        base.weight.requires_grad_(True)
        self.register_buffer("flat_index", torch.arange(base.weight.numel(), device=base.weight.device), persistent=False)

    @property
    def delta(self) -> nn.Parameter:
        return self.base.weight

    def effective_weight(self) -> torch.Tensor:
        return self.base.weight

    def current_values(self) -> torch.Tensor:
        return self.base.weight.flatten()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x)

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        self.base.weight.requires_grad_(False)
        return self.base


def masked_update(base: nn.Linear, mask: torch.Tensor) -> nn.Module:
    """The trainable form of ``base`` for ``mask``: dense when the mask covers the whole weight
    (no scatter to pay for), sparse otherwise."""
    return DenseLinearUpdate(base) if bool(mask.all()) else SparseDeltaLinear(base, mask)


class RowDeltaEmbedding(nn.Module):
    """An embedding whose rows ``rows`` are replaced by trainable values; every other row is
    the frozen base weight, bit for bit."""

    def __init__(self, base: nn.Embedding, rows: list[int]):
        super().__init__()
        self.base = base
        base.weight.requires_grad_(False)
        self.register_buffer("rows", torch.tensor(rows, dtype=torch.long, device=base.weight.device), persistent=False)
        self.trainable_rows = nn.Parameter(base.weight.detach()[self.rows].clone())

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight.index_copy(0, self.rows, self.trainable_rows.to(self.base.weight.dtype))

    @property
    def num_embeddings(self) -> int:
        return self.base.num_embeddings

    @property
    def embedding_dim(self) -> int:
        return self.base.embedding_dim

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight, self.base.padding_idx)

    @torch.no_grad()
    def merge(self) -> nn.Embedding:
        self.base.weight[self.rows] = self.trainable_rows.to(self.base.weight.dtype)
        return self.base


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A boolean mask as packed bits (uint8, 8 elements a byte, row-major)."""
    return torch.from_numpy(np.packbits(mask.detach().cpu().flatten().numpy().astype(np.uint8)))


def unpack_mask(packed: torch.Tensor, shape: tuple[int, ...] | list[int]) -> torch.Tensor:
    """Inverse of :func:`pack_mask`."""
    count = int(np.prod(shape))
    bits = np.unpackbits(packed.cpu().numpy().astype(np.uint8), count=count)
    if bits.size != count:
        raise ValueError(f"packed mask holds {bits.size} elements, expected {count}")
    return torch.from_numpy(bits.astype(bool)).view(*shape)
