"""``isg extract`` (wiring only): autoencoder features of the selected patches of each slide.

For every selected global patch (``coords`` of the slide's .h5, p pixels at ``patch_level``):

* ``features`` float32 [M, d_g]: the global encoder on the patch resized to its resolution
  (CLAM/TRIDENT-style dataset next to ``coords``, same order);
* ``local_features`` float16 [M, S, S, d_l]: the local encoder on each q-pixel sub-patch
  (S = p / q, [m, i, j] = rows i*q.., cols j*q..), resized to its resolution.

The .h5 is updated atomically (copied to a temp file, datasets added, renamed over the
original); slides that already have both datasets are skipped unless ``overwrite``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from isg.features.autoencoder import Autoencoder, tiles_to_input
from isg.features.patches import iter_patches, open_patch_slide, read_patch_info, split_local
from isg.io import BATCH_SIZE, NUM_WORKERS
from isg.pipeline.cohort import DONE, FAILED, SKIPPED, run_cohort
from isg.utils import atomic_path

log = logging.getLogger(__name__)

WRITTEN = DONE  # the cohort runner's status words, one set for every command
MAX_ENCODE_BATCH = 1024  # local sub-patches encoded per call


@dataclass
class ExtractResult:
    h5_path: str
    status: str  # "done" (WRITTEN) | "skipped" | "failed"
    n_patches: int = 0
    seconds: float = 0.0
    error: str | None = None
    n_read: int = 0  # patches read from the slide (the rest came from memory)


@torch.inference_mode()
def encode_tiles(ae: Autoencoder, tiles: torch.Tensor, device, max_batch: int = MAX_ENCODE_BATCH, amp: bool = False) -> torch.Tensor:
    """Features float32 [B, d] (on CPU) of uint8 tiles [B, H, W, 3], resized to ``ae.resolution``.

    ``amp``: bfloat16 autocast on CUDA (faster, features differ by ~1e-2 relative).
    """
    device = torch.device(device)
    out = []
    for i in range(0, len(tiles), max_batch):
        x = tiles_to_input(tiles[i:i + max_batch], ae.resolution, device)  # [b, 3, r, r]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
            out.append(ae.encode(x).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, ae.d)


def _has_features(h5_path: Path, local: bool) -> bool:
    import h5py

    with h5py.File(h5_path, "r") as f:
        return "features" in f and (not local or "local_features" in f)


def encoder_attrs(ae: Autoencoder, role: str) -> dict:
    """Attrs of a ``features`` / ``local_features`` dataset: which encoder made it and what it was trained with
    (``extractor_size``, and ``loss_terms``, ``lpips_backbone`` from the checkpoint's training record)."""
    from isg.features.autoencoder import extractor_size

    attrs = {"encoder": f"isg-autoencoder-{role}", "d": ae.d, "resolution": ae.resolution, "config": json.dumps(ae.config),
             "extractor_size": extractor_size(ae.config)}
    objective = (getattr(ae, "extra", None) or {}).get("objective") or {}
    attrs.update({key: objective[key] for key in ("loss_terms", "lpips_backbone", "lpips_weight", "adv_weight") if key in objective})
    checkpoint = getattr(ae, "checkpoint_path", None)
    if checkpoint:
        attrs["checkpoint"] = str(checkpoint)
    return attrs


def extract_slide(
    h5_path: str | os.PathLike,
    slide_path: str | os.PathLike | None,
    global_ae: Autoencoder,
    local_ae: Autoencoder | None,
    batch_size: int = BATCH_SIZE,
    device: str | torch.device = "cpu",
    num_workers: int = NUM_WORKERS,
    overwrite: bool = False,
    backend: str = "auto",
    amp: bool = False,
    tiles: dict | None = None,
) -> ExtractResult:
    """Write ``features`` (and ``local_features`` unless ``local_ae`` is None) into ``h5_path``.

    ``slide_path`` None takes the slide from the .h5 root attr ``slide_path``; ``amp``: bfloat16 encoders on CUDA.
    ``tiles``: patches already in memory, uint8 [p, p, 3] keyed by level-0 ``(x, y)`` (``isg predict`` keeps
    them from the scoring pass); only the selected patches missing there are read from the slide.
    Returns an :class:`ExtractResult` (WRITTEN or SKIPPED, ``n_read`` patches read); errors raise.
    """
    h5_path = Path(h5_path)
    start = time.perf_counter()
    info = read_patch_info(h5_path, slide_path)
    if not overwrite and _has_features(h5_path, local_ae is not None):
        return ExtractResult(str(h5_path), SKIPPED, len(info.coords))
    device = torch.device(device)
    global_ae = global_ae.to(device).eval()
    local_ae = local_ae.to(device).eval() if local_ae is not None else None
    m, s = len(info.coords), info.grid
    features = np.zeros((m, global_ae.d), np.float32)  # [M, d_g]
    local = np.zeros((m, s, s, local_ae.d), np.float16) if local_ae is not None else None  # [M, S, S, d_l]
    offset, n_read = 0, 0
    with contextlib.ExitStack() as stack:
        if tiles is None:
            slide = stack.enter_context(open_patch_slide(info, backend)) if m else None
            batches = iter_patches(slide, info.coords, info.patch_size, info.patch_level, batch_size, device, num_workers) if m else ()
            n_read = m
        else:
            missing = np.asarray([c for c in info.coords if (int(c[0]), int(c[1])) not in tiles], np.int64).reshape(-1, 2)
            if len(missing):
                tiles = dict(tiles)
                with open_patch_slide(info, backend) as slide:
                    for coords, batch in iter_patches(slide, missing, info.patch_size, info.patch_level, batch_size, "cpu", num_workers):
                        tiles.update(((int(x), int(y)), tile.clone()) for (x, y), tile in zip(coords, batch))
            n_read = len(missing)
            batches = _batches_in_memory(info.coords, tiles, batch_size, device)
        for coords, batch in batches:  # [b, 2], uint8 [b, p, p, 3]
            b = len(coords)
            if not np.array_equal(coords, info.coords[offset:offset + b]):
                raise RuntimeError(f"{h5_path}: tile reader returned patches out of order at {offset}")
            features[offset:offset + b] = encode_tiles(global_ae, batch, device, amp=amp).numpy()
            if local_ae is not None:
                subs = split_local(batch, info.local_size).reshape(b * s * s, info.local_size, info.local_size, 3)
                local[offset:offset + b] = encode_tiles(local_ae, subs, device, amp=amp).reshape(b, s, s, local_ae.d).numpy().astype(np.float16)
            offset += b
    if offset != m:
        raise RuntimeError(f"{h5_path}: read {offset} of {m} patches")
    _write_features(h5_path, features, local, encoder_attrs(global_ae, "global"), encoder_attrs(local_ae, "local") if local_ae is not None else None)
    return ExtractResult(str(h5_path), WRITTEN, m, time.perf_counter() - start, n_read=n_read)


def _batches_in_memory(coords: np.ndarray, tiles: dict, batch_size: int, device):
    """``(coords [b, 2], uint8 [b, p, p, 3])`` batches of in-memory tiles, in ``coords`` order."""
    for i in range(0, len(coords), batch_size):
        chunk = coords[i:i + batch_size]
        yield chunk, torch.stack([tiles[(int(x), int(y))] for x, y in chunk]).to(device)


def _write_features(h5_path: Path, features: np.ndarray, local: np.ndarray | None, global_attrs: dict, local_attrs: dict | None) -> None:
    """Add/replace the feature datasets on a temp copy of ``h5_path`` and rename it over the original."""
    import h5py

    with atomic_path(h5_path) as tmp:
        shutil.copy2(h5_path, tmp)
        with h5py.File(tmp, "a") as f:
            for name, data, attrs in (("features", features, global_attrs), ("local_features", local, local_attrs)):
                if data is None:
                    continue
                if name in f:
                    del f[name]
                chunks = (min(len(data), 256), *data.shape[1:]) if len(data) else None
                dset = f.create_dataset(name, data=data, chunks=chunks)
                dset.attrs.update(attrs)


def extract_cohort(
    h5_paths,
    global_ae: Autoencoder,
    local_ae: Autoencoder | None,
    batch_size: int = BATCH_SIZE,
    device: str | torch.device = "cpu",
    num_workers: int = NUM_WORKERS,
    overwrite: bool = False,
    slide_paths: dict | None = None,
    progress: bool = True,
    amp: bool = False,
) -> list[ExtractResult]:
    """:func:`extract_slide` over many .h5 files with the cohort runner (:func:`isg.pipeline.cohort.run_cohort`,
    one slide at a time: the encoders hold the device); a slide that fails is logged, reported and skipped,
    slides that have their features already are skipped unless ``overwrite``.

    ``slide_paths`` optionally maps an .h5 path (or its stem, the slide id) to its slide.
    """
    slide_paths = slide_paths or {}
    h5_paths = [Path(p) for p in h5_paths]

    def extract_one(h5_path: Path) -> dict:
        slide_path = slide_paths.get(str(h5_path), slide_paths.get(h5_path.stem))
        result = extract_slide(h5_path, slide_path, global_ae, local_ae, batch_size, device, num_workers, True, amp=amp)
        return {"n_patches": result.n_patches}

    def has_features(h5_path: Path) -> bool:
        try:
            return _has_features(h5_path, local_ae is not None)
        except (OSError, ValueError):  # absent or not HDF5: processing it reports the problem
            return False

    summary = run_cohort(h5_paths, extract_one, lambda p: p, workers=1, overwrite=overwrite, progress=progress,
                         name_of=lambda p: Path(p).stem, is_complete=has_features, title="isg extract")
    results = [ExtractResult(r.output, r.status, int(r.stats.get("n_patches", 0)), r.seconds,
                             f"{r.error_type}: {r.error}" if r.error_type else None) for r in summary.results]
    failed = [r for r in results if r.status == FAILED]
    if failed:
        log.warning("extract: %d of %d slide(s) failed: %s", len(failed), len(results), ", ".join(Path(r.h5_path).name for r in failed))
    return results
