"""Which slides a command was given: files, folders of slides, DICOM WSI folders and manifests' ``slide_path``
column, in one place (the CLI only maps :class:`SlideListError` to its own error)."""

from __future__ import annotations

from pathlib import Path

from isg.io.registry import supported_suffixes


class SlideListError(ValueError):
    """The slides given cannot be listed: a missing file or folder, an unreadable manifest, ..."""


def slide_suffixes() -> tuple[str, ...]:
    """Suffixes a folder listing takes: every format a backend reads, except DICOM instances (a folder of them
    is one slide)."""
    return tuple(suffix for suffix in supported_suffixes() if suffix != ".dcm")


def is_dicom_folder(path: Path) -> bool:
    """Whether ``path`` is a folder holding DICOM instances (one DICOM WSI)."""
    return path.is_dir() and any(p.suffix.lower() == ".dcm" for p in path.iterdir() if p.is_file())


def slides_in(folder: Path) -> list[Path]:
    """Slide files of a folder (:func:`slide_suffixes`) and its subfolders holding a DICOM WSI (one slide each);
    a folder of DICOM instances is itself one slide."""
    folder = Path(folder)
    if is_dicom_folder(folder):
        return [folder]
    suffixes = slide_suffixes()
    return sorted(p for p in folder.iterdir() if (p.is_file() and p.suffix.lower() in suffixes) or is_dicom_folder(p))


def manifest_slides(manifest) -> tuple[list[Path], list[str]]:
    """(slides found, paths missing) of a CSV/TSV manifest's ``slide_path`` column (relative to the manifest)."""
    from isg.utils import read_text_table

    manifest = Path(manifest)
    try:
        table = read_text_table(manifest, what="--manifest", error=SlideListError)
    except FileNotFoundError as exc:
        raise SlideListError(str(exc)) from None
    if "slide_path" not in table.columns:
        raise SlideListError(f"--manifest {manifest}: no slide_path column (has: {', '.join(table.columns)})")
    found, missing = [], []
    for name in table["slide_path"].str.strip():
        path = Path(name) if Path(name).is_absolute() else manifest.resolve().parent / name
        (found.append(path) if path.is_file() or is_dicom_folder(path) else missing.append(str(path)))
    return found, missing


def find_slides(paths=(), manifest=None) -> list[Path]:
    """Slides named by ``paths`` (files, folders of slides, DICOM WSI folders) and a ``manifest``, in that order.
    Raises :class:`SlideListError` for missing files, folders without slides, a bad manifest or no slides."""
    from isg.utils import list_some

    slides: list[Path] = []
    missing: list[str] = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            found = slides_in(path)
            if not found:
                raise SlideListError(f"folder {path} holds no slide files ({', '.join(slide_suffixes())}) or DICOM WSI")
            slides += found
        elif path.is_file():
            slides.append(path)
        else:
            missing.append(str(name))
    if manifest:
        found, absent = manifest_slides(manifest)
        slides += found
        missing += absent
    if missing:
        raise SlideListError(f"{len(missing)} slide file(s) not found: {list_some(missing)}")
    if not slides:
        raise SlideListError("no slides given: pass SLIDE files/folders or --manifest CSV")
    return slides
