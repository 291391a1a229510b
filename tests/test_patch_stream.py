"""isg.train.patch_stream: training tiles streamed from every slide; ranks split the global stream; resume; tiles
equal the resized patches; a slide that cannot be read is named."""

from __future__ import annotations

import shutil
import threading

import numpy as np
import pytest
import torch

from isg.data.patch_file import read_patch_file
from isg.features.patches import split_local
from isg.io import open_slide
from isg.train.distributed import Ranks
from isg.train.patch_stream import PatchStream, resized_tiles
from small_cohort import preprocessed_cohort


@pytest.fixture(scope="module")
def patches(tmp_path_factory):
    """6 synthetic 768 px slides preprocessed with 64 px patches (local 32), topk 8: 8 selected patches each."""
    root = tmp_path_factory.mktemp("stream")
    preprocessed_cohort(root, seed=1, k=8)
    return sorted((root / "patches").glob("*.h5"))


def take(stream: PatchStream, batch_size: int, steps: int, start: int = 0) -> list[torch.Tensor]:
    batches = stream.batches(batch_size, start_step=start)
    try:
        return [next(batches) for _ in range(steps)]
    finally:
        batches.close()


@pytest.mark.parametrize("kind,world,batch_size,window,per_slide", [("global", 2, 8, 2, 3), ("global", 3, 9, 4, 5),
                                                                     ("local", 2, 6, 1, 2)])
def test_ranks_together_read_the_one_process_stream(patches, kind, world, batch_size, window, per_slide):
    options = dict(slides_per_window=window, patches_per_slide=per_slide, num_workers=1)
    one = take(PatchStream(patches, kind, 16, seed=3, **options), batch_size, 7)
    shards = [take(PatchStream(patches, kind, 16, seed=3, ranks=Ranks(r, world), **options), batch_size, 7) for r in range(world)]
    for t, batch in enumerate(one):
        assert batch.shape == (batch_size, 16, 16, 3) and batch.dtype == torch.uint8
        for r in range(world):
            torch.testing.assert_close(shards[r][t], batch[r::world], rtol=0, atol=0)
    assert not torch.equal(one[0], one[1])


def test_a_resumed_stream_starts_at_its_step(patches):
    stream = PatchStream(patches, "global", 16, seed=0, slides_per_window=2, patches_per_slide=3, num_workers=1)
    straight = take(stream, 5, 12)
    resumed = take(stream, 5, 4, start=8)  # past a pass (6 slides x 3 patches = 18 tiles)
    for a, b in zip(straight[8:], resumed):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_passes_visit_every_patch_of_every_slide(patches):
    stream = PatchStream(patches, "global", 16, seed=5, slides_per_window=4, patches_per_slide=3, num_workers=1)
    assert stream.tiles_per_pass == 6 * 3 and stream.n_patches == 6 * 8
    seen, first_pass = set(), None
    for n in range(3):  # ceil(8 / 3) passes cover 8 patches per slide
        visits = [(i, int(p)) for window in stream._pass_windows(n) for i, chosen in window for p in chosen]
        assert len(visits) == 18 and len(set(visits)) == 18  # each slide once per pass, no patch twice in it
        first_pass = first_pass or [i for window in stream._pass_windows(n) for i, _ in window]
        seen |= set(visits)
    assert seen == {(i, p) for i in range(6) for p in range(8)}
    assert first_pass != [i for window in stream._pass_windows(1) for i, _ in window]  # slide order shuffled per pass


@pytest.mark.parametrize("kind", ["global", "local"])
def test_tiles_are_the_resized_patches(patches, kind):
    stream = PatchStream(patches, kind, 16, seed=2, slides_per_window=3, patches_per_slide=2, num_workers=1)
    _, order = next(stream._windows_from(0))
    batch = take(stream, 7, 1)[0]
    for row, (i, p, sub) in enumerate(order[:7]):
        slide = read_patch_file(stream.slides[i].h5_path, features=False)
        x, y = (int(v) for v in slide.coords[p])
        with open_slide(slide.slide_path) as opened:
            tile = torch.from_numpy(opened.read_region((x, y), 0, (64, 64)))[None]  # [1, 64, 64, 3]
        if kind == "local":
            tile = split_local(tile, 32).reshape(-1, 32, 32, 3)[sub:sub + 1]
        torch.testing.assert_close(batch[row], resized_tiles(tile, 16)[0], rtol=0, atol=1)


def test_bounded_memory_and_the_reader_thread_ends(patches):
    stream = PatchStream(patches, "local", 16, seed=0, slides_per_window=2, patches_per_slide=3, num_workers=1,
                         ranks=Ranks(1, 2))
    assert stream.window_bytes() <= 2 * 3 * 4 * 16 * 16 * 3 // 2 + 1  # 2 slides x 3 patches x 2x2 sub-patches, half
    before = threading.active_count()
    batches = stream.batches(4)
    next(batches)
    batches.close()
    assert threading.active_count() <= before


def test_a_slide_that_cannot_be_read_is_named(patches, tmp_path):
    from dataclasses import replace

    from isg.data.patch_file import write_patch_file

    own = read_patch_file(patches[0])
    slide = tmp_path / "own.tif"
    shutil.copy(own.slide_path, slide)
    write_patch_file(tmp_path / "own.h5", replace(own, slide_path=str(slide)))
    stream = PatchStream([tmp_path / "own.h5", patches[1]], "global", 16, slides_per_window=2, patches_per_slide=3,
                         num_workers=1)
    with open(slide, "r+b") as handle:  # damaged after the stream was planned: its tiles cut off
        handle.truncate(slide.stat().st_size // 3)
    with pytest.raises(ValueError, match=r"training stream: slide .*own\.tif"):
        take(stream, 6, 1)
    with pytest.raises(ValueError, match="no selected patches"):
        PatchStream([], "global", 16)


def test_uneven_global_batches_are_refused():
    from isg.train.distributed import check_global_batch

    assert check_global_batch(8, Ranks(0, 2)) == 4
    with pytest.raises(ValueError, match="does not split over 3 processes"):
        check_global_batch(8, Ranks(1, 3))
    np.testing.assert_array_equal(np.arange(7)[Ranks(1, 3).rank::3], [1, 4])
