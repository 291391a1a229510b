"""``isg extract`` (wiring only): autoencoder features of the selected patches of each slide.

For every selected global patch (``coords`` of the slide's patch file, p pixels at ``patch_level``):

* ``features`` float32 [M, d_g]: the global encoder on the patch resized to its resolution
  (CLAM/TRIDENT-style dataset next to ``coords``, same order);
* ``local_features`` float16 [M, S, S, d_l]: the local encoder on each q-pixel sub-patch
  (S = p / q, [m, i, j] = rows i*q.., cols j*q..), resized to its resolution.

:func:`encode_patches` adds them to a :class:`~isg.data.patch_file.SlidePatches` in memory (``isg predict``);
:func:`extract_slide` reads a patch file, encodes, and writes it back atomically through
:mod:`isg.data.patch_file` (a failure leaves the file as it was); slides that already have both datasets
are skipped unless ``overwrite``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from isg.data.patch_file import SlidePatches, read_patch_file, write_patch_file
from isg.features.autoencoder import Autoencoder, tiles_to_input
from isg.features.extractors import ExtractorRef
from isg.features.patches import open_patch_slide, split_local
from isg.io import BATCH_SIZE, NUM_WORKERS, iter_tiles
from isg.pipeline.cohort import DONE, FAILED, SKIPPED, on_dask, run_cohort

log = logging.getLogger(__name__)

WRITTEN = DONE  # the cohort runner's status words, one set for every command
ENCODE_ACTIVATION_BYTES = 8 << 20  # largest encoder activation per call: cache-sized, reused by the allocator


@dataclass
class ExtractResult:
    h5_path: str
    status: str  # "done" (WRITTEN) | "skipped" | "failed"
    n_patches: int = 0
    seconds: float = 0.0
    error: str | None = None
    n_read: int = 0  # patches read from the slide (the rest came from memory)


def encode_chunk(ae: Autoencoder) -> int:
    """Inputs per encoder call: its largest activation (the first block, at full resolution) stays within
    :data:`ENCODE_ACTIVATION_BYTES`. Larger calls are no faster on a CPU, and their buffers, above glibc's
    mmap threshold, were mapped and page-faulted anew on every call (as much system time as compute)."""
    channels = ae.encoder.from_rgb.weight.shape[0]
    return max(1, ENCODE_ACTIVATION_BYTES // (channels * ae.resolution**2 * 4))


def bf16_supported(device) -> bool:
    """Whether bfloat16 autocast runs natively on ``device`` (CUDA; a CPU with AVX512-BF16 or AMX)."""
    device = torch.device(device)
    if device.type == "cuda":
        return True
    return device.type == "cpu" and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


_WARNED_BF16: set = set()


def _autocast(device: torch.device, amp: bool):
    """bfloat16 autocast when ``amp`` and the device runs it natively (warned once otherwise), else nothing."""
    if amp and not bf16_supported(device):
        if device.type not in _WARNED_BF16:
            _WARNED_BF16.add(device.type)
            log.warning("amp: this %s has no native bfloat16 (AVX512-BF16 / AMX); encoding in float32", device.type)
        amp = False
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)


def encoder_threads(device) -> int:
    """Threads that encode parts of each batch side by side: on a CPU, torch's intra-op thread count (each
    then runs its ops on one thread); 1 on a GPU."""
    return max(1, torch.get_num_threads()) if torch.device(device).type == "cpu" else 1


@contextlib.contextmanager
def _one_thread_ops():
    """torch ops on one thread each while inside (``torch.set_num_threads`` is process-wide), restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@torch.inference_mode()
def encode_tiles(ae: Autoencoder, tiles: torch.Tensor, device, max_batch: int | None = None, amp: bool = False) -> torch.Tensor:
    """Features float32 [B, d] (on CPU) of uint8 tiles [B, H, W, 3], resized to ``ae.resolution``, in calls of
    ``max_batch`` inputs (default :func:`encode_chunk`).

    ``amp``: bfloat16 autocast where the device runs it natively (CUDA; CPUs with AVX512-BF16 or AMX): about
    2x faster on such a CPU; features differ from float32 by ~1e-2 relative (docs/features.md).
    """
    device = torch.device(device)
    chunk = max_batch or encode_chunk(ae)
    out = torch.empty(len(tiles), ae.d)  # [B, d]
    with _autocast(device, amp):
        for i in range(0, len(tiles), chunk):
            x = tiles_to_input(tiles[i:i + chunk], ae.resolution, device)  # [b, 3, r, r]
            out[i:i + len(x)] = ae.encode(x).float().cpu()
    return out


