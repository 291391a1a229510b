"""Training tiles streamed from every slide of a cohort, in bounded memory, read while the model trains.

The in-memory bank (:func:`isg.train.autoencoder.collect_tiles`) reads at most ``max_tiles`` patches once and
trains on them for every step: on 10^4 slides with 10^3 kept patches each, 0.2 % of the data, chosen once.
:class:`PatchStream` instead walks the whole cohort again and again:

* a **pass** visits every slide once, in an order shuffled per pass; each visit takes the slide's next
  ``patches_per_slide`` selected patches from a per-slide permutation (so successive passes cover every patch
  of every slide before any repeats);
* the slides of a pass are read ``slides_per_window`` at a time: a **window** of tiles (global patches, or their
  S x S local sub-patches), resized to the model resolution and shuffled within the window;
* the windows, end to end, are one **global stream** of tiles, a function of the seed only. Global batch t is
  tiles ``[t B, (t + 1) B)`` of it; under torchrun rank r takes positions r, r + N, ... and reads only the
  patches it needs, so N processes see what one process sees (:mod:`isg.train.distributed`).

A background thread builds the next window while the model trains on the current one (slides are read with
:func:`isg.io.iter_tiles` reader threads); memory holds at most three windows of this rank's tiles
(``window_bytes``), whatever the cohort size. Starting at step t (a resumed run) skips to the window holding
tile t B without reading the ones before. A slide that cannot be read stops training with an error naming it:
damaged data never silently becomes training input.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from isg.data.patch_file import read_patch_file
from isg.features.autoencoder import tiles_to_input
from isg.features.patches import open_patch_slide, split_local
from isg.io import NUM_WORKERS, iter_tiles
from isg.train.config import PATCHES_PER_SLIDE, SLIDES_PER_WINDOW
from isg.train.distributed import Ranks

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Slide:
    h5_path: str
    slide_path: str
    slide_mpp: float | None
    coords: np.ndarray  # [M, 2] selected patches, level 0
    patch_size: int  # p, as encoded
    patch_level: int
    read_size: int  # pixels read at patch_level, resized to p
    local_size: int | None


def resized_tiles(tiles: torch.Tensor, resolution: int) -> torch.Tensor:
    """uint8 tiles [B, H, W, 3] resized to uint8 [B, r, r, 3] (antialiased, as the encoders see them)."""
    x = tiles_to_input(tiles, resolution)  # [B, 3, r, r] in [-1, 1]
    return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


class PatchStream:
    """The global stream of training tiles of ``h5_paths`` (see the module docstring).

    ``kind``: ``"global"`` (whole p-pixel patches) or ``"local"`` (their q-pixel sub-patches); tiles are uint8
    [r, r, 3] at ``resolution``. Slides without selected patches are left out; a patch file or slide that cannot
    be used raises ValueError naming it.
    """

    def __init__(self, h5_paths, kind: str, resolution: int, seed: int = 0, *, slides_per_window: int = SLIDES_PER_WINDOW,
                 patches_per_slide: int = PATCHES_PER_SLIDE, num_workers: int = NUM_WORKERS, ranks: Ranks = Ranks()):
        if kind not in ("global", "local"):
            raise ValueError(f"kind must be 'global' or 'local', got {kind!r}")
        if slides_per_window < 1 or patches_per_slide < 1:
            raise ValueError(f"slides_per_window and patches_per_slide must be >= 1, got {slides_per_window}, {patches_per_slide}")
        self.kind, self.resolution, self.seed, self.ranks = kind, resolution, seed, ranks
        self.slides_per_window, self.patches_per_slide, self.num_workers = slides_per_window, patches_per_slide, num_workers
        self.slides = [s for s in map(self._slide, h5_paths) if len(s.coords)]
        if not self.slides:
            raise ValueError(f"no selected patches to stream in {len(list(h5_paths))} patch file(s)")
        self.per_patch = [(s.patch_size // s.local_size) ** 2 if kind == "local" else 1 for s in self.slides]
        self.visit = [min(patches_per_slide, len(s.coords)) for s in self.slides]  # patches per visit
        self.tiles_per_pass = int(sum(v * k for v, k in zip(self.visit, self.per_patch)))

    def _slide(self, h5_path) -> _Slide:
        patches = read_patch_file(h5_path, features=False)
        g = patches.geometry
        if g is None:
            raise ValueError(f"patch file {h5_path}: 'coords' lacks its geometry attrs (patch_size, patch_level)")
        if self.kind == "local":
            g.grid  # noqa: B018 - raises when q does not divide p
        if patches.slide_path is None or not Path(patches.slide_path).is_file():
            raise ValueError(f"patch file {h5_path}: slide {patches.slide_path} not found")
        return _Slide(str(h5_path), str(patches.slide_path), patches.slide_mpp, np.asarray(patches.coords),
                      g.patch_size, g.patch_level, g.size_at_level, g.local_size)

    @property
    def n_patches(self) -> int:
        return int(sum(len(s.coords) for s in self.slides))

    def window_bytes(self) -> int:
        """Most bytes of one window of this rank's tiles."""
        biggest = sorted((v * k for v, k in zip(self.visit, self.per_patch)), reverse=True)[:self.slides_per_window]
        return int(sum(biggest)) * self.resolution**2 * 3 // self.ranks.world_size + 1

    # ------------------------------------------------------------------ the global stream, from the seed alone

    def _pass_windows(self, n: int) -> list[list[tuple[int, np.ndarray]]]:
        """Pass ``n``: windows of ``(slide index, patch indices of this visit)``."""
        order = np.random.default_rng([self.seed, n, 1]).permutation(len(self.slides))
        visits = []
        for i in order:
            m, k = len(self.slides[i].coords), self.visit[i]
            permutation = np.random.default_rng([self.seed, int(i), 2]).permutation(m)
            start = (n * k) % m
            visits.append((int(i), permutation[(start + np.arange(k)) % m]))
        return [visits[j:j + self.slides_per_window] for j in range(0, len(visits), self.slides_per_window)]

    def _window_tiles(self, window) -> list[tuple[int, int, int]]:
        """The window's tiles ``(slide, patch, sub-patch)``, before the window is shuffled."""
        return [(i, int(p), s) for i, patches in window for p in patches for s in range(self.per_patch[i])]

    def _windows_from(self, position: int):
        """``(global start, tiles in stream order, pass, window)`` from the window holding ``position`` on."""
        n, offset = divmod(position, self.tiles_per_pass)
        start = n * self.tiles_per_pass
        while True:
            for w, window in enumerate(self._pass_windows(n)):
                tiles = self._window_tiles(window)
                order = np.random.default_rng([self.seed, n, w, 3]).permutation(len(tiles))
                if start + len(tiles) > n * self.tiles_per_pass + offset:
                    yield start, [tiles[j] for j in order]
                start += len(tiles)
            n, offset = n + 1, 0

    # ------------------------------------------------------------------ reading this rank's tiles

    def _read(self, wanted: list[tuple[int, int, int]]) -> torch.Tensor:
        """uint8 [len(wanted), r, r, 3] of the tiles ``(slide, patch, sub-patch)``, in that order."""
        out = torch.empty((len(wanted), self.resolution, self.resolution, 3), dtype=torch.uint8)
        by_slide: dict[int, dict[int, list[tuple[int, int]]]] = {}
        for row, (i, p, sub) in enumerate(wanted):
            by_slide.setdefault(i, {}).setdefault(p, []).append((row, sub))
        for i, patches in by_slide.items():
            slide = self.slides[i]
            index = np.array(sorted(patches))
            done = 0
            try:
                with open_patch_slide(_Patches(slide)) as opened:
                    for _, batch in iter_tiles(opened, slide.coords[index], slide.read_size, level=slide.patch_level,
                                               device="cpu", num_workers=self.num_workers,
                                               out_size=slide.patch_size):  # uint8 [b, p, p, 3]
                        if self.kind == "local":  # [b, S * S, q, q, 3]
                            batch = split_local(batch, slide.local_size).reshape(len(batch), -1, slide.local_size,
                                                                                  slide.local_size, 3)
                        else:
                            batch = batch[:, None]  # [b, 1, p, p, 3]
                        rows, picked = [], []
                        for j, tiles in enumerate(batch):
                            for row, sub in patches[int(index[done + j])]:
                                rows.append(row)
                                picked.append(tiles[sub])
                        out[rows] = resized_tiles(torch.stack(picked), self.resolution)
                        done += len(batch)
            except (OSError, ValueError) as exc:
                raise ValueError(f"training stream: slide {slide.slide_path} (patch file {slide.h5_path}): {exc}") from exc
            if done != len(index):
                raise ValueError(f"training stream: slide {slide.slide_path}: read {done} of {len(index)} patches")
        return out

    def _rank_windows(self, position: int):
        """This rank's tiles of every window from global ``position`` on: uint8 [n, r, r, 3] per window."""
        r, w = self.ranks.rank, self.ranks.world_size
        for start, tiles in self._windows_from(position):
            first = max(position, start)
            first += (r - first) % w  # this rank's first global position in the window
            mine = tiles[first - start::w]
            position = start + len(tiles)
            if mine:
                yield self._read(mine)

    def batches(self, batch_size: int, start_step: int = 0, prefetch: int = 1):
        """Endless local batches uint8 [batch_size / ranks, r, r, 3] of global batches of ``batch_size`` from step
        ``start_step`` on; windows are read ``prefetch`` ahead by a background thread."""
        local = batch_size // self.ranks.world_size
        windows = _Prefetch(self._rank_windows(start_step * batch_size), prefetch)
        pending: list[torch.Tensor] = []
        have = 0
        try:
            while True:
                while have < local:
                    try:
                        window = windows.next()
                    except StopIteration:  # the stream is endless; a generator must not leak StopIteration
                        return
                    pending.append(window)
                    have += len(window)
                joined = torch.cat(pending) if len(pending) > 1 else pending[0]
                yield joined[:local]
                pending, have = [joined[local:]], have - local
        finally:
            windows.close()


