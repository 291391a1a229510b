"""isg.pipeline.tile_arena: the best-scored tiles of the scoring pass in one preallocated block."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from isg.pipeline.tile_arena import TileArena


@pytest.mark.parametrize("budget_tiles, n, batch", [(1, 11, 4), (3, 11, 4), (7, 11, 4), (5, 23, 7), (23, 23, 5), (40, 17, 3), (0, 5, 2)])
def test_keeps_the_best_scored_tiles_within_budget(budget_tiles, n, batch):
    rng = np.random.default_rng(budget_tiles + n)
    tiles = torch.from_numpy(rng.integers(0, 255, (n, 5, 5, 3), dtype=np.uint8))
    coords = np.stack([np.arange(n) * 10, np.arange(n) % 3], axis=1)
    scores = rng.permutation(n).astype(float)
    arena = TileArena(max_bytes=budget_tiles * tiles[0].numel() + 7)  # a partial slot does not count
    for start in range(0, n, batch):  # batches as the reader streams them
        chunk = tiles[start:start + batch].clone()
        arena(coords[start:start + batch], chunk, scores[start:start + batch])
        chunk.zero_()  # the reader reuses its buffer: kept tiles are copies
    kept = min(budget_tiles, n)
    assert arena.capacity == budget_tiles and arena.filled == kept and arena.nbytes == kept * tiles[0].numel()
    slots = arena.slots_of(coords)  # [n]
    best = np.argsort(-scores)[:kept]
    assert set(np.flatnonzero(slots >= 0)) == set(best)
    if kept:
        np.testing.assert_array_equal(arena.gather(slots[best]).numpy(), tiles[best].numpy())
        out = torch.full((kept + 2, 5, 5, 3), 7, dtype=torch.uint8)  # a reused buffer, larger than needed
        np.testing.assert_array_equal(arena.gather(slots[best], out=out).numpy(), tiles[best].numpy())
    assert (arena.slots_of([[999, 999], [10, 0]]) == -1).all()  # never seen; (10, 0) is not a tile's (x, y)
    arena.release()  # its memory goes; nothing is held any more
    assert arena.block is None and arena.nbytes == 0 and (arena.slots_of(coords) == -1).all()


def test_no_tiles_and_unknown_coords():
    arena = TileArena(1 << 20)
    arena(np.zeros((0, 2), np.int64), torch.zeros(0, 4, 4, 3, dtype=torch.uint8), np.zeros(0))
    assert arena.filled == 0 and (arena.slots_of([[0, 0]]) == -1).all() and arena.slots_of(np.zeros((0, 2))).shape == (0,)


@pytest.mark.parametrize("share, n, batch", [(0.25, 13, 4), (0.1587, 101, 16), (0.5, 9, 9)])
def test_no_slot_the_rule_cannot_fill(share, n, batch):
    """With the rule's most_kept, the block holds only as many tiles as the rule selects: the selected ones."""
    from isg.select import SelectionRule, select

    rule = SelectionRule("rank", share=share)
    rng = np.random.default_rng(n)
    tiles = torch.from_numpy(rng.integers(0, 255, (n, 3, 3, 3), dtype=np.uint8))
    coords = np.stack([np.arange(n), np.zeros(n, np.int64)], axis=1)
    scores = rng.normal(size=n)
    arena = TileArena(1 << 30)
    for start in range(0, n, batch):
        arena(coords[start:start + batch], tiles[start:start + batch], scores[start:start + batch], most_kept=rule.most_kept(n))
    keep = select(scores, rule).keep
    assert arena.capacity == arena.filled == keep.sum() == rule.most_kept(n)
    slots = arena.slots_of(coords)
    np.testing.assert_array_equal(slots >= 0, keep)
    np.testing.assert_array_equal(arena.gather(slots[keep]).numpy(), tiles[keep].numpy())


def test_preprocess_sizes_the_arena_to_what_its_rule_keeps(tmp_path):
    """preprocess_patches tells the arena how many tiles its rule can keep: the block holds exactly the selected
    patches (Shannon's natural rule keeps a share of them), none read again."""
    from isg.io.synth import pyramid, render_slide, write_pyramid_tiff
    from isg.pipeline.preprocess import preprocess_patches

    image, _, _ = render_slide(np.random.default_rng(3), 700, 500, {"density": 0.6, "nuclei_size": 0.5, "stain": 0.5,
                                                                    "tissue_fraction": 0.6}, mpp=0.5, artefacts=False)
    path = tmp_path / "s.tif"
    write_pyramid_tiff(path, pyramid(image, 64, 4), 0.5, tile=64)
    arena = TileArena(1 << 30)
    patches, _ = preprocess_patches(path, patch_size=64, local_size=16, num_workers=0, on_tiles=arena)
    selected = patches.coords  # [M, 2] level-0
    assert 0 < len(selected) < patches.n_tissue
    assert arena.capacity == arena.filled == len(selected)
    assert (arena.slots_of(selected) >= 0).all()