def encoder_attrs(ae: Autoencoder, role: str, amp: bool = False) -> dict:
    """Attrs of a ``features`` / ``local_features`` dataset: which encoder made it and what it was trained with
    (``extractor_size``, and ``loss_terms``, ``lpips_backbone`` from the checkpoint's training record), and
    ``precision = "bfloat16"`` when ``amp`` encoded it."""
    from isg.features.autoencoder import extractor_size

    attrs = {"encoder": f"isg-autoencoder-{role}", "d": ae.d, "resolution": ae.resolution, "config": json.dumps(ae.config),
             "extractor_size": extractor_size(ae.config)}
    objective = (getattr(ae, "extra", None) or {}).get("objective") or {}
    attrs.update({key: objective[key] for key in ("loss_terms", "lpips_backbone", "lpips_weight", "adv_weight") if key in objective})
    checkpoint = getattr(ae, "checkpoint_path", None)
    if checkpoint:  # isg train copies it into the model folder, checking it is still this file
        attrs["checkpoint"] = str(Path(checkpoint).resolve())
        if getattr(ae, "checkpoint_sha256", None):
            attrs["checkpoint_sha256"] = ae.checkpoint_sha256
    if amp:
        attrs["precision"] = "bfloat16"
    return attrs


def encode_patches(patches: SlidePatches, global_ae: Autoencoder, local_ae: Autoencoder | None, *,
                   slide_path: str | os.PathLike | None = None, batch_size: int = BATCH_SIZE,
                   device: str | torch.device = "cpu", num_workers: int = NUM_WORKERS, backend: str = "auto",
                   amp: bool = False, tiles=None, progress=None, threads: int | None = None) -> tuple[SlidePatches, int]:
    """``patches`` with ``features`` (and ``local_features`` unless ``local_ae`` is None) of their selected
    patches, and the number of patches read from the slide.

    ``slide_path`` overrides the recorded slide; ``amp``: bfloat16 encoders (:func:`encode_tiles`). ``tiles``:
    a :class:`~isg.pipeline.tile_arena.TileArena` of patches already in memory (``isg predict`` keeps them
    from the scoring pass): the selected patches it holds are encoded first and the arena released, then the
    others are read from the slide by reader threads that run ahead of the encoders. ``progress(n)`` is
    called after every ``n`` patches encoded.

    ``threads`` (default :func:`encoder_threads`): each batch is split into that many parts, encoded side by
    side, each part's ops on one thread. The compact encoders' small convolutions kept two intra-op threads
    busy ~80 % of the time; two one-thread encoders keep them ~98 % busy, 1.4x faster per batch on 2 cores,
    with the same features (each patch's convolutions are the same either way).
    """
    geometry = patches.geometry
    if geometry is None:
        raise ValueError(f"patch file {patches.slide_id}: 'coords' lacks its geometry attrs (patch_size, patch_level)")
    s = geometry.grid if local_ae is not None else 1  # checks that q divides p
    coords = patches.coords  # [M, 2]
    device = torch.device(device)
    global_ae, local_ae = (None if ae is None else ae.to(device, memory_format=torch.channels_last).eval()
                           for ae in (global_ae, local_ae))  # channels-last: 1.7x on a CPU (docs/features.md)
    m, q = len(coords), geometry.local_size
    features = np.zeros((m, global_ae.d), np.float32)  # [M, d_g]
    local = np.zeros((m, s, s, local_ae.d), np.float16) if local_ae is not None else None  # [M, S, S, d_l]

    threads = threads or encoder_threads(device)
    pool = ThreadPoolExecutor(threads, thread_name_prefix="isg-encode") if threads > 1 else None

    def encode_part(rows: np.ndarray, batch: torch.Tensor) -> None:  # batch uint8 [b, p, p, 3] of coords[rows]
        features[rows] = encode_tiles(global_ae, batch, device, amp=amp).numpy()
        if local_ae is not None:
            subs = split_local(batch, q).reshape(len(rows) * s * s, q, q, 3)  # [b * S * S, q, q, 3]
            local[rows] = encode_tiles(local_ae, subs, device, amp=amp).view(len(rows), s, s, local_ae.d).numpy()

    def encode(rows: np.ndarray, batch: torch.Tensor) -> None:  # parts of the batch side by side (disjoint rows)
        if pool is None:
            encode_part(rows, batch)
        else:
            parts = [part for part in np.array_split(np.arange(len(rows)), threads) if len(part)]
            for done in [pool.submit(encode_part, rows[part], batch[part[0]:part[-1] + 1]) for part in parts]:
                done.result()
        if progress is not None:
            progress(len(rows))

    with _one_thread_ops() if pool is not None else contextlib.nullcontext(), pool or contextlib.nullcontext():
        patches, n_read = _encode_selected(patches, tiles, encode, batch_size, device, num_workers, backend, slide_path)
    local_attrs = encoder_attrs(local_ae, "local", amp) if local_ae is not None else None
    return patches.with_features(features, encoder_attrs(global_ae, "global", amp), local, local_attrs), n_read


