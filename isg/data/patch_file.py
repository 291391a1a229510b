"""The per-slide patch file ``<slide_id>.h5``: its one owner (layout, schema version, read, write, re-select, features).

Every other module holds a slide's patches as a :class:`SlidePatches` and goes through
:func:`read_patch_file` / :func:`write_patch_file` (atomic) / :func:`is_complete`,
:meth:`SlidePatches.reselected` and :meth:`SlidePatches.with_features`. The layout, schema version "2"
(root attrs ``encoding-type`` = ``"isg-patches"``, ``encoding-version`` = ``"2"``, as anndata tags its
elements), stays CLAM/TRIDENT-readable (``coords`` and ``features`` side by side):

=================== ===================== ================================================================
dataset             dtype [shape]         content
=================== ===================== ================================================================
``coords``          int64 [M, 2]          level-0 (x, y) top-left of the **selected** global patches
``features``        float32 [M, d]        global encoder features, row i of ``coords`` (``isg extract``)
``local_features``  float16 [M, S, S, d]  local features of the S x S q-pixel sub-patches (S = p / q)
``all_coords``      int64 [N, 2]          every tissue patch scored, grid (row-major) order
``scores``          float64 [N]           selector score of each (the selector's unit: bits for Shannon)
``selected``        bool [N]              the selection: ``coords == all_coords[selected]``
``damaged_coords``  int64 [D, 2]          tissue patches left out: they touch a damaged tile of the file
``damaged_reasons`` str [D]               why (``corrupt tile 9 of level 0: zeroed (all bytes 0)``)
=================== ===================== ================================================================

Attributes of ``coords`` (the patch geometry, :class:`PatchGeometry`; CLAM and TRIDENT names):
``patch_size`` (p, the pixels of a patch as the encoders see them; TRIDENT's target patch size),
``patch_level`` (the level read), ``patch_size_level`` (pixels read at that level, then resized to p;
equal to p when nothing is resampled), ``patch_size_level0`` (the patch's side at level 0, TRIDENT),
``downsample`` [2] (of ``patch_level``, CLAM), ``level_dim`` [2] (W, H at the level), ``mpp`` (um/px of
the patch pixels: the cohort's target, NaN unknown), ``level0_magnification`` and ``target_magnification``
(10 / mpp, as TRIDENT names them; NaN unknown), ``local_size`` (q), ``name``. A CLAM reader reads
``patch_size`` px at ``patch_level``: the same pixels whenever ``patch_size_level == patch_size``; a
TRIDENT reader reads ``patch_size_level0`` px at level 0 and resizes them to ``patch_size``.
Attributes of ``features`` / ``local_features``: the encoder (``encoder``, ``d``, ``resolution``, ``config``,
``checkpoint`` (absolute) and ``checkpoint_sha256``).
Root attributes: ``slide_id``, ``slide_path`` (absolute), ``isg_version``, ``backend``, ``level0_mpp``
(NaN unknown), ``dimensions`` [2] (W, H at level 0), ``n_damaged``, ``kept_fraction`` (selected / tissue
patches: the floor guard's record, :func:`isg.select.kept_record`), and two JSON attributes:
``options`` (the preprocess options that made the patches; ``isg predict`` reuses them) and ``rule``
(the :class:`~isg.select.SelectionRule` applied, as ``to_dict()``, plus ``"cut"``: the absolute cut it
used on this slide, null for top-k).

**Local patches are implied, not stored.** The selected patch at level-0 (x, y) holds S x S local
patches of q of its p pixels; local patch (i, j) (row i, column j) starts at level 0 at
``(x + round(j * q * s), y + round(i * q * s))`` with ``s = patch_size_level0 / patch_size`` level-0 pixels per
patch pixel (:func:`isg.io.local_grid`).

Files of schema "1" (no ``encoding-version``: loose ``coords`` attrs ``selector``, ``rule``,
``threshold``, ``k``, ``n_sigma``, ``tissue_min``, ``level0_patch_size``) load as the same
:class:`SlidePatches`; writing one back writes schema "2". Feature files of CLAM/TRIDENT (``coords``
and ``features`` only) load too: every patch selected, no scores.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from isg.utils import atomic_path

ENCODING_TYPE = "isg-patches"
SCHEMA_VERSION = "2"
FEATURES = ("features", "local_features")  # datasets aligned with coords (one row per selected patch)

__all__ = ["ENCODING_TYPE", "SCHEMA_VERSION", "PatchGeometry", "SlidePatches", "read_patch_file", "write_patch_file",
           "is_complete", "schema1_options", "geometry_dict"]


@dataclass(frozen=True)
class PatchGeometry:
    """Where the patches of a slide are and at what scale: read level, sizes, resolution (the ``coords`` attrs).

    A patch is ``read_size`` pixels at ``patch_level`` resized to ``patch_size`` (``read_size`` None: read at
    ``patch_size``, nothing resampled); its level-0 side is ``patch_size_level0``.
    """

    patch_size: int  # p, pixels of a patch as encoded
    patch_level: int
    patch_size_level0: int  # level-0 side of a patch
    downsample: float  # of patch_level
    level_dim: tuple[int, int] | None  # (W, H) of patch_level
    mpp: float | None  # um/px of the patch pixels (after resizing), None when unknown
    local_size: int | None  # q; must divide p
    read_size: int | None = None  # pixels read at patch_level, resized to p; None: p (no resampling)

    @property
    def grid(self) -> int:
        """S = p / q local patches per side."""
        if not self.local_size or self.patch_size % self.local_size:
            raise ValueError(f"patch_size {self.patch_size} is not a positive multiple of local_size {self.local_size}")
        return self.patch_size // self.local_size

    @property
    def size_at_level(self) -> int:
        """Pixels read at ``patch_level`` per patch side."""
        return self.read_size or self.patch_size

    @property
    def level0_scale(self) -> float:
        """Level-0 pixels per patch pixel (``patch_size_level0 / patch_size``)."""
        return self.patch_size_level0 / self.patch_size

    @property
    def level0_mpp(self) -> float | None:
        return None if self.mpp is None else self.mpp / self.level0_scale

    @property
    def magnifications(self) -> tuple[float | None, float | None]:
        """(level-0, target) magnification, 10 / mpp as TRIDENT counts it (10x = 1 um/px); None when unknown."""
        if self.mpp is None:
            return None, None
        return 10.0 / self.level0_mpp, 10.0 / self.mpp


@dataclass
class SlidePatches:
    """One slide's patches in memory: every tissue patch scored, the selection, and optional features."""

    slide_id: str
    slide_path: str | None
    geometry: PatchGeometry | None
    tissue_coords: np.ndarray  # int64 [N, 2] level-0 (x, y) of every tissue patch scored
    scores: np.ndarray | None  # float64 [N]; None for feature files without scores
    selected: np.ndarray  # bool [N]
    damaged_coords: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.int64))  # int64 [D, 2]
    damaged_reasons: list[str] = field(default_factory=list)  # [D]
    options: dict = field(default_factory=dict)  # preprocess options that made the patches (JSON-ready)
    rule: dict | None = None  # the SelectionRule applied, as to_dict()
    cut: float | None = None  # the absolute cut it used on this slide (None: top-k, or pending)
    backend: str | None = None
    level0_mpp: float | None = None
    dimensions: tuple[int, int] | None = None  # (W, H) at level 0
    isg_version: str | None = None
    features: np.ndarray | None = None  # float32 [M, d], row i <-> coords[i]
    local_features: np.ndarray | None = None  # float16 [M, S, S, d]
    feature_attrs: dict = field(default_factory=dict)  # the encoder of features
    local_feature_attrs: dict = field(default_factory=dict)
    thumbnail: np.ndarray | None = None  # [h, w, 3] made by preprocess; in memory only, never written
    unread: tuple[str, ...] = ()  # feature datasets of the file left unread: writing these patches would lose them

    def __post_init__(self):
        self.tissue_coords = np.asarray(self.tissue_coords, np.int64).reshape(-1, 2)
        self.selected = np.asarray(self.selected, bool).reshape(-1)
        self.damaged_coords = np.asarray(self.damaged_coords, np.int64).reshape(-1, 2)
        self.damaged_reasons = [str(r) for r in self.damaged_reasons]
        if self.scores is not None:
            self.scores = np.asarray(self.scores, np.float64).reshape(-1)
        self.check()

    @property
    def coords(self) -> np.ndarray:
        """int64 [M, 2] level-0 (x, y) of the selected patches."""
        return self.tissue_coords[self.selected]

    @property
    def n_tissue(self) -> int:
        return len(self.tissue_coords)

    @property
    def n_selected(self) -> int:
        return int(self.selected.sum())

    @property
    def selector(self) -> str | None:
        return self.options.get("selector")

    @property
    def slide_mpp(self) -> float | None:
        """Level-0 um/px: recorded, else from the read level's mpp and the patch sizes; None when unknown."""
        if self.level0_mpp is not None:
            return self.level0_mpp
        return None if self.geometry is None else self.geometry.level0_mpp

    def has_features(self, local: bool = True) -> bool:
        """True when the global (and, with ``local``, the local) features are there, in memory or unread."""
        names = ("features", "local_features") if local else ("features",)
        return all(getattr(self, name) is not None or name in self.unread for name in names)

    def check(self, where: str | None = None) -> None:
        """Raise ValueError (naming ``where`` or the slide) when the arrays disagree."""
        n, m = len(self.tissue_coords), self.n_selected
        problems = []
        if self.selected.shape != (n,):
            problems.append(f"selected has {len(self.selected)} rows for {n} tissue patches")
        if self.scores is not None and self.scores.shape != (n,):
            problems.append(f"scores has {len(self.scores)} rows for {n} tissue patches")
        if len(self.damaged_reasons) != len(self.damaged_coords):
            problems.append(f"{len(self.damaged_reasons)} damaged reasons for {len(self.damaged_coords)} damaged patches")
        for name in FEATURES:
            value = getattr(self, name)
            if value is not None and (value.ndim < 2 or len(value) != m):
                problems.append(f"{name} has shape {value.shape} for {m} selected patches")
        if problems:
            raise ValueError(f"patch file {where or self.slide_id}: " + "; ".join(problems))

    def reselected(self, keep, rule: dict, cut: float | None) -> tuple[SlidePatches, str]:
        """These patches with the selection ``keep`` bool [N] made by ``rule`` (a SelectionRule dict) at ``cut``.

        Features stay, as their matching rows, when ``keep`` is a subset of the current selection, and
        are dropped otherwise. Returns the new patches and ``"kept"``, ``"dropped"`` or ``"none"``.
        """
        keep = np.asarray(keep, bool)
        if keep.shape != self.selected.shape:
            raise ValueError(f"patch file {self.slide_id}: a selection of {keep.shape} for {self.n_tissue} tissue patches")
        if self.unread:
            raise ValueError(f"patch file {self.slide_id}: read without its {', '.join(self.unread)}; re-select needs them")
        had = self.features is not None or self.local_features is not None
        subset = not (keep & ~self.selected).any()
        rows = (np.cumsum(self.selected) - 1)[keep]  # rows of the old coords / features that stay
        cut = None if cut is None or math.isnan(cut) else float(cut)
        if subset:
            out = replace(self, selected=keep, rule=dict(rule), cut=cut,
                          features=None if self.features is None else self.features[rows],
                          local_features=None if self.local_features is None else self.local_features[rows])
        else:
            out = replace(self, selected=keep, rule=dict(rule), cut=cut, features=None, local_features=None,
                          feature_attrs={}, local_feature_attrs={})
        return out, "none" if not had else "kept" if subset else "dropped"

    def with_features(self, features: np.ndarray, attrs: dict, local: np.ndarray | None = None,
                      local_attrs: dict | None = None) -> SlidePatches:
        """These patches with ``features`` [M, d] (and ``local`` [M, S, S, d]) of the selected patches and their
        encoder attrs; a ``local`` of None keeps the local features there are."""
        out = replace(self, features=np.asarray(features), feature_attrs=dict(attrs))
        if local is not None:
            out = replace(out, local_features=np.asarray(local), local_feature_attrs=dict(local_attrs or {}))
        out.unread = tuple(name for name in self.unread if name == "local_features" and local is None)
        out.check()
        return out


