"""Feature extractors: parameter counts and CPU encode rates, compact and large, vs HE2RNA's ResNet50.

    OMP_WAIT_POLICY=PASSIVE python3 -m pytest bench/bench_features.py --benchmark-enable -s

Tables (printed, and written to bench/results/):
* ``features_params``: millions of parameters of E, D and C, large autoencoders (global r = 128,
  local r = 64, d = 512, ``channel_base=8192, channel_max=256``) and the compact default.
* ``features_encode``: patches per second through the encoder on CPU (batch 16, all threads), compact
  vs large, and ResNet50 on HE2RNA's 224 px tiles (random weights: same cost as ImageNet ones).

Goal (asserted): one global patch and its 16 local sub-patches through the compact encoders cost less
than ResNet50 on the same tissue area (256^2 / 224^2 = 1.3 HE2RNA tiles at the same magnification);
this is where ISG's inference advantage over HE2RNA comes from (bench_efficiency.py measures it end to end).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from isg.features.autoencoder import Autoencoder
from isg.io import LOCAL_SIZE, PATCH_SIZE
from isg.train.config import AutoencoderTrainConfig

BATCH = 16
LARGE = {"channel_base": 8192, "channel_max": 256}
COMPACT = {"channel_base": AutoencoderTrainConfig.channel_base, "channel_max": AutoencoderTrainConfig.channel_max}
RESOLUTIONS = {"global": (AutoencoderTrainConfig.GLOBAL_RESOLUTION, 128), "local": (AutoencoderTrainConfig.LOCAL_RESOLUTION, 64)}
D = AutoencoderTrainConfig.d


def _millions(module: torch.nn.Module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6


def _rate(report, fn, resolution: int) -> float:
    """Inputs per second of ``fn`` on a [BATCH, 3, r, r] batch (median of 5 after a warm-up)."""
    x = torch.rand(BATCH, 3, resolution, resolution) * 2 - 1
    with torch.inference_mode():
        return BATCH / report.measure(lambda: fn(x), repeat=5, warmup=1)


def test_feature_extractors(report):
    torch.manual_seed(0)
    per_second = {}
    for kind, (compact_r, large_r) in RESOLUTIONS.items():
        for size, r, widths in (("compact", compact_r, COMPACT), ("large", large_r, LARGE)):
            ae = Autoencoder(r, D, **widths).eval()
            critic = ae.make_discriminator()
            report.add("features_params", f"{kind} {size} (r = {r})", _millions(ae.encoder), unit="M parameters (E)",
                       decoder_m=round(_millions(ae.decoder), 2), discriminator_m=round(_millions(critic), 2))
            per_second[kind, size] = _rate(report, ae.encode, r)
            report.add("features_encode", f"{kind} {size} encoder (r = {r})", per_second[kind, size],
                       unit="inputs/s", threads=torch.get_num_threads())
    from isg.baselines import load_resnet50

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights: the cost is the same
        resnet = load_resnet50()
    per_second["resnet50"] = _rate(report, resnet, 224)
    report.add("features_encode", "ResNet50, 224 px tile (HE2RNA)", per_second["resnet50"], unit="inputs/s",
               baseline=True, threads=torch.get_num_threads())

    locals_per_patch = (PATCH_SIZE // LOCAL_SIZE) ** 2
    isg_seconds = 1 / per_second["global", "compact"] + locals_per_patch / per_second["local", "compact"]
    he2rna_seconds = (PATCH_SIZE / 224) ** 2 / per_second["resnet50"]
    report.add("features_area", "ISG compact: 1 global + 16 local encodes", isg_seconds * 1e3, unit="ms per 256 px area",
               higher_is_better=False)
    report.add("features_area", "HE2RNA: ResNet50 on 1.3 tiles", he2rna_seconds * 1e3, unit="ms per 256 px area",
               higher_is_better=False, baseline=True)
    assert isg_seconds < he2rna_seconds, (f"compact ISG features cost {isg_seconds * 1e3:.1f} ms per 256 px area, "
                                          f"ResNet50 {he2rna_seconds * 1e3:.1f} ms")


if __name__ == "__main__":
    pytest.main([__file__, "--benchmark-enable", "-s"])
