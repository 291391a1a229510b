"""How big a run of the paper's tables is: cohort, patches, extractors, training, split seeds, the Tab. 6 grid.

Three presets: :data:`QUICK` (a smoke test that CI runs: every table, every row, tiny everything),
:data:`DEFAULT` (learns on the built-in synthetic cohort: the README's tables) and :data:`COHORT` (a real
cohort: the paper's patch sizes, the library's extractor and training defaults, five folds).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

# Paper Tab. 6: ISG-N-k, N MBConv blocks with a fusion block after every k-th. Our reading of the grid
# (N = 6..12 at k = 2, and k = 1, 5 at N = 10); the published values are in published.json.
PAPER_GRID = ((6, 2), (8, 2), (10, 2), (12, 2), (10, 1), (10, 5))
ISG_MODEL = "isg-10-2"  # the paper's best: every ISG row of Tab. 1-5 (Tab. 6 varies N and k)


@dataclass(frozen=True)
class PaperSizes:
    """Every size a run of ``isg paper`` depends on (the CLI's ``--folds``, ``--seeds`` override two)."""

    name: str
    # the built-in synthetic cohort (ignored for a user cohort)
    slides: int = 48
    slide_size: int = 2048  # px at 0.5 um/px
    genes: int = 20
    cohort_seed: int = 7
    # patches: global p, local q (S = p / q)
    patch_size: int = 128
    local_size: int = 32
    # autoencoders (one global, one local); resolution None = the library's per-kind default
    ae_resolution: int | None = 32
    ae_d: int = 32
    ae_channel_base: int = 1024
    ae_channel_max: int = 32
    ae_steps: int | None = 150  # None: the library's epochs
    ae_batch: int = 16
    # Tab. 5's paper-resolution extractor: the same training at these widths, each patch encoded at its own
    # pixels (global r = p, local r = q), the code size d as above; what the compact one is measured against
    paper_extractor: dict = field(default_factory=lambda: {"channel_base": 8192, "channel_max": 256})
    # slide models and cross-validation
    epochs: int = 12
    patience: int = 6
    lr: float = 1e-3  # AdamW; ISG-10-2 at 3e-4 cleared its floor but learned less (pooled PCC 0.02 vs 0.10, docs/paper.md)
    batch_size: int = 4
    folds: int = 3
    max_patches: int = 64
    seeds: tuple[int, ...] = (0,)  # split seeds of every row
    ablation_seeds: tuple[int, ...] = (0, 1, 2)  # Tab. 4 and Tab. 5's probes: claims need seeds
    transformer: dict = field(default_factory=lambda: {"embed_dim": 64, "depth": 2, "num_heads": 4})  # every slide ViT
    cube: dict = field(default_factory=lambda: {"channels": 64})  # ISG's and the Tab. 1 baselines' cube width
    he2rna_arch: str = "resnet50"  # its ImageNet weights when cached, else random (the row says which)
    he2rna_hidden: tuple[int, ...] = (256,)
    probe_hidden: int = 256
    probe_train: dict = field(default_factory=lambda: {"epochs": 200, "patience": 30, "lr": 1e-3})  # probes train to convergence
    grid: tuple[tuple[int, int], ...] = PAPER_GRID

    def with_options(self, folds: int | None = None, seeds: tuple[int, ...] | None = None) -> PaperSizes:
        """These sizes with ``--folds`` / ``--seeds`` applied (seeds replace both seed lists)."""
        changes = {}
        if folds is not None:
            changes["folds"] = folds
        if seeds is not None:
            changes.update(seeds=tuple(seeds), ablation_seeds=tuple(seeds))
        return replace(self, **changes)

    def describe(self) -> str:
        seeds = ", ".join(map(str, self.seeds))
        return (f"{self.folds}-fold patient CV, {self.epochs} epochs (patience {self.patience}, AdamW lr {self.lr:g}, "
                f"{self.batch_size} slides a step), bags subsampled to "
                f"{self.max_patches} patches while training, split seed(s) {seeds} (Tab. 4-5 probes: "
                f"{', '.join(map(str, self.ablation_seeds))}); patches {self.patch_size} px (local {self.local_size} px); "
                f"slide transformer {self.transformer}")


DEFAULT = PaperSizes("default")
QUICK = PaperSizes("quick", slides=8, slide_size=1024, genes=8, ae_d=16, ae_channel_max=16, ae_steps=12, ae_batch=8,
                   paper_extractor={"channel_base": 8192, "channel_max": 16},
                   epochs=1, patience=1, folds=2, max_patches=16, seeds=(0,), ablation_seeds=(0, 1),
                   transformer={"embed_dim": 16, "depth": 1, "num_heads": 2}, cube={"channels": 8},
                   he2rna_arch="resnet18", he2rna_hidden=(16,), probe_hidden=16,
                   probe_train={"epochs": 2, "patience": 2, "lr": 1e-3})
COHORT = PaperSizes("cohort", patch_size=256, local_size=64, ae_resolution=None, ae_d=512, ae_channel_max=128, ae_steps=None,
                    ae_batch=32, epochs=40, patience=8, folds=5, max_patches=256,
                    transformer={"embed_dim": 384, "depth": 12, "num_heads": 6}, cube={"channels": 64})  # ViT-S everywhere
PRESETS = {sizes.name: sizes for sizes in (QUICK, DEFAULT, COHORT)}

__all__ = ["COHORT", "DEFAULT", "ISG_MODEL", "PAPER_GRID", "PRESETS", "PaperSizes", "QUICK"]
