"""The best-scored tiles of a slide's scoring pass, kept in one preallocated block (``isg predict``).

Every selection rule keeps the top of the score order, so the tiles a slide will encode are, as far as
they fit, the best-scored ones seen while scoring. :class:`TileArena` is the ``on_tiles`` hook of
:func:`isg.pipeline.preprocess.preprocess_patches` that keeps them: one uint8 block of ``capacity``
tile slots (``max_bytes`` of them, and no more than the selection rule can keep of the stream's tiles:
``most_kept``; allocated once; pages are touched only as slots fill), the scores and
level-0 (x, y) of its slots in two arrays, and per batch one partition that lets the batch's tiles that
are among the best seen so far replace the worst slots. Nothing is allocated per tile (no Python heap,
no per-tile tensor: copying tiles one by one into fresh tensors made the kernel's page faults cost as much
as the work). :meth:`TileArena.slots_of` finds the selected patches held; the others are read again.
"""

from __future__ import annotations

import numpy as np
import torch


class TileArena:
    """Up to ``max_bytes`` of the highest-scored tiles of a stream of ``(coords [B, 2], tiles [B, p, p, 3], scores [B])``."""

    def __init__(self, max_bytes: float):
        self.max_bytes = float(max_bytes)
        self.block: torch.Tensor | None = None  # uint8 [K, p, p, 3], on the tiles' device
        self.scores = np.zeros(0)  # float64 [K]; -inf for an empty slot
        self.keys = np.zeros((0, 2), np.int64)  # [K, 2] level-0 (x, y) of each slot
        self.filled = 0

    @property
    def capacity(self) -> int:
        return len(self.scores)

    @property
    def nbytes(self) -> int:
        """Bytes of the slots filled (the block's pages in use)."""
        return 0 if self.block is None else self.filled * int(np.prod(self.block.shape[1:]))

    def _allocate(self, tiles: torch.Tensor, most_kept: int | None) -> None:
        capacity = int(self.max_bytes // max(1, tiles[0].numel()))
        if most_kept is not None:  # no slot for a tile that cannot be selected
            capacity = min(capacity, int(most_kept))
        self.block = torch.empty((capacity, *tiles.shape[1:]), dtype=torch.uint8, device=tiles.device)
        self.scores = np.full(capacity, -np.inf)
        self.keys = np.zeros((capacity, 2), np.int64)

    def __call__(self, coords, tiles: torch.Tensor, scores, most_kept: int | None = None) -> None:
        """Keep the best of this batch; ``most_kept``: at most how many of the stream's tiles will be selected
        (sizes the block on the first batch)."""
        tiles, scores = torch.as_tensor(tiles), np.asarray(scores, np.float64).reshape(-1)
        coords = np.asarray(coords, np.int64).reshape(-1, 2)
        if not len(scores):
            return
        if self.block is None:
            self._allocate(tiles, most_kept)
        if not self.capacity:
            return
        free = min(self.capacity - self.filled, len(scores))  # empty slots take the first tiles of the batch
        self._put(np.arange(self.filled, self.filled + free), np.arange(free), coords, tiles, scores)
        self.filled += free
        if free < len(scores):  # the rest compete with the slots: the K best of slots + batch stay
            candidates = np.concatenate([self.scores, scores[free:]])  # [K + r]
            best = np.argpartition(-candidates, self.capacity - 1)[:self.capacity]
            entering = best[best >= self.capacity] - self.capacity + free  # batch rows
            leaving = np.setdiff1d(np.arange(self.capacity), best[best < self.capacity])  # slots, as many
            self._put(leaving, entering, coords, tiles, scores)

    def _put(self, slots: np.ndarray, rows: np.ndarray, coords, tiles: torch.Tensor, scores: np.ndarray) -> None:
        for slot, row in zip(slots.tolist(), rows.tolist()):  # tile by tile into its slot: nothing allocated
            self.block[slot].copy_(tiles[row])
        self.scores[slots], self.keys[slots] = scores[rows], coords[rows]

    def slots_of(self, coords) -> np.ndarray:
        """int64 [M]: the slot holding each level-0 (x, y) of ``coords`` [M, 2], -1 where none does."""
        coords = np.asarray(coords, np.int64).reshape(-1, 2)
        out = np.full(len(coords), -1, np.int64)
        if not self.filled or not len(coords):
            return out
        held = np.flatnonzero(np.isfinite(self.scores))
        width = int(max(self.keys[held, 0].max(), coords[:, 0].max())) + 1
        keys = self.keys[held, 1] * width + self.keys[held, 0]  # one int per (x, y)
        order = np.argsort(keys)
        wanted = coords[:, 1] * width + coords[:, 0]
        at = np.clip(np.searchsorted(keys[order], wanted), 0, len(keys) - 1)
        found = keys[order][at] == wanted
        out[found] = held[order][at][found]
        return out

    def release(self) -> None:
        """Free the block (the tiles held are gone; :meth:`slots_of` finds none)."""
        self.block, self.scores, self.keys, self.filled = None, np.zeros(0), np.zeros((0, 2), np.int64), 0

    def gather(self, slots: np.ndarray, out: torch.Tensor | None = None) -> torch.Tensor:
        """uint8 [len(slots), p, p, 3]: the tiles in ``slots`` (into ``out`` when given, a reused buffer)."""
        index = torch.as_tensor(np.asarray(slots, np.int64), device=self.block.device)
        if out is None:
            return self.block.index_select(0, index)
        return torch.index_select(self.block, 0, index, out=out[:len(slots)])
