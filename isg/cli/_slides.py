"""Slide arguments shared by the commands that read slides (preprocess, predict, bench): argparse and error
mapping only; :func:`isg.io.find_slides` lists them."""

from __future__ import annotations

from pathlib import Path

from isg.io import slide_suffixes

SLIDE_SUFFIXES = slide_suffixes()


def add_slide_arguments(parser) -> None:
    parser.add_argument("slides", nargs="*", metavar="SLIDE",
                        help="slide files, folders of slides, or the folder of a DICOM WSI")
    parser.add_argument("--manifest", help="CSV/TSV with a slide_path column (paths relative to the manifest)")


def slides_from_args(args) -> list[Path]:
    from isg.cli import CLIError
    from isg.io import SlideListError, find_slides

    try:
        return find_slides(args.slides, args.manifest)
    except SlideListError as exc:
        raise CLIError(str(exc)) from None