# ----------------------------------------------------------------------------- writing


def _geometry_attrs(g: PatchGeometry, name: str) -> dict:
    unknown = math.nan
    level0_mag, target_mag = g.magnifications
    attrs = {"patch_size": g.patch_size, "patch_level": g.patch_level, "patch_size_level": g.size_at_level,
             "patch_size_level0": g.patch_size_level0, "downsample": np.asarray([g.downsample, g.downsample]),
             "mpp": unknown if g.mpp is None else g.mpp, "level0_magnification": level0_mag or unknown,
             "target_magnification": target_mag or unknown, "name": name}
    if g.level_dim is not None:
        attrs["level_dim"] = np.asarray(g.level_dim, np.int64)
    if g.local_size is not None:
        attrs["local_size"] = g.local_size
    return attrs


def write_patch_file(path: str | os.PathLike, patches: SlidePatches) -> Path:
    """Write ``patches`` to ``path`` (schema :data:`SCHEMA_VERSION`) atomically: a temp file renamed over
    ``path`` once complete, so a failure leaves the previous file (or none)."""
    import h5py

    import isg

    path = Path(path)
    if patches.unread:
        raise ValueError(f"patch file {path}: these patches were read without their {', '.join(patches.unread)}; "
                         f"writing them would drop them")
    patches.check(str(path))
    unknown = math.nan
    rule = None if patches.rule is None else {**patches.rule, "cut": patches.cut}
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs.update({"encoding-type": ENCODING_TYPE, "encoding-version": SCHEMA_VERSION})
        f.attrs.update(slide_id=patches.slide_id, slide_path="" if patches.slide_path is None else str(patches.slide_path),
                       isg_version=patches.isg_version or isg.__version__, backend=patches.backend or "",
                       level0_mpp=unknown if patches.level0_mpp is None else patches.level0_mpp,
                       n_damaged=len(patches.damaged_coords), options=json.dumps(patches.options),
                       rule=json.dumps(rule), kept_fraction=patches.n_selected / max(1, patches.n_tissue))
        if patches.dimensions is not None:
            f.attrs["dimensions"] = np.asarray(patches.dimensions, np.int64)
        coords = f.create_dataset("coords", data=patches.coords)  # [M, 2]
        if patches.geometry is not None:
            coords.attrs.update(_geometry_attrs(patches.geometry, patches.slide_id))
        f.create_dataset("all_coords", data=patches.tissue_coords)  # [N, 2]
        if patches.scores is not None:
            f.create_dataset("scores", data=patches.scores)  # [N]
        f.create_dataset("selected", data=patches.selected)  # [N]
        f.create_dataset("damaged_coords", data=patches.damaged_coords)  # [D, 2]
        f.create_dataset("damaged_reasons", data=np.asarray(patches.damaged_reasons, dtype=object),
                         dtype=h5py.string_dtype())  # [D]
        for name, attrs in (("features", patches.feature_attrs), ("local_features", patches.local_feature_attrs)):
            data = getattr(patches, name)
            if data is not None:
                chunks = (min(len(data), 256), *data.shape[1:]) if len(data) else None
                f.create_dataset(name, data=data, chunks=chunks).attrs.update(attrs)
    return path