def _encode_selected(patches: SlidePatches, tiles, encode, batch_size, device, num_workers, backend, slide_path):
    """Run ``encode(rows, batch)`` over every selected patch: those in the arena ``tiles`` first (then released),
    the others read again from the slide. Returns (patches, patches read)."""
    geometry, coords = patches.geometry, patches.coords  # [M, 2]
    slots = tiles.slots_of(coords) if tiles is not None else np.full(len(coords), -1, np.int64)  # [M]
    missing, held = np.flatnonzero(slots < 0), np.flatnonzero(slots >= 0)
    buffer = None
    for start in range(0, len(held), batch_size):  # the tiles kept from the scoring pass, gathered into one buffer
        rows = held[start:start + batch_size]
        if buffer is None:
            buffer = torch.empty((min(batch_size, len(held)), *tiles.block.shape[1:]), dtype=torch.uint8,
                                 device=tiles.block.device)
        encode(rows, tiles.gather(slots[rows], out=buffer).to(device))
    if tiles is not None:
        tiles.release()  # its memory goes before the features of the others fill theirs
    del buffer
    if len(missing):  # read again, in reader threads that run ahead of the encoders
        with open_patch_slide(patches, backend, slide_path) as slide:
            offset = 0
            for batch_coords, batch in iter_tiles(slide, coords[missing], geometry.size_at_level, level=geometry.patch_level,
                                                  batch_size=batch_size, device=device, num_workers=num_workers,
                                                  out_size=geometry.patch_size):  # [b, 2], uint8 [b, p, p, 3]
                rows = missing[offset:offset + len(batch_coords)]
                if not np.array_equal(batch_coords, coords[rows]):
                    raise RuntimeError(f"patch file {patches.slide_id}: tile reader returned patches out of order at {offset}")
                encode(rows, batch)
                offset += len(rows)
        if offset != len(missing):
            raise RuntimeError(f"patch file {patches.slide_id}: read {offset} of {len(missing)} patches")
    return patches, len(missing)


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
) -> ExtractResult:
    """Write ``features`` (and ``local_features`` unless ``local_ae`` is None) into the patch file ``h5_path``.

    ``slide_path`` None takes the slide recorded in the file; ``amp``: bfloat16 encoders on CUDA.
    Returns an :class:`ExtractResult` (WRITTEN or SKIPPED); errors raise and leave the file as it was.
    """
    h5_path = Path(h5_path)
    start = time.perf_counter()
    patches = read_patch_file(h5_path)
    if not overwrite and patches.has_features(local_ae is not None):
        return ExtractResult(str(h5_path), SKIPPED, patches.n_selected)
    patches, n_read = encode_patches(patches, global_ae, local_ae, slide_path=slide_path, batch_size=batch_size,
                                     device=device, num_workers=num_workers, backend=backend, amp=amp)
    write_patch_file(h5_path, patches)
    return ExtractResult(str(h5_path), WRITTEN, patches.n_selected, time.perf_counter() - start, n_read=n_read)


Extractor = Autoencoder | ExtractorRef | str | os.PathLike  # a module in memory, or its checkpoint


def _extractor(value, role: str):
    """An Autoencoder stays as it is; a path becomes an :class:`ExtractorRef` (loaded once per worker)."""
    if value is None or isinstance(value, (Autoencoder, ExtractorRef)):
        return value
    return ExtractorRef.of(value, role)


