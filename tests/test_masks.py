"""Masks, positions and cache edits against hand-checked small examples."""

import pytest
import torch

from splitinfer import kv, masks

T, F = True, False


def test_chain_mask_is_causal():
    assert masks.block_mask(masks.chain(3)).tolist() == [[T, F, F], [T, T, F], [T, T, T]]
    assert masks.is_chain_mask(masks.block_mask(masks.chain(4)))


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
    assert not masks.is_chain_mask(masks.block_mask(parents))


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


def filled_cache(n: int, layers=(0, 3)) -> kv.DynamicCache:
    """A cache whose entry j holds the value j in every slot, in the given layer slots only."""
    cache = kv.new_cache()
    values = torch.arange(n, dtype=torch.float32).view(1, 1, n, 1).expand(1, 2, n, 4).contiguous()
    for layer in layers:
        cache.update(values.clone(), values.clone() + 100, layer)
    return cache


def entries(cache, layer=3):
    return cache.layers[layer].keys[0, 0, :, 0].long().tolist()


def test_crop():
    cache = filled_cache(6)
    kv.crop(cache, 4)
    assert kv.length(cache) == 4 and entries(cache) == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        kv.crop(cache, 5)


def test_keep_non_contiguous_path():
    cache = filled_cache(8)  # 4 committed + a 4-node tree verified at 4..7
    kv.keep(cache, 4, [4, 6, 7])  # accepted path: root, then nodes 2 and 3 of the block
    assert entries(cache) == [0, 1, 2, 3, 4, 6, 7]
    assert entries(cache, 0) == [0, 1, 2, 3, 4, 6, 7]
    assert cache.layers[3].values[0, 1, :, 0].long().tolist() == [100, 101, 102, 103, 104, 106, 107]
    assert not cache.layers[1].is_initialized  # slots another process holds stay untouched


@pytest.mark.parametrize("start, indices", [(9, []), (4, [3]), (4, [8]), (4, [5, 5])])
def test_keep_rejects_bad_edits(start, indices):
    with pytest.raises(ValueError):
        kv.keep(filled_cache(8), start, indices)
