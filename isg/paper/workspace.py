"""What every table shares, computed once and cached under ``<out>/work`` (a rerun reuses it).

* the cohort: the built-in synthetic one (:func:`builtin_cohort`) or a user's manifest + expression table
  (+ MSI labels) (:func:`user_cohort`);
* one tissue grid per slide, scored by every selector with everything kept (``work/patches/<selector>``):
  a row's bags are the rows of shared features its rule keeps;
* the autoencoders of each extractor variant and the features of every tissue patch
  (``work/extractors/<variant>``, ``work/features/<variant>``): ``lpips`` (the LPIPS term on, with
  ImageNet AlexNet weights when cached, else on a random AlexNet) and ``no-lpips`` (L1 + adversarial), each
  compact, or at the paper's resolution with the suffix ``-paper`` (:func:`paper_variant`); the tables' main
  extractor is the compact one the library's defaults train (:func:`main_variant`);
* HE2RNA's tissue tiles through a ResNet, with their Shannon scores (``work/he2rna``);
* fold-clean features: per fold, the cohort cut and the autoencoders fitted on that fold's training slides.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from isg.paper.sizes import PaperSizes
from isg.utils import write_text_atomic

log = logging.getLogger(__name__)

SELECTORS = ("shannon", "otsu", "gradient", "canny", "dog", "log")
VARIANTS = ("lpips", "no-lpips")  # extractor variants: the LPIPS term on (weights as available) or off
PAPER_SUFFIX = "-paper"  # a variant at the paper's resolution: PaperSizes.paper_extractor, each patch at its own pixels


@dataclass
class Cohort:
    """Slides with their targets: ``expression`` samples x genes (log10(1 + x)), ``labels`` MSI 0/1 or None."""

    manifest: pd.DataFrame
    expression: pd.DataFrame
    labels: pd.DataFrame | None
    description: str
    truth_dir: Path | None = None  # a synthetic cohort's folder: its signal masks give each patch's known answer

    @property
    def slides(self) -> list[Path]:
        return [Path(p) for p in self.manifest["slide_path"]]

    @property
    def slide_ids(self) -> list[str]:
        return list(self.manifest["slide_id"])


def builtin_cohort(root: Path, sizes: PaperSizes) -> Cohort:
    """The synthetic cohort of :func:`isg.io.synth.make_cohort` at ``sizes`` (made once under ``root``)."""
    from isg.data import load_expression, load_manifest
    from isg.data.labels import load_labels
    from isg.io.synth import make_cohort

    root = Path(root)
    if not (root / "truth.json").is_file():
        make_cohort(root, n_slides=sizes.slides, size=sizes.slide_size, genes=sizes.genes, seed=sizes.cohort_seed)
    description = (f"built-in synthetic cohort (isg.io.synth.make_cohort): {sizes.slides} slides of {sizes.slide_size} px, "
                   f"{sizes.genes} genes, seed {sizes.cohort_seed}")
    return Cohort(load_manifest(root / "manifest.csv"), load_expression(root / "expression.tsv"), load_labels(root / "msi.csv"),
                  description, root)


def user_cohort(manifest: str | Path, expression: str | Path, labels: str | Path | None = None, top_n: int | None = None,
                genes: str | None = None) -> Cohort:
    """A user's cohort: manifest (slide_path, sample_id, patient_id), expression table and optional MSI labels."""
    from isg.data import load_expression, load_manifest, match_samples
    from isg.data.labels import load_labels

    table = load_manifest(manifest)
    expression_table = load_expression(expression, genes=genes, top_n=top_n, samples=table["sample_id"])
    table, expression_table = match_samples(table, expression_table)
    label_table = load_labels(labels) if labels else None
    return Cohort(table, expression_table, label_table, f"{manifest}: {len(table)} slides, {expression_table.shape[1]} genes")


def main_variant() -> str:
    """The extractor variant the library's defaults train here: ``lpips`` when ImageNet AlexNet weights are cached
    or ``AutoencoderTrainConfig.lpips_without_weights`` is ``"random"``, else ``no-lpips``."""
    from isg.features.lpips_loss import cached_alexnet_weights
    from isg.train.config import AutoencoderTrainConfig

    defaults = AutoencoderTrainConfig()
    if defaults.lpips_weight <= 0:
        return "no-lpips"
    return "lpips" if cached_alexnet_weights() or defaults.lpips_without_weights == "random" else "no-lpips"


def paper_variant(variant: str) -> str:
    """``variant``'s loss terms at the paper's resolution, e.g. ``"no-lpips-paper"``."""
    return variant + PAPER_SUFFIX