# ----------------------------------------------------------------------------- reading


def _plain(value):
    """An HDF5 attribute as plain Python (str, int, float, list)."""
    if isinstance(value, bytes):
        return value.decode()
    return value.tolist() if hasattr(value, "tolist") else value


def _finite(value) -> float | None:
    value = None if value is None else float(value)
    return None if value is None or not math.isfinite(value) else value


def _geometry(attrs: dict) -> PatchGeometry | None:
    """The geometry of ``coords`` attrs (schema 2, schema 1's ``level0_patch_size``, or TRIDENT); None without it."""
    if "patch_size" not in attrs or "patch_level" not in attrs:
        return None
    p = int(attrs["patch_size"])
    level0 = attrs.get("patch_size_level0", attrs.get("level0_patch_size"))
    downsample = np.atleast_1d(attrs["downsample"]).astype(float)[0] if "downsample" in attrs else None
    if level0 is None:
        level0 = round(p * (downsample or 1.0))
    if downsample is None:
        downsample = float(level0) / p
    level_dim = tuple(int(v) for v in np.asarray(attrs["level_dim"]).reshape(-1)[:2]) if "level_dim" in attrs else None
    local = int(attrs["local_size"]) if "local_size" in attrs else None
    read = int(attrs["patch_size_level"]) if "patch_size_level" in attrs else None
    return PatchGeometry(p, int(attrs["patch_level"]), int(level0), float(downsample), level_dim, _finite(attrs.get("mpp")),
                         local, None if read == p else read)


