"""Selected patches of a preprocessed slide: read the per-slide .h5 and stream the pixels.

The .h5 written by ``isg preprocess`` holds ``coords`` int64 [M, 2] (level-0 x, y of the
selected global patches) with attrs ``patch_size`` (p, pixels at ``patch_level``),
``patch_level``, ``level0_patch_size``, ``mpp`` (at the read level) and ``local_size`` (q);
the root attrs ``slide_path`` and ``level0_mpp`` name the slide and its resolution. Global inputs are whole p-pixel patches, local
inputs their S x S grid of q-pixel sub-patches (S = p / q).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from isg.io import BATCH_SIZE, NUM_WORKERS


@dataclass
class PatchInfo:
    """What one preprocessed slide says about its selected patches."""

    h5_path: Path
    slide_path: Path | None
    coords: np.ndarray  # int64 [M, 2], level-0 (x, y)
    patch_size: int  # p, pixels at patch_level
    patch_level: int
    local_size: int  # q
    mpp: float | None  # um/px at level 0 (from the read-level mpp), None when unknown

    @property
    def grid(self) -> int:
        """S = p / q local patches per side."""
        return self.patch_size // self.local_size


def read_patch_info(h5_path: str | os.PathLike, slide_path: str | os.PathLike | None = None) -> PatchInfo:
    """Selected coords and patch geometry of ``h5_path``; ``slide_path`` overrides the root attr."""
    import h5py

    h5_path = Path(h5_path)
    if not h5_path.is_file():
        raise FileNotFoundError(f"patch file {h5_path}: no such file")
    try:
        with h5py.File(h5_path, "r") as f:
            if "coords" not in f:
                raise ValueError(f"patch file {h5_path}: no 'coords' dataset (not written by isg preprocess?)")
            dset = f["coords"]
            attrs = dict(dset.attrs)
            coords = np.asarray(dset[...], dtype=np.int64).reshape(-1, 2) if dset.size else np.zeros((0, 2), np.int64)
            stored_slide = f.attrs.get("slide_path")
            level0_mpp = f.attrs.get("level0_mpp")
    except OSError as exc:
        raise ValueError(f"patch file {h5_path}: not a readable HDF5 file ({exc})") from exc
    missing = [k for k in ("patch_size", "patch_level", "local_size") if k not in attrs]
    if missing:
        raise ValueError(f"patch file {h5_path}: 'coords' lacks attrs {', '.join(missing)}")
    p, q = int(attrs["patch_size"]), int(attrs["local_size"])
    if q <= 0 or p <= 0 or p % q:
        raise ValueError(f"patch file {h5_path}: patch_size {p} is not a positive multiple of local_size {q}")
    mpp = float(level0_mpp) if level0_mpp is not None and float(level0_mpp) > 0 else None
    if mpp is None and "mpp" in attrs and "level0_patch_size" in attrs and float(attrs["mpp"]) > 0:
        mpp = float(attrs["mpp"]) * p / float(attrs["level0_patch_size"])
    if slide_path is None and stored_slide is not None:
        stored_slide = stored_slide.decode() if isinstance(stored_slide, bytes) else str(stored_slide)
        slide_path = Path(stored_slide)
        if not slide_path.is_absolute() and not slide_path.exists():
            slide_path = h5_path.parent / slide_path
    return PatchInfo(h5_path, Path(slide_path) if slide_path is not None else None, coords, p, int(attrs["patch_level"]), q, mpp)


def open_patch_slide(info: PatchInfo, backend: str = "auto"):
    """Open the slide of ``info`` (with the mpp preprocess used, so slides without mpp metadata open)."""
    from isg.io import open_slide

    if info.slide_path is None:
        raise ValueError(f"patch file {info.h5_path}: no slide path (root attr 'slide_path' missing and none given)")
    return open_slide(info.slide_path, backend=backend, mpp=info.mpp)


def iter_patches(slide, coords: np.ndarray, size: int, level: int = 0, batch_size: int = BATCH_SIZE, device="cpu", num_workers: int = NUM_WORKERS) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """Batches ``(coords [B, 2], tiles uint8 [B, size, size, 3])`` of ``slide`` at ``coords`` (:func:`isg.io.iter_tiles`)."""
    from isg.io import iter_tiles

    yield from iter_tiles(slide, coords, size, level=level, batch_size=batch_size, device=device, num_workers=num_workers)


def split_local(tiles: torch.Tensor, local_size: int) -> torch.Tensor:
    """Global patches [B, p, p, 3] -> their local grid [B, S, S, q, q, 3] (S = p / q, row-major: [b, i, j] is rows i*q.., cols j*q..)."""
    b, p, _, c = tiles.shape
    s = p // local_size
    if s * local_size != p:
        raise ValueError(f"patch size {p} is not a multiple of local size {local_size}")
    return tiles.reshape(b, s, local_size, s, local_size, c).permute(0, 1, 3, 2, 4, 5)