@dataclass
class Extractor:
    """One variant's global and local autoencoders and what they were trained with."""

    variant: str
    global_ae: torch.nn.Module
    local_ae: torch.nn.Module
    objective: dict = field(default_factory=dict)  # loss_terms, lpips_backbone, extractor_size (of the global AE)

    @property
    def label(self) -> str:
        """e.g. ``compact (r 32, d 32, <= 32 ch); l1 + lpips + adv, LPIPS AlexNet random``."""
        backbone = self.objective.get("lpips_backbone", "unknown")
        lpips = f", LPIPS AlexNet {backbone}" if backbone not in ("none", "unknown") else ""
        return f"{self.objective.get('extractor_size', '?')}; {self.objective.get('loss_terms', '?')}{lpips}"


class Workspace:
    """Lazily computed, cached shared stages of one run (see the module docstring)."""

    def __init__(self, root: str | Path, cohort: Cohort, sizes: PaperSizes, device: str = "cpu", say=print):
        self.root, self.cohort, self.sizes, self.device, self.say = Path(root), cohort, sizes, device, say
        self.root.mkdir(parents=True, exist_ok=True)
        self._check_cache()
        self.seconds: dict[str, float] = {}
        self._patches: dict[str, dict] = {}
        self._extractors: dict[str, Extractor] = {}
        self._features: dict[str, dict[str, dict]] = {}
        self._he2rna: dict | None = None
        self._signal: dict[str, np.ndarray] | None = None

    @property
    def slide_ids(self) -> list[str]:
        return self.cohort.slide_ids

    def _check_cache(self) -> None:
        """The cache holds one cohort at one set of shared-stage sizes: refuse to mix another into it. A stage the
        cache does not record yet (written before that stage existed, e.g. ``paper_extractor``) is added to it."""
        s = self.sizes
        stages = {"cohort": self.cohort.description, "slides": self.slide_ids, "patch_size": s.patch_size, "local_size": s.local_size,
                  "extractor": [s.ae_resolution, s.ae_d, s.ae_channel_base, s.ae_channel_max, s.ae_steps, s.ae_batch],
                  "paper_extractor": s.paper_extractor,
                  "he2rna_arch": s.he2rna_arch}
        stages = json.loads(json.dumps(stages))  # as stored: tuples as lists
        path = self.root / "stages.json"
        cached = json.loads(path.read_text()) if path.is_file() else {}
        changed = sorted(key for key in stages if key in cached and cached[key] != stages[key])
        if changed:
            raise ValueError(f"{self.root} caches another run's shared stages (differs in {', '.join(changed)}); "
                             "use another --out, or delete that folder")
        if any(key not in cached for key in stages):
            write_text_atomic(path, json.dumps({**cached, **stages}, indent=1))

    def _timed(self, stage: str, started: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - started
        self.say(f"[isg paper] {stage}: {self.seconds[stage]:.0f} s (process CPU {time.process_time():.0f} s)")

    # ------------------------------------------------------------------ selection scores over one tissue grid

    def patch_files(self, selector: str = "shannon") -> list[Path]:
        """Preprocess outputs of ``selector`` with every tissue patch kept, in manifest order (made on first use)."""
        from isg.pipeline.preprocess import preprocess_cohort
        from isg.select import SelectionRule

        folder = self.root / "patches" / selector
        files = [folder / f"{slide_id}.h5" for slide_id in self.slide_ids]
        if not all(f.is_file() for f in files):
            started = time.perf_counter()
            summary = preprocess_cohort(self.cohort.slides, folder, patch_size=self.sizes.patch_size, local_size=self.sizes.local_size,
                                        selector=selector, thumbnail=False, progress=False,
                                        rule=SelectionRule("topk", k=10**9))  # everything: rows select from it
            failed = [f for f in files if not f.is_file()]
            if failed:
                raise RuntimeError(f"preprocess ({selector}) failed on {len(failed)} slide(s), e.g. {failed[0]}; see {folder}/summary.json "
                                   f"({summary})")
            self._timed(f"preprocess {selector}", started)
        return files

    def patches(self, selector: str = "shannon") -> dict:
        """Per slide the :class:`~isg.data.patch_file.SlidePatches` of ``selector``'s preprocess (every tissue patch
        scored and kept; features left unread)."""
        from isg.data.patch_file import read_patch_file

        if selector not in self._patches:
            self._patches[selector] = {path.stem: read_patch_file(path, features=False) for path in self.patch_files(selector)}
        return self._patches[selector]

    def coords(self) -> dict[str, np.ndarray]:
        """Level-0 coords [N, 2] of every tissue patch per slide (the Shannon grid every selector shares)."""
        return {slide_id: patches.tissue_coords for slide_id, patches in self.patches("shannon").items()}

    def scores(self, selector: str) -> dict[str, np.ndarray]:
        """``selector``'s scores float64 [N] per slide, aligned with :meth:`coords`."""
        reference, scores = self.coords(), {}
        for slide_id, patches in self.patches(selector).items():
            if not np.array_equal(patches.tissue_coords, reference[slide_id]):
                raise RuntimeError(f"{self.root / 'patches' / selector / slide_id}.h5: the {selector} tissue grid differs from "
                                   "the Shannon one (same slide, same options)")
            scores[slide_id] = patches.scores
        return scores

    def patch_size_level0(self) -> int:
        """The global patch side in level-0 pixels (where the signal masks are read)."""
        return int(next(iter(self.patches("shannon").values())).geometry.patch_size_level0)

    def signal_fraction(self) -> dict[str, np.ndarray] | None:
        """Per slide, the share of each tissue patch [N] (order of :meth:`coords`) inside the synthetic cohort's
        signal regions; None for a cohort without signal masks."""
        from isg.io.synth import SIGNAL_DIR, read_signal_truth

        if self.cohort.truth_dir is None or not (Path(self.cohort.truth_dir) / SIGNAL_DIR).is_dir():
            return None
        if self._signal is None:
            truth, size = read_signal_truth(self.cohort.truth_dir), self.patch_size_level0()
            self._signal = {s: truth[s].patch_fraction(coords, size) for s, coords in self.coords().items()}
        return self._signal

    # ------------------------------------------------------------------ extractors and features

    def ae_config(self, variant: str, kind: str):
        """``variant``'s training of the ``kind`` autoencoder: the run's steps and batch, compact widths and
        resolution, or with the ``-paper`` suffix the paper's widths at the patch's own pixels (global p, local q)."""
        from isg.train.config import AutoencoderTrainConfig

        loss = variant.removesuffix(PAPER_SUFFIX)
        if loss not in VARIANTS:
            known = ", ".join(v + size for v in VARIANTS for size in ("", PAPER_SUFFIX))
            raise ValueError(f"unknown extractor variant {variant!r}; expected one of {known}")
        s = self.sizes
        if variant.endswith(PAPER_SUFFIX):
            model = {"resolution": s.patch_size if kind == "global" else s.local_size, **s.paper_extractor}
        else:
            model = {"resolution": s.ae_resolution, "channel_base": s.ae_channel_base, "channel_max": s.ae_channel_max}
        lpips = {"lpips_weight": 1.0, "lpips_without_weights": "random"} if loss == "lpips" else {"lpips_weight": 0.0}
        return AutoencoderTrainConfig(kind=kind, d=s.ae_d, max_steps=s.ae_steps, batch_size=s.ae_batch, device=self.device,
                                      progress=False, checkpoint_every=25, **model, **lpips)  # an interrupted run resumes

    def _fit_extractor(self, variant: str, folder: Path, h5_files: list[Path]) -> Extractor:
        """Train (or load, when done before) the global and local autoencoders of ``variant`` on ``h5_files``."""
        from isg.features import load_autoencoder
        from isg.train.autoencoder import EXPORT, train_autoencoder

        models = {}
        for kind in ("global", "local"):
            export = folder / kind / EXPORT
            if export.is_file():
                models[kind] = load_autoencoder(export)
                continue
            torch.manual_seed(0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # the random-backbone warning: the objective record says it
                models[kind] = train_autoencoder(h5_files, folder / kind, self.ae_config(variant, kind))[0].cpu()
        return Extractor(variant, models["global"], models["local"], dict(models["global"].extra.get("objective", {})))

    def extractor(self, variant: str) -> Extractor:
        if variant not in self._extractors:
            started = time.perf_counter()
            self._extractors[variant] = self._fit_extractor(variant, self.root / "extractors" / variant, self.patch_files("shannon"))
            self._timed(f"autoencoders {variant}", started)
        return self._extractors[variant]

    def _extract(self, extractor: Extractor, folder: Path, ids: list[str]) -> Path:
        """Copies of the shared Shannon patch files in ``folder`` with ``extractor``'s features of every tissue patch."""
        from isg.pipeline.extract import FAILED, extract_cohort

        folder.mkdir(parents=True, exist_ok=True)
        for slide_id in ids:
            if not (folder / f"{slide_id}.h5").is_file():
                shutil.copy2(self.root / "patches" / "shannon" / f"{slide_id}.h5", folder / f"{slide_id}.h5")
        results = extract_cohort([folder / f"{s}.h5" for s in ids], extractor.global_ae, extractor.local_ae, device=self.device,
                                 progress=False)
        failed = [r for r in results if r.status == FAILED]
        if failed:
            raise RuntimeError(f"feature extraction failed on {len(failed)} slide(s): {failed[0].h5_path}: {failed[0].error}")
        return folder

    def features(self, variant: str) -> dict:
        """Per slide the Shannon patches (every tissue patch selected) with ``variant``'s features:
        :class:`~isg.data.patch_file.SlidePatches` with ``features`` [N, d] and ``local_features`` [N, S, S, d]."""
        if variant not in self._features:
            extractor = self.extractor(variant)
            started = time.perf_counter()
            folder = self._extract(extractor, self.root / "features" / variant, self.slide_ids)
            self._features[variant] = self._read_features(folder)
            self._timed(f"features {variant}", started)
        return self._features[variant]

    def _read_features(self, folder: Path) -> dict:
        from isg.data.patch_file import read_patch_file

        out = {}
        for slide_id in self.slide_ids:
            out[slide_id] = read_patch_file(folder / f"{slide_id}.h5")
            if not (np.array_equal(out[slide_id].tissue_coords, self.coords()[slide_id]) and out[slide_id].selected.all()):
                raise RuntimeError(f"{folder / slide_id}.h5: not the shared grid with every patch selected")
        return out

    # ------------------------------------------------------------------ HE2RNA

    def he2rna(self) -> dict:
        """``{"label", "slides": {slide_id: SlidePatches}}``: HE2RNA's tissue tiles (every one selected) with their
        ResNet ``features`` [N, F] and Shannon ``scores`` [N] (the tiles as the ResNet sees them)."""
        from isg.baselines import cached_weights, load_resnet50
        from isg.data.patch_file import SlidePatches, read_patch_file, write_patch_file
        from isg.io import open_slide
        from isg.pipeline.he2rna import he2rna_slide_features, he2rna_tile_grid, he2rna_tile_scores

        if self._he2rna is not None:
            return self._he2rna
        arch = self.sizes.he2rna_arch
        label = f"{'ImageNet' if cached_weights(arch) else 'random'} {arch}"
        folder = self.root / "he2rna" / arch
        folder.mkdir(parents=True, exist_ok=True)
        started, backbone = time.perf_counter(), None
        for slide_id, path in zip(self.slide_ids, self.cohort.slides):
            if (folder / f"{slide_id}.h5").is_file():
                continue
            if backbone is None:
                torch.manual_seed(0)  # a random ResNet is the same one on every run
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # the random-weights warning: the row label says it
                    backbone = load_resnet50(arch=arch, device=self.device)
            with open_slide(path) as slide:
                grid = he2rna_tile_grid(slide)
                features, coords = he2rna_slide_features(slide, backbone, grid)
                scores = he2rna_tile_scores(slide, grid)
            if not np.array_equal(coords, grid.coords):
                raise RuntimeError(f"{path}: HE2RNA tiles out of grid order")
            tiles = SlidePatches(slide_id, str(path), None, coords, scores, np.ones(len(coords), bool),
                                 options={"selector": "shannon", "tiles": "HE2RNA: Otsu tissue >= 50 %, 224 px at 0.5 um/px"},
                                 features=features.numpy(), feature_attrs={"encoder": label, "extractor_size": label})
            write_patch_file(folder / f"{slide_id}.h5", tiles)
        self._he2rna = {"label": label, "slides": {s: read_patch_file(folder / f"{s}.h5") for s in self.slide_ids}}
        if backbone is not None:
            self._timed("HE2RNA features", started)
        return self._he2rna

    # ------------------------------------------------------------------ fold-clean

    def fold_clean(self, k: int, training_ids: list[str], variant: str) -> tuple[Extractor, dict, float]:
        """Fold ``k``'s extractor and features of every slide, and the cohort cut (mean + 1 sigma in bits), all
        fitted on ``training_ids`` only."""
        from isg.select import cohort_threshold

        started = time.perf_counter()
        root = self.root / "fold_clean" / f"fold{k}"
        files = [f for f in self.patch_files("shannon") if f.stem in set(training_ids)]
        extractor = self._fit_extractor(variant, root / "extractors", files)
        folder = self._extract(extractor, root / "features", self.slide_ids)
        cut = cohort_threshold([self.scores("shannon")[s] for s in training_ids], 1.0)
        record = {"fold": k, "training_slides": sorted(training_ids), "cut_bits": cut, "objective": extractor.objective}
        write_text_atomic(root / "fold.json", json.dumps(record, indent=1))
        self._timed(f"fold-clean fold {k}", started)
        return extractor, self._read_features(folder), cut


__all__ = ["Cohort", "Extractor", "PAPER_SUFFIX", "SELECTORS", "VARIANTS", "Workspace", "builtin_cohort", "main_variant", "paper_variant",
           "user_cohort"]