def schema1_options(attrs: dict) -> tuple[dict, dict | None, float | None]:
    """Preprocess options, rule dict and cut of a schema-1 file's loose ``coords`` attrs (also what
    ``pipeline.json`` recorded before schema 2)."""
    options = {key: _plain(attrs[key]) for key in ("patch_size", "local_size", "selector", "tissue_min") if key in attrs}
    if "rule" not in attrs:
        return options, None, None
    name = str(_plain(attrs["rule"]))
    cut = _finite(attrs.get("threshold"))
    rule = {"rule": name, "n_sigma": float(attrs.get("n_sigma", 1.0)), "threshold": None, "k": None, "min_keep": 1}
    if name in ("threshold", "cohort"):
        rule["threshold"] = cut  # the absolute cut (for cohort: the frozen one; None while pending)
    if name == "topk" and int(attrs.get("k", -1)) >= 0:
        rule["k"] = int(attrs["k"])
    return options, rule, cut


def read_patch_file(path: str | os.PathLike, *, features: bool = True, local: bool = True) -> SlidePatches:
    """The :class:`SlidePatches` of a patch file (schema 2 or 1, or a CLAM/TRIDENT feature file).

    ``features=False`` leaves the feature arrays unread (their attrs are read; :attr:`SlidePatches.unread`
    names them), ``local=False`` the local ones; such patches cannot be written back. Raises FileNotFoundError or ValueError naming the file.
    """
    import h5py

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"patch file {path}: no such file")
    try:
        with h5py.File(path, "r") as f:
            return _read(f, path, features, local)
    except OSError as exc:
        raise ValueError(f"patch file {path}: not a readable HDF5 file ({exc})") from None


