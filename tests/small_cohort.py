"""A small preprocessed synthetic cohort for the tests of cohort-scale machinery (cluster, stream, torchrun)."""

from __future__ import annotations

from pathlib import Path


def preprocessed_cohort(root: Path, n_slides: int = 6, seed: int = 0, genes: int = 3, k: int | None = 8, workers: int = 2):
    """``n_slides`` synthetic 768 px slides (64 px JPEG tiles) under ``root/cohort`` (manifest, expression),
    preprocessed into ``root/patches`` with 64 px patches (local 32): ``k`` selected each (top-k), or the default
    rule when ``k`` is None. Returns the :class:`isg.io.synth.SynthCohort`."""
    from isg.io.synth import make_cohort
    from isg.pipeline.preprocess import preprocess_cohort
    from isg.select import SelectionRule

    synth = make_cohort(root / "cohort", n_slides=n_slides, size=768, tile=64, genes=genes, seed=seed)
    rule = None if k is None else SelectionRule("topk", k=k)
    summary = preprocess_cohort(synth.slides, root / "patches", patch_size=64, local_size=32, progress=False,
                                workers=workers, rule=rule)
    assert summary.ok, summary.failed
    return synth
