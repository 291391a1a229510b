"""Slide arguments shared by the commands that read slides (preprocess, predict)."""

from __future__ import annotations

from pathlib import Path

from isg.io import SUPPORTED_SUFFIXES

# slide files a folder listing takes: every format isg.io reads, except DICOM instances (a folder of them is one slide)
SLIDE_SUFFIXES = tuple(suffix for suffix in SUPPORTED_SUFFIXES if suffix != ".dcm")


def _is_dicom_folder(path: Path) -> bool:
    return path.is_dir() and any(p.suffix.lower() == ".dcm" for p in path.iterdir() if p.is_file())


def _slides_in(folder: Path) -> list[Path]:
    """Slide files of a folder (suffixes :data:`isg.io.SUPPORTED_SUFFIXES`, DICOM instances excepted) and its
    subfolders holding a DICOM WSI (one slide each); a folder of DICOM instances is itself one slide."""
    if _is_dicom_folder(folder):
        return [folder]
    return sorted(p for p in folder.iterdir() if (p.is_file() and p.suffix.lower() in SLIDE_SUFFIXES) or _is_dicom_folder(p))


def add_slide_arguments(parser) -> None:
    parser.add_argument("slides", nargs="*", metavar="SLIDE",
                        help="slide files, folders of slides, or the folder of a DICOM WSI")
    parser.add_argument("--manifest", help="CSV/TSV with a slide_path column (paths relative to the manifest)")


def slides_from_args(args) -> list[Path]:
    from isg.cli import CLIError

    slides: list[Path] = []
    missing = []
    for name in args.slides:
        path = Path(name)
        if path.is_dir():
            found = _slides_in(path)
            if not found:
                raise CLIError(f"folder {path} holds no slide files ({', '.join(SLIDE_SUFFIXES)}) or DICOM WSI")
            slides += found
        elif path.is_file():
            slides.append(path)
        else:
            missing.append(name)
    if args.manifest:
        from isg.data.manifest import ManifestError

        try:
            import pandas as pd

            from isg.utils import table_separator

            manifest_path = Path(args.manifest)
            if not manifest_path.is_file():
                raise CLIError(f"--manifest {manifest_path}: no such file")
            table = pd.read_csv(manifest_path, sep=table_separator(manifest_path), dtype=str, keep_default_na=False)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ManifestError) as exc:
            raise CLIError(f"--manifest {args.manifest}: cannot be read ({exc})") from exc
        if "slide_path" not in table.columns.str.strip():
            raise CLIError(f"--manifest {args.manifest}: no slide_path column (has: {', '.join(table.columns)})")
        table.columns = table.columns.str.strip()
        for name in table["slide_path"].str.strip():
            path = Path(name) if Path(name).is_absolute() else manifest_path.resolve().parent / name
            (slides.append(path) if path.is_file() or _is_dicom_folder(path) else missing.append(str(path)))
    if missing:
        from isg.utils import list_some

        raise CLIError(f"{len(missing)} slide file(s) not found: {list_some(missing)}")
    if not slides:
        raise CLIError("no slides given: pass SLIDE files/folders or --manifest CSV")
    return slides