def _read(f, path: Path, features: bool, local: bool) -> SlidePatches:
    if "coords" not in f:
        raise ValueError(f"patch file {path}: no 'coords' dataset (not written by isg preprocess?; has: {', '.join(f) or 'nothing'})")
    root = {key: _plain(value) for key, value in f.attrs.items()}
    coords_attrs = {key: _plain(value) for key, value in f["coords"].attrs.items()}
    coords = np.asarray(f["coords"][()], np.int64).reshape(-1, 2)
    if str(root.get("encoding-version", "1")) == SCHEMA_VERSION:
        options, rule = json.loads(root.get("options", "{}")), json.loads(root.get("rule", "null"))
        cut = None if rule is None else rule.pop("cut", None)
    elif "encoding-version" in root:
        raise ValueError(f"patch file {path}: schema version {root['encoding-version']!r} is newer than this isg "
                         f"reads ({SCHEMA_VERSION})")
    else:
        options, rule, cut = schema1_options(coords_attrs)
    if "all_coords" in f:
        tissue = np.asarray(f["all_coords"][()], np.int64).reshape(-1, 2)
        selected = np.asarray(f["selected"][()], bool) if "selected" in f else None
        if selected is None or selected.shape != (len(tissue),) or not np.array_equal(tissue[selected], coords):
            raise ValueError(f"patch file {path}: 'selected' does not pick 'coords' out of 'all_coords' (damaged file?)")
    else:  # a CLAM/TRIDENT feature file: every patch is selected
        tissue, selected = coords, np.ones(len(coords), bool)
    scores = np.asarray(f["scores"][()], np.float64) if "scores" in f else None
    if scores is not None and (scores.shape != (len(tissue),) or not np.isfinite(scores).all()):
        raise ValueError(f"patch file {path}: scores must be finite, one per tissue patch ({len(tissue)}); got shape {scores.shape}")
    arrays, attrs, unread = {}, {}, []
    for name, wanted in (("features", features), ("local_features", features and local)):
        if name in f:
            attrs[name] = {key: _plain(value) for key, value in f[name].attrs.items()}
            arrays[name] = f[name][()] if wanted else None
            if not wanted:
                unread.append(name)
    damaged = np.asarray(f["damaged_coords"][()], np.int64) if "damaged_coords" in f else np.zeros((0, 2), np.int64)
    reasons = list(f["damaged_reasons"].asstr()[()]) if "damaged_reasons" in f else [""] * len(damaged)
    dimensions = root.get("dimensions")
    try:
        return SlidePatches(
            slide_id=str(root.get("slide_id", coords_attrs.get("name", path.stem))),
            slide_path=_slide_path(root.get("slide_path"), path), geometry=_geometry(coords_attrs),
            tissue_coords=tissue, scores=scores, selected=selected, damaged_coords=damaged, damaged_reasons=reasons,
            options=options, rule=rule, cut=_finite(cut), backend=root.get("backend") or None,
            level0_mpp=_finite(root.get("level0_mpp")), dimensions=None if dimensions is None else tuple(dimensions)[:2],
            isg_version=root.get("isg_version"), features=arrays.get("features"), local_features=arrays.get("local_features"),
            feature_attrs=attrs.get("features", {}), local_feature_attrs=attrs.get("local_features", {}),
            unread=tuple(unread))
    except ValueError as exc:  # the arrays disagree
        raise ValueError(f"{path}: {exc}") from None


def _slide_path(stored, h5_path: Path) -> str | None:
    """The stored slide path; a relative one that does not exist resolves against the patch file's folder."""
    if not stored:
        return None
    slide = Path(stored)
    if not slide.is_absolute() and not slide.exists():
        slide = h5_path.parent / slide
    return str(slide)


def is_complete(path: str | os.PathLike) -> bool:
    """True for a finished patch file (opens, holds ``coords`` with its geometry and ``selected``); a damaged or
    foreign file is False (redo it)."""
    import h5py

    path = Path(path)
    if not path.is_file():
        return False
    try:
        with h5py.File(path, "r") as f:
            return "coords" in f and "selected" in f and "patch_size" in f["coords"].attrs
    except OSError:
        return False


def geometry_dict(geometry: PatchGeometry | None) -> dict:
    """JSON-ready dict of a geometry ({} for None)."""
    return {} if geometry is None else asdict(geometry)
