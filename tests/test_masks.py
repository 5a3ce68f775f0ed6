"""Masks and positions against hand-checked small examples (cache edits: test_hf_contract.py)."""

import pytest
import torch

from splitinfer import masks

T, F = True, False


def test_chain_mask_is_causal():
    assert masks.block_mask(masks.chain(3)).tolist() == [[T, F, F], [T, T, F], [T, T, T]]
    assert torch.equal(masks.block_mask(masks.chain(4)), masks.causal(4))


def test_tree_mask_and_positions():
    # root r(0) with children a(1), b(2); a has child c(3); b has child d(4)
    #        r
    #      /   \
    #     a     b
    #     |     |
    #     c     d
    parents = [-1, 0, 0, 1, 2]
    assert masks.block_mask(parents).tolist() == [
        [T, F, F, F, F],
        [T, T, F, F, F],
        [T, F, T, F, F],
        [T, T, F, T, F],
        [T, F, T, F, T],
    ]
    assert masks.depths(parents) == [0, 1, 1, 2, 2]
    assert masks.positions(10, parents).tolist() == [[10, 11, 11, 12, 12]]


def test_several_roots():
    assert masks.block_mask([-1, -1, 1]).tolist() == [[T, F, F], [F, T, F], [F, T, T]]


def test_parents_must_point_backwards():
    with pytest.raises(ValueError):
        masks.block_mask([-1, 2, 0])
    with pytest.raises(ValueError):
        masks.depths([0])


def test_full_mask_and_additive():
    full = masks.full_mask(2, masks.block_mask([-1, -1]))
    assert full.tolist() == [[T, T, T, F], [T, T, F, T]]
    add = masks.additive(full, torch.float32)
    assert add.shape == (1, 1, 2, 4)
    assert add[0, 0, 0, :3].eq(0).all() and add[0, 0, 0, 3] == torch.finfo(torch.float32).min



@pytest.mark.parametrize("q", [1, 2, 7])
def test_causal_is_the_block_mask_of_a_chain(q):
    assert torch.equal(masks.causal(q), masks.block_mask(masks.chain(q)))
