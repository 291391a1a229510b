"""Extractor checkpoints named by their bytes: a path and its SHA-256, checked when loaded, loaded once per process.

An :class:`ExtractorRef` is what travels to a Dask worker (a few bytes instead of the weights) and what a
model folder records for each extractor it carries. :meth:`ExtractorRef.cached` loads the autoencoder on
the first task of a process and reuses it for the next ones (:data:`isg.utils.PROCESS_CACHE`, keyed by
path, checksum and device); a file that is missing or no longer has the recorded checksum is refused with
an :class:`ExtractorError` naming it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from isg.checkpoint import CheckpointError
from isg.features.autoencoder import Autoencoder, load_autoencoder
from isg.utils import PROCESS_CACHE, file_sha256


class ExtractorError(CheckpointError):
    """An extractor checkpoint that is missing or altered; the message names the file."""


@dataclass(frozen=True)
class ExtractorRef:
    """An autoencoder checkpoint: absolute ``path``, ``sha256`` of its bytes, ``role`` (global / local) for messages."""

    path: str
    sha256: str
    role: str = "global"

    @classmethod
    def of(cls, path: str | os.PathLike, role: str = "global") -> ExtractorRef:
        """The reference of the file at ``path`` as it is now (its checksum is computed here)."""
        path = Path(path).resolve()
        if not path.is_file():
            raise ExtractorError(f"{role} extractor {path}: no such file")
        return cls(str(path), file_sha256(path), role)

    def verify(self) -> Path:
        """The path, after checking that the file exists and has the recorded checksum."""
        path = Path(self.path)
        if not path.is_file():
            raise ExtractorError(f"{self.role} extractor {path}: no such file")
        found = file_sha256(path)
        if found != self.sha256:
            raise ExtractorError(f"{self.role} extractor {path}: altered since it was recorded (SHA-256 {found[:12]}..., "
                                 f"expected {self.sha256[:12]}...)")
        return path

    def load(self, device: str | torch.device = "cpu") -> Autoencoder:
        """The autoencoder, in eval mode on ``device``, after :meth:`verify`."""
        return load_autoencoder(self.verify(), map_location=device)

    def cached(self, device: str | torch.device = "cpu") -> Autoencoder:
        """:meth:`load`, once per process and device; later calls return the same module."""
        return PROCESS_CACHE.get(("autoencoder", self.path, self.sha256, str(device)), lambda: self.load(device))


__all__ = ["ExtractorError", "ExtractorRef"]
