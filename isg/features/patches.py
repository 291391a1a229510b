"""Pixels of a slide's selected patches: open the slide a patch file names, split patches into local ones.

The patches themselves (coords, geometry, features) are a :class:`isg.data.patch_file.SlidePatches`;
global inputs are whole p-pixel patches (read with :func:`isg.io.iter_tiles` at the geometry's
``patch_level``), local inputs their S x S grid of q-pixel sub-patches (S = p / q, :func:`split_local`).
"""

from __future__ import annotations

import os

import torch

from isg.data.patch_file import SlidePatches


def open_patch_slide(patches: SlidePatches, backend: str = "auto", slide_path: str | os.PathLike | None = None):
    """Open the slide of ``patches`` (``slide_path`` overrides the recorded one) with the level-0 mpp preprocess
    used, so slides without mpp metadata open."""
    from isg.io import open_slide

    slide_path = slide_path if slide_path is not None else patches.slide_path
    if slide_path is None:
        raise ValueError(f"patch file {patches.slide_id}: no slide path (root attr 'slide_path' missing and none given)")
    return open_slide(slide_path, backend=backend, mpp=patches.slide_mpp)


def split_local(tiles: torch.Tensor, local_size: int) -> torch.Tensor:
    """Global patches [B, p, p, 3] -> their local grid [B, S, S, q, q, 3] (S = p / q, row-major: [b, i, j] is rows i*q.., cols j*q..)."""
    b, p, _, c = tiles.shape
    s = p // local_size
    if s * local_size != p:
        raise ValueError(f"patch size {p} is not a multiple of local size {local_size}")
    return tiles.reshape(b, s, local_size, s, local_size, c).permute(0, 1, 3, 2, 4, 5)
