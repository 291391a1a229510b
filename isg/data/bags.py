"""Bags of patch features: one per slide, from its patch file (:mod:`isg.data.patch_file`).

A bag holds ``features`` [N, d], ``local_features`` [N, S, S, d] (optional) and ``coords`` [N, 2]
of the N selected patches of one slide, as tensors (:func:`bag_arrays` takes them from a
:class:`~isg.data.patch_file.SlidePatches`, so ``isg predict`` makes a bag in memory);
:func:`collate_bags` pads a list of bags to the longest one and adds ``mask`` [B, N_max]
(True = real patch).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from isg.data.patch_file import SlidePatches, read_patch_file
from isg.utils import list_some

DATASETS = ("features", "local_features", "coords")


class BagDataset(Dataset):
    """Per-slide feature bags, optionally with expression targets.

    Args:
        paths: one feature .h5 file per slide.
        targets: [n_slides, n_genes] array aligned with ``paths`` (or None).
        max_patches: when set, a bag with more patches keeps a random subset of this
            many (in their original order), drawn anew at every access: training only.
        local: read ``local_features`` too.
        cache: keep every file's arrays in memory after the first read (per DataLoader worker process).
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike],
        targets: np.ndarray | torch.Tensor | None = None,
        *,
        max_patches: int | None = None,
        local: bool = True,
        cache: bool = False,
    ):
        self.paths = [Path(p) for p in paths]
        absent = [str(p) for p in self.paths if not p.is_file()]
        if absent:
            raise FileNotFoundError(f"{len(absent)} feature file(s) not found: {list_some(absent)}")
        if targets is not None:
            targets = torch.tensor(np.asarray(targets, dtype=np.float32))
            if targets.ndim != 2 or len(targets) != len(self.paths):
                raise ValueError(f"targets must be [n_slides={len(self.paths)}, n_genes], got {tuple(targets.shape)}")
        if max_patches is not None and max_patches < 1:
            raise ValueError(f"max_patches must be >= 1, got {max_patches}")
        self.targets, self.max_patches, self.local = targets, max_patches, local
        self._cache: dict[int, dict[str, np.ndarray]] | None = {} if cache else None
        self.slide_ids = [p.stem for p in self.paths]

    @classmethod
    def from_manifest(cls, manifest: pd.DataFrame, feature_dir: str | os.PathLike, expression: pd.DataFrame | None = None, **kwargs) -> BagDataset:
        """Bags ``feature_dir/<slide_id>.h5`` of the manifest's slides; targets = the expression row of each slide's sample."""
        paths = [Path(feature_dir) / f"{slide_id}.h5" for slide_id in manifest["slide_id"]]
        targets = None
        if expression is not None:
            absent = manifest["sample_id"][~manifest["sample_id"].isin(expression.index)].unique()
            if len(absent):
                raise ValueError(f"{len(absent)} manifest sample(s) have no expression row: {list_some(absent)} (see match_samples)")
            targets = expression.loc[manifest["sample_id"]].to_numpy(np.float32)
        dataset = cls(paths, targets, **kwargs)
        dataset.slide_ids = list(manifest["slide_id"])
        return dataset

    def __len__(self) -> int:
        return len(self.paths)

    def _read(self, index: int) -> dict[str, np.ndarray]:
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        path = self.paths[index]
        arrays = bag_arrays(read_patch_file(path, local=self.local), self.local, where=str(path))
        if self._cache is not None:
            self._cache[index] = arrays
        return arrays

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        arrays = self._read(index)
        n = len(arrays["features"])
        keep = slice(None)
        if self.max_patches is not None and n > self.max_patches:
            keep = torch.randperm(n)[: self.max_patches].sort().values.numpy()
        bag = to_bag({name: array[keep] for name, array in arrays.items()}, self.slide_ids[index])
        if self.targets is not None:
            bag["target"] = self.targets[index]
        return bag


def bag_arrays(patches: SlidePatches, local: bool = True, where: str | None = None) -> dict[str, np.ndarray]:
    """``features`` [N, d], ``coords`` [N, 2] and (``local``) ``local_features`` [N, S, S, d] of the selected
    patches; KeyError naming the file when features are missing, ValueError when there are none."""
    names = DATASETS if local else ("features", "coords")
    arrays = {"features": patches.features, "local_features": patches.local_features, "coords": patches.coords}
    missing = [name for name in names if arrays[name] is None]
    if missing:
        raise KeyError(f"feature file {where or patches.slide_id}: missing dataset(s) {', '.join(missing)} (run isg extract)")
    arrays = {name: arrays[name] for name in names}
    if arrays["features"].ndim != 2 or len(arrays["coords"]) == 0:
        shapes = ", ".join(f"{k} {v.shape}" for k, v in arrays.items())
        raise ValueError(f"feature file {where or patches.slide_id}: empty or misshapen datasets ({shapes}); "
                         f"expected features [N, d], N > 0")
    return arrays


def to_bag(arrays: dict[str, np.ndarray], slide_id: str) -> dict[str, torch.Tensor | str]:
    """A bag of tensors from :func:`bag_arrays` output: features float32, local features as stored (float16:
    a 24k-patch bag's cubes are 0.4 GB so, 0.8 GB in float32; models convert a chunk at a time)."""
    bag = {name: torch.from_numpy(np.ascontiguousarray(array)) for name, array in arrays.items()}
    bag["features"] = bag["features"].float()
    bag["slide_id"] = slide_id
    return bag


def collate_bags(bags: list[dict]) -> dict:
    """Stack bags of different sizes: tensors padded with zeros to [B, N_max, ...], ``mask`` [B, N_max] bool."""
    if not bags:
        raise ValueError("collate_bags needs at least one bag")
    sizes = [len(bag["features"]) for bag in bags]
    n_max = max(sizes)
    batch: dict = {"mask": torch.arange(n_max)[None, :] < torch.tensor(sizes)[:, None]}  # [B, N_max]
    for name in DATASETS:
        if name not in bags[0]:
            continue
        if len(bags) == 1:  # one bag (isg predict): a view, no copy
            batch[name] = bags[0][name].unsqueeze(0)
            continue
        first = bags[0][name]
        padded = first.new_zeros((len(bags), n_max, *first.shape[1:]))
        for i, bag in enumerate(bags):
            padded[i, : sizes[i]] = bag[name]
        batch[name] = padded
    if "target" in bags[0]:
        batch["target"] = torch.stack([bag["target"] for bag in bags])  # [B, G]
    batch["slide_id"] = [bag["slide_id"] for bag in bags]
    return batch