@dataclass
class _Patches:
    """What :func:`isg.features.patches.open_patch_slide` reads of a patch file."""

    slide: _Slide

    @property
    def slide_path(self) -> str:
        return self.slide.slide_path

    @property
    def slide_mpp(self) -> float | None:
        return self.slide.slide_mpp

    @property
    def slide_id(self) -> str:
        return Path(self.slide.h5_path).stem


class _Prefetch:
    """Runs a generator in a daemon thread, ``depth`` items ahead (a bounded queue); errors re-raise in ``next``."""

    _END = object()

    def __init__(self, generator, depth: int = 1):
        self.queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(generator,), daemon=True, name="isg-patch-stream")
        self.thread.start()

    def _run(self, generator) -> None:
        try:
            for item in generator:
                while not self.stop.is_set():
                    try:
                        self.queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self.stop.is_set():
                    return
            self.queue.put(self._END)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            self.queue.put(exc)

    def next(self):
        item = self.queue.get()
        if item is self._END:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self.stop.set()
        while True:  # unblock a producer waiting on a full queue
            try:
                self.queue.get_nowait()
            except queue.Empty:
                break
        self.thread.join(timeout=10)


__all__ = ["PATCHES_PER_SLIDE", "SLIDES_PER_WINDOW", "PatchStream", "resized_tiles"]