class _ExtractOne:
    """:func:`extract_slide` for one patch file of a cohort; picklable, so a Dask worker or pool process runs it.

    Extractors given as :class:`ExtractorRef` are loaded on a process's first slide and reused for the next
    ones (:meth:`ExtractorRef.cached`); only their paths and checksums travel with each task.
    """

    def __init__(self, global_ae, local_ae, slide_paths: dict, options: dict):
        self.global_ae, self.local_ae, self.slide_paths, self.options = global_ae, local_ae, slide_paths, options

    def _model(self, value):
        return value.cached(self.options["device"]) if isinstance(value, ExtractorRef) else value

    def __call__(self, h5_path: Path) -> dict:
        slide_path = self.slide_paths.get(h5_path.stem)
        result = extract_slide(h5_path, slide_path, self._model(self.global_ae), self._model(self.local_ae),
                               overwrite=True, **self.options)
        return {"n_patches": result.n_patches, "n_read": result.n_read}


class _HasFeatures:
    """Resume check of extract: the patch file has the features asked for (picklable)."""

    def __init__(self, local: bool):
        self.local = local

    def __call__(self, h5_path: Path) -> bool:
        try:
            return read_patch_file(h5_path, features=False).has_features(self.local)
        except (OSError, ValueError):  # absent or not HDF5: processing it reports the problem
            return False


def extract_cohort(
    h5_paths,
    global_ae: Extractor,
    local_ae: Extractor | None,
    batch_size: int = BATCH_SIZE,
    device: str | torch.device = "cpu",
    num_workers: int = NUM_WORKERS,
    overwrite: bool = False,
    slide_paths: dict | None = None,
    progress: bool = True,
    amp: bool = False,
    *,
    scheduler=None,
    workers: int | None = 1,
    resources: dict | None = None,
    summary_path: str | os.PathLike | None = None,
    backend: str = "auto",
) -> list[ExtractResult]:
    """:func:`extract_slide` over many .h5 files with the cohort runner (:func:`isg.pipeline.cohort.run_cohort`):
    a slide that fails is logged, reported and skipped, slides that have their features already are skipped
    unless ``overwrite``, every patch file is rewritten atomically.

    ``global_ae`` / ``local_ae``: an :class:`Autoencoder` or its checkpoint (a path or an :class:`ExtractorRef`).
    A checkpoint is loaded once per process, on its first slide, after its checksum is checked; that is what a
    Dask cluster wants (``scheduler="tcp://host:8786"`` or a ``distributed.Client``: one task per slide, with
    worker ``resources`` such as ``{"GPU": 1}``), while a module in memory travels with every task.
    ``workers``: slides at a time in-process (default 1: the encoders hold the device). ``slide_paths``
    optionally maps an .h5 path (or its stem, the slide id) to its slide. ``summary_path``: the cohort summary
    (see :class:`isg.pipeline.cohort.CohortSummary`), written during the run and at its end.
    """
    h5_paths = [Path(p) for p in h5_paths]
    if on_dask(scheduler):  # the workers' working directory may be another one
        h5_paths = [p.absolute() for p in h5_paths]
        summary_path = summary_path and Path(summary_path).absolute()
    slide_paths = {Path(key).stem if str(key).endswith(".h5") else str(key): str(Path(value).absolute())
                   for key, value in (slide_paths or {}).items()}  # by slide id
    process = _ExtractOne(_extractor(global_ae, "global"), _extractor(local_ae, "local"), slide_paths,
                          dict(batch_size=batch_size, device=str(device), num_workers=num_workers, backend=backend, amp=amp))
    summary = run_cohort(h5_paths, process, lambda p: p, scheduler=scheduler, workers=workers, resources=resources,
                         overwrite=overwrite, progress=progress, name_of=lambda p: Path(p).stem,
                         is_complete=_HasFeatures(local_ae is not None), summary_path=summary_path, title="isg extract")
    results = [ExtractResult(r.output, r.status, int(r.stats.get("n_patches", 0)), r.seconds,
                             f"{r.error_type}: {r.error}" if r.error_type else None, int(r.stats.get("n_read", 0)))
               for r in summary.results]
    failed = [r for r in results if r.status == FAILED]
    if failed:
        log.warning("extract: %d of %d slide(s) failed: %s", len(failed), len(results), ", ".join(Path(r.h5_path).name for r in failed))
    return results
