"""Slide backends: one registration each (name, suffixes, availability probe, automatic choice) and the one
factory, :func:`open_slide`.

A backend is a :class:`~isg.io.slide.Slide` subclass in its own module of :mod:`isg.io.backends`,
registered with :func:`register_backend`::

    @register_backend("mine", suffixes=(".xyz",), probe=lambda: importlib.util.find_spec("xyz") is not None,
                      accepts=lambda path, kind: path.suffix == ".xyz", auto_rank=25)
    class MySlide(Slide):
        backend = "mine"
        def __init__(self, path, mpp=None, max_damaged=DAMAGED_LIMIT): ...  # fill the levels, then _finish_init()
        def _read(self, x, y, level, w, h, out): ...                        # the in-bounds pixels of a region

``open_slide(path, backend="mine")`` then opens it, ``auto`` considers it for the files it ``accepts``
(lowest ``auto_rank`` first, among the available ones), and :func:`isg.io.iter_tiles` streams it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from isg.io.damage import DAMAGED_LIMIT, SlideError
from isg.io.metadata import sniff


@dataclass(frozen=True)
class BackendSpec:
    """A registered backend. ``accepts(path, kind)`` (kind: 'tiff' | 'image' | 'unknown' from the magic bytes)
    says whether ``auto`` may pick it for a file; ``prefer()`` whether ``auto`` should on this machine
    (e.g. a GPU is present); ``auto_rank`` orders the candidates (None: never picked automatically)."""

    name: str
    cls: type
    suffixes: tuple[str, ...]
    probe: Callable[[], bool]
    accepts: Callable[[Path, str], bool]
    auto_rank: int | None = None
    prefer: Callable[[], bool] = lambda: True

    def available(self) -> bool:
        """Whether the backend's library imports on this machine (checked each time: installs can change)."""
        try:
            return bool(self.probe())
        except Exception:
            return False


_REGISTRY: dict[str, BackendSpec] = {}


def register_backend(name: str, suffixes: tuple[str, ...], probe: Callable[[], bool],
                     accepts: Callable[[Path, str], bool] = lambda path, kind: False, auto_rank: int | None = None,
                     prefer: Callable[[], bool] = lambda: True):
    """Class decorator: register a :class:`~isg.io.slide.Slide` subclass as backend ``name``."""

    def decorate(cls):
        _REGISTRY[name] = BackendSpec(name, cls, tuple(suffixes), probe, accepts, auto_rank, prefer)
        return cls

    return decorate


def unregister_backend(name: str) -> None:
    """Remove a registration (tests register toy backends)."""
    _REGISTRY.pop(name, None)


def backend_spec(name: str) -> BackendSpec:
    _load()
    if name not in _REGISTRY:
        raise ValueError(f"unknown slide backend {name!r}; expected 'auto' or one of {', '.join(backend_names())}")
    return _REGISTRY[name]


def backend_names() -> tuple[str, ...]:
    """Names of the registered backends, in registration order."""
    _load()
    return tuple(_REGISTRY)


def backend_available(name: str) -> bool:
    """Whether backend ``name`` is registered and its library imports here."""
    _load()
    return name in _REGISTRY and _REGISTRY[name].available()


def supported_suffixes() -> tuple[str, ...]:
    """Every file suffix some registered backend reads (sorted)."""
    _load()
    return tuple(sorted({suffix for spec in _REGISTRY.values() for suffix in spec.suffixes}))


def _load() -> None:
    import isg.io.backends  # noqa: F401 - the built-in backends register themselves on import


def _dicom_file(folder: Path) -> Path | None:
    """The first ``.dcm`` file of a DICOM WSI folder (OpenSlide finds the other instances beside it), else None."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == ".dcm")
    return files[0] if files else None


def choose_backend(path: Path, kind: str) -> str:
    """The backend ``auto`` opens ``path`` with: the lowest ``auto_rank`` among the available, preferred
    backends that accept the file."""
    _load()
    candidates = sorted((spec for spec in _REGISTRY.values() if spec.auto_rank is not None), key=lambda s: s.auto_rank)
    for spec in candidates:
        if spec.accepts(path, kind) and spec.available() and spec.prefer():
            return spec.name
    raise SlideError(path, f"unsupported format (suffix {path.suffix.lower() or 'none'!r}, not a TIFF or image file; "
                           f"supported: {', '.join(supported_suffixes())})")


def open_slide(path, backend: str = "auto", mpp: float | None = None, max_damaged: float = DAMAGED_LIMIT, **options):
    """Open a whole-slide image (a file, or the folder of a DICOM WSI).

    ``backend``: "auto" or a registered name (:func:`backend_names`: tifffile, openslide, cucim, image,
    nvimgcodec). ``mpp`` (um/px at level 0) overrides the metadata; without it a whole-slide file lacking mpp
    metadata raises :class:`SlideError` (plain images do not need one: their ``mpp`` is then None).
    ``max_damaged``: a TIFF with a larger fraction of the tiles of a level missing from the file (truncated)
    is rejected. ``options`` go to the backend's class. Missing, corrupt, truncated, unsupported and
    too-small files raise :class:`SlideError` naming the file.
    """
    path = Path(path)
    if backend != "auto":
        backend_spec(backend)  # unknown names fail first
    if not path.exists():
        raise SlideError(path, "file not found")
    if path.is_dir() and _dicom_file(path) is not None:
        path = _dicom_file(path)
    if not path.is_file():
        raise SlideError(path, "not a file")
    if path.stat().st_size == 0:
        raise SlideError(path, "empty file")
    kind = sniff(path)
    if backend == "auto":
        suffix = path.suffix.lower()
        if kind != "tiff" and suffix in (".tif", ".tiff", ".svs"):
            raise SlideError(path, f"corrupt: a {suffix} file must start with a TIFF header, got {path.read_bytes()[:4]!r}")
        backend = choose_backend(path, kind)
    cls = backend_spec(backend).cls
    return cls(path, mpp=mpp, max_damaged=max_damaged, **options)
