"""Sparse masked updates: only masked elements can move; packed masks round-trip."""

import torch
from torch import nn

from cns.sparse import RowDeltaEmbedding, SparseDeltaLinear, pack_mask, unpack_mask


def test_pack_unpack_round_trip_odd_sizes():
    generator = torch.Generator().manual_seed(0)
    for shape in [(1, 1), (3, 5), (7, 13)]:
        mask = torch.rand(shape, generator=generator) > 0.5
        packed = pack_mask(mask)
        assert packed.dtype == torch.uint8 and packed.numel() == (mask.numel() + 7) // 8
        assert torch.equal(unpack_mask(packed, shape), mask)


def test_sparse_delta_linear_trains_only_masked_elements():
    torch.manual_seed(0)
    base = nn.Linear(4, 3, bias=False)
    before = base.weight.detach().clone()
    mask = torch.zeros(3, 4, dtype=torch.bool)
    mask[0, 1] = mask[2, 3] = True
    layer = SparseDeltaLinear(base, mask)
    assert torch.equal(layer(torch.ones(2, 4)), nn.functional.linear(torch.ones(2, 4), before))
    optimizer = torch.optim.Adam(layer.parameters(), lr=0.1)
    for _ in range(3):
        layer(torch.randn(5, 4)).pow(2).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["delta"]
    merged = layer.merge()
    assert merged is base
    changed = merged.weight != before
    assert torch.equal(changed, mask)  # moved exactly inside the mask
    assert torch.equal(merged.weight[~mask], before[~mask])  # bit-identical outside


def test_row_delta_embedding_trains_only_its_rows():
    torch.manual_seed(0)
    base = nn.Embedding(6, 3)
    before = base.weight.detach().clone()
    embedding = RowDeltaEmbedding(base, [4])
    optimizer = torch.optim.Adam(embedding.parameters(), lr=0.1)
    for _ in range(3):
        embedding(torch.tensor([[1, 4, 5]])).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    merged = embedding.merge()
    assert not torch.equal(merged.weight[4], before[4])
    rows = [0, 1, 2, 3, 5]
    assert torch.equal(merged.weight[rows], before[rows])
