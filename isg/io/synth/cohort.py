"""The synthetic cohort: latent parameters per patient, slides (whole or streamed in blocks), expression,
MSI and ground truth (the model is in the :mod:`isg.io.synth` docstring)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from isg.io.synth.tiff import pyramid, write_pyramid_tiff, write_streamed_pyramid
from isg.io.synth.tissue import TRUTH_DOWNSAMPLE, render_slide, render_tissue
from isg.io.synth.truth import SIGNAL_DIR, write_signal_mask
from isg.utils import write_text_atomic


@dataclass
class SynthCohort:
    """Paths of a generated cohort."""

    out_dir: Path
    manifest: Path
    expression: Path
    msi: Path
    truth: Path
    slides: list[Path]


# ----------------------------------------------------------------------------- large slides


def _block_edges(size: int, block: int) -> list[int]:
    """Block boundaries 0 = e0 < ... < size: multiples of ``block``; a last block under block / 4 joins its neighbour."""
    edges = list(range(0, size, block)) + [size]
    if len(edges) > 2 and size - edges[-2] < block // 4:
        del edges[-2]
    return edges


@dataclass
class SlideTruth:
    """What one written slide holds: artefact boxes, tissue fraction, signal coverage per block, region shares."""

    artefacts: list[dict]
    tissue_fraction: float
    signal: np.ndarray  # float32 [ceil(H / d), ceil(W / d)], d = TRUTH_DOWNSAMPLE
    region_shares: dict[str, float]


def render_blocks(key: list[int], width: int, height: int, params: dict, mpp: float, artefacts: bool, block: int,
                  parts: list, local_signal: bool = True) -> Iterator[np.ndarray]:
    """Level 0 of a large slide as strips [block rows, width, 3], each block rendered by :func:`render_tissue`
    with its own generator ``default_rng(key + [by, bx])``: memory is one strip, the slide a mosaic of
    blocks of tissue. Each strip's blocks go to ``parts`` as (x0, y0, width, height, :class:`Rendered`) with
    the image dropped; ``block`` must be a multiple of ``TRUTH_DOWNSAMPLE``."""
    xs = _block_edges(width, block)
    for by, (y0, y1) in enumerate(zip(ys := _block_edges(height, block), ys[1:])):
        strip = np.empty((y1 - y0, width, 3), np.uint8)
        for bx, (x0, x1) in enumerate(zip(xs, xs[1:])):
            rendered = render_tissue(np.random.default_rng([*key, by, bx]), x1 - x0, y1 - y0, params, mpp=mpp,
                                     artefacts=artefacts, local_signal=local_signal)
            strip[:, x0:x1] = rendered.image
            rendered.image = None
            parts.append((x0, y0, x1 - x0, y1 - y0, rendered))
        yield strip


def _mosaic_truth(parts: list, width: int, height: int) -> SlideTruth:
    """The slide's :class:`SlideTruth` from its blocks' (x0, y0, width, height, Rendered)."""
    d = TRUTH_DOWNSAMPLE
    signal = np.zeros((-(-height // d), -(-width // d)), np.float32)
    found, tissue, shares = [], 0.0, {}
    for x0, y0, w, h, part in parts:
        signal[y0 // d:y0 // d + part.signal.shape[0], x0 // d:x0 // d + part.signal.shape[1]] = part.signal
        found += [{**a, "bbox": [a["bbox"][0] + x0, a["bbox"][1] + y0, a["bbox"][2] + x0, a["bbox"][3] + y0]} for a in part.artefacts]
        area = part.tissue_fraction * w * h
        tissue += area
        for name, share in part.region_shares.items():
            shares[name] = shares.get(name, 0.0) + share * area
    return SlideTruth(found, tissue / (width * height), signal, {k: v / max(tissue, 1.0) for k, v in shares.items()})


# ----------------------------------------------------------------------------- cohort


STREAM_SIDE = 8192  # slides with a longer side are rendered in blocks and streamed (bounded memory)
BLOCK = 2048  # block side of streamed slides (rounded up to a multiple of tile * downsample)


def _latents(rng, n_patients: int, slides_per_patient: list[int]):
    patients = rng.uniform(0.1, 0.9, (n_patients, 3))  # density, nuclei_size, stain
    rows = []
    for p, count in enumerate(slides_per_patient):
        for k in range(count):
            z = np.clip(patients[p] + rng.normal(0, 0.05, 3), 0, 1)
            rows.append((p, k, z))
    return patients, rows


def _nuisance(rng) -> dict:
    """Per-slide parameters that no gene depends on: region shares and the nuclei of the cellular bulk."""
    return {"tissue_fraction": float(rng.uniform(0.4, 0.65)), "signal_fraction": float(rng.uniform(0.05, 0.12)),
            "stroma_fraction": float(rng.uniform(0.06, 0.16)), "fat_fraction": float(rng.uniform(0.03, 0.12)),
            "bulk_density": float(rng.uniform(0.1, 0.9)), "bulk_size": float(rng.uniform(0.1, 0.9))}


def _check_cohort_arguments(n_slides: int, n_patients: int | None, size, genes: int) -> tuple[int, int, int]:
    """(n_patients, width, height), or ValueError."""
    if n_slides < 1:
        raise ValueError(f"n_slides must be >= 1, got {n_slides}")
    n_patients = n_patients if n_patients is not None else max(1, math.ceil(0.75 * n_slides))
    if not (n_slides / 2 <= n_patients <= n_slides):
        raise ValueError(f"n_patients={n_patients} must be between n_slides/2 and n_slides ({n_slides}): a patient has 1 or 2 slides")
    width, height = (size, size) if isinstance(size, (int, np.integer)) else (int(size[0]), int(size[1]))
    if min(width, height) < 64:
        raise ValueError(f"size must be at least 64 px per side, got {width}x{height}")
    if genes < 3:
        raise ValueError(f"genes must be >= 3 (three marker genes), got {genes}")
    return n_patients, width, height


def _msi_status(rng, patients: np.ndarray) -> np.ndarray:
    """bool [patients]: MSI-H for lymphocyte-rich tissue (dense, small nuclei); at least one of each class."""
    c_patient = 2 * patients - 1
    msi_logit = 3 * c_patient[:, 0] - 2 * c_patient[:, 1] + rng.normal(0, 0.3, len(patients))
    msi_high = msi_logit > 1.0
    if len(patients) >= 2 and msi_high.all():
        msi_high[np.argmin(msi_logit)] = False
    if len(patients) >= 2 and not msi_high.any():
        msi_high[np.argmax(msi_logit)] = True
    return msi_high


def _gene_model(rng, genes: int, null_fraction: float) -> dict:
    """names, weights [genes, 3] (genes 0-2 markers), null mask, bias (log mean counts)."""
    names = [f"SYN{g:04d}" for g in range(genes)]
    weights = rng.normal(0, 1.2, (genes, 3))
    weights[:3] = 2.0 * np.eye(3)
    null = rng.random(genes) < null_fraction
    null[:3] = False
    weights[null] = 0.0
    bias = rng.uniform(math.log(20), math.log(2000), genes)
    return {"names": names, "weights": weights, "null": null, "bias": bias}


def write_slide(path, slide_key: list[int], width: int, height: int, params: dict, mpp: float, tile: int, quality: int,
                downsample: int, artefacts: bool, progress: bool = False, local_signal: bool = True) -> SlideTruth:
    """Render and write one slide; returns what it holds.

    Up to :data:`STREAM_SIDE` px the slide is rendered whole (``default_rng(slide_key)``); larger ones are
    rendered block by block (:func:`render_blocks`) and streamed to the TIFF (:func:`write_streamed_pyramid`).
    """
    if max(width, height) <= STREAM_SIDE:
        rendered = render_tissue(np.random.default_rng(slide_key), width, height, params, mpp=mpp, artefacts=artefacts,
                                 local_signal=local_signal)
        write_pyramid_tiff(path, pyramid(rendered.image, tile, downsample), mpp, tile=tile, quality=quality)
        return SlideTruth(rendered.artefacts, rendered.tissue_fraction, rendered.signal, rendered.region_shares)
    step = math.lcm(tile, downsample, TRUTH_DOWNSAMPLE)
    parts: list = []
    block = -(-BLOCK // step) * step
    strips = render_blocks(slide_key, width, height, params, mpp, artefacts, block, parts, local_signal)
    if progress:
        from tqdm import tqdm

        strips = tqdm(strips, total=len(_block_edges(height, block)) - 1, desc=f"  {Path(path).stem} level 0", unit="strip", leave=False)
    write_streamed_pyramid(path, strips, height, width, mpp, tile=tile, quality=quality, downsample=downsample)
    return _mosaic_truth(parts, width, height)


def _write_tables(out_dir: Path, records: list[dict], names: list[str], counts: list[np.ndarray]) -> None:
    """manifest.csv, msi.csv and expression.tsv (samples x genes raw counts)."""
    header = "slide_path,sample_id,patient_id,msi\n"
    write_text_atomic(out_dir / "manifest.csv", header + "".join(
        f"{r['slide_path']},{r['sample_id']},{r['patient_id']},{r['msi']}\n" for r in records))
    write_text_atomic(out_dir / "msi.csv", "sample_id,msi\n" + "".join(f"{r['sample_id']},{r['msi']}\n" for r in records))
    lines = ["sample_id\t" + "\t".join(names)]
    lines += [r["sample_id"] + "\t" + "\t".join(map(str, row.tolist())) for r, row in zip(records, counts)]
    write_text_atomic(out_dir / "expression.tsv", "\n".join(lines) + "\n")


def make_cohort(out_dir, n_slides: int = 8, n_patients: int | None = None, size=4096, tile: int = 256, seed: int = 0,
                genes: int = 50, mpp: float = 0.5, quality: int = 80, downsample: int = 4, noise: float = 0.15,
                null_fraction: float = 0.2, artefacts: bool = True, progress: bool = False,
                local_signal: bool = True) -> SynthCohort:
    """Write a synthetic cohort into ``out_dir`` (see the module docstring for the ground truth).

    Files: ``slides/<slide_id>.tif`` (pyramidal JPEG TIFFs), ``manifest.csv`` (slide_path relative,
    sample_id, patient_id, msi), ``expression.tsv`` (samples x genes raw counts), ``msi.csv``
    (sample_id, msi), ``truth.json`` and ``signal/<slide_id>.png`` (where the signal is,
    :func:`isg.io.synth.read_signal_truth`). ``size`` is an int or (width, height). Patients get one or two
    slides (one sample per slide); ``n_patients`` defaults to ``ceil(0.75 * n_slides)``. Slides with a
    side above :data:`STREAM_SIDE` are streamed in bounded memory (:func:`write_slide`). ``local_signal``:
    the latent density and size live in small nuclei-rich regions (default) or in all cellular tissue.
    """
    n_patients, width, height = _check_cohort_arguments(n_slides, n_patients, size, genes)
    out_dir = Path(out_dir)
    (out_dir / "slides").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)  # one stream, drawn in this order: latents, MSI, genes, then per slide
    patients, rows = _latents(rng, n_patients, [2 if p < n_slides - n_patients else 1 for p in range(n_patients)])
    msi_high = _msi_status(rng, patients)
    model = _gene_model(rng, genes, null_fraction)

    records, counts, slide_paths = [], [], []
    iterator = enumerate(rows)
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, total=len(rows), desc="synth slides", unit="slide")
    for index, (p, k, z) in iterator:
        patient_id = f"SYN-{p + 1:04d}"
        sample_id = f"{patient_id}-01{'AB'[k]}"
        slide_id = f"{sample_id}-DX1"
        params = {"density": float(z[0]), "nuclei_size": float(z[1]), "stain": float(z[2]), **_nuisance(rng)}
        path = out_dir / "slides" / f"{slide_id}.tif"
        written = write_slide(path, [seed, index], width, height, params, mpp, tile, quality, downsample, artefacts,
                              progress, local_signal)
        write_signal_mask(out_dir / SIGNAL_DIR / f"{slide_id}.png", written.signal)
        tissue_px = written.tissue_fraction * width * height
        signal_share = float(written.signal.sum() * TRUTH_DOWNSAMPLE**2 / tissue_px) if tissue_px else 0.0
        log_mean = model["bias"] + model["weights"] @ (2 * z - 1) + rng.normal(0, noise, genes)
        counts.append(rng.poisson(np.exp(log_mean)))
        slide_paths.append(path)
        records.append({"slide_id": slide_id, "slide_path": f"slides/{slide_id}.tif", "sample_id": sample_id,
                        "patient_id": patient_id, "msi": "MSI-H" if msi_high[p] else "MSS",
                        "params": {**params, "tissue_fraction": written.tissue_fraction}, "artefacts": written.artefacts,
                        "regions": {k: round(v, 4) for k, v in written.region_shares.items()},
                        "signal_share": round(min(1.0, signal_share), 4), "signal_mask": f"{SIGNAL_DIR}/{slide_id}.png",
                        "signal_downsample": TRUTH_DOWNSAMPLE})

    _write_tables(out_dir, records, model["names"], counts)
    truth = {
        "seed": seed, "size": [width, height], "tile": tile, "mpp": mpp, "quality": quality, "downsample": downsample,
        "parameters": ["density", "nuclei_size", "stain"], "local_signal": local_signal,
        "signal_model": ("density and nuclei_size are those of the nuclei-rich signal regions (signal/<slide_id>.png); "
                         "stain colours the whole slide" if local_signal else
                         "density and nuclei_size are those of all cellular tissue; stain colours the whole slide"),
        "expression_model": "counts ~ Poisson(exp(bias + weights @ (2 z - 1) + N(0, noise^2))), z = [density, nuclei_size, stain]",
        "msi_model": "MSI-H if 3 c_density - 2 c_nuclei_size + N(0, 0.3^2) > 1 (per patient; >= 1 of each class)",
        "noise": noise, "genes": model["names"], "bias": model["bias"].tolist(), "weights": model["weights"].tolist(),
        "null_genes": [n for n, z in zip(model["names"], model["null"]) if z], "slides": records,
    }
    write_text_atomic(out_dir / "truth.json", json.dumps(truth, indent=1))
    return SynthCohort(out_dir, out_dir / "manifest.csv", out_dir / "expression.tsv", out_dir / "msi.csv",
                       out_dir / "truth.json", slide_paths)


def make_bad_slides(out_dir, seed: int = 0) -> dict[str, Path]:
    """Broken inputs for error handling: ``corrupt`` (TIFF header + garbage), ``truncated`` (a valid
    pyramid cut in half), ``unsupported`` (.txt), ``tiny`` (32 x 32 px) and ``no_mpp`` (no calibration).
    Also ``good``: a valid 512 x 512 slide. Returns {case: path}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    params = {"density": 0.5, "nuclei_size": 0.5, "stain": 0.5, "tissue_fraction": 0.5}
    image, _, _ = render_slide(rng, 512, 512, params, artefacts=False)
    paths = {name: out_dir / f"{name}{suffix}" for name, suffix in
             (("good", ".tif"), ("corrupt", ".tif"), ("truncated", ".tif"), ("unsupported", ".txt"), ("tiny", ".tif"), ("no_mpp", ".tif"))}
    write_pyramid_tiff(paths["good"], pyramid(image, 128, 2), 0.5, tile=128)
    paths["corrupt"].write_bytes(b"II*\x00" + rng.bytes(4096))
    write_pyramid_tiff(paths["truncated"], pyramid(image, 128, 2), 0.5, tile=128)
    data = paths["truncated"].read_bytes()
    paths["truncated"].write_bytes(data[: len(data) // 2])
    paths["unsupported"].write_text("this is not a slide\n")
    write_pyramid_tiff(paths["tiny"], [image[:32, :32]], 0.5, tile=16)
    write_pyramid_tiff(paths["no_mpp"], pyramid(image, 128, 2), None, tile=128)
    return paths

