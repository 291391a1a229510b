"""Training options: the one definition of every training default (the CLI reads these; no torch import here)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from isg.model.names import DEFAULT_MODEL
from isg.model.tasks import DEFAULT_TASK
from isg.utils import from_known_fields


SAMPLERS = ("auto", "bank", "stream")  # autoencoder training tiles: in-memory bank, or streamed from the cohort
SLIDES_PER_WINDOW = 16  # stream: slides read together (a window of tiles, shuffled)
PATCHES_PER_SLIDE = 64  # stream: patches taken from a slide per visit

LPIPS_WITHOUT_WEIGHTS = ("random", "off")  # what the LPIPS term does without ImageNet AlexNet weights


@dataclass
class TrainConfig:
    """Cross-validated training of a slide-level model (:func:`isg.train.expression.cross_validate`)."""

    model: str = DEFAULT_MODEL  # a registry name: isg-N-k, isg-N-k-plus, vit-s, vit-t4, he2rna
    task: str = DEFAULT_TASK  # a registered task (isg.model.tasks): "regression" or "msi" (binary classification)
    epochs: int = 40
    patience: int = 8
    batch_size: int = 4
    lr: float = 3e-4  # AdamW
    weight_decay: float = 1e-4
    clip_grad_norm: float = 1.0
    max_patches: int | None = 256  # random subset of patches per bag while training
    n_splits: int = 5
    val_fraction: float = 0.2
    seed: int = 0
    device: str = "cpu"
    model_kwargs: dict = field(default_factory=dict)


@dataclass
class AutoencoderTrainConfig:
    """One autoencoder (global or local) and its training (:func:`isg.train.autoencoder.train_autoencoder`).

    ``resolution=None`` takes the default of ``kind``: ``GLOBAL_RESOLUTION`` (whole
    p-pixel patches resized to 64) or ``LOCAL_RESOLUTION`` (q-pixel sub-patches
    resized to 32). The model fields are the compact extractor; ``channel_base=8192,
    channel_max=256`` with resolutions 128 / 64 is the large one (docs/features.md).
    """

    GLOBAL_RESOLUTION: ClassVar[int] = 64
    LOCAL_RESOLUTION: ClassVar[int] = 32
    # model
    resolution: int | None = None
    d: int = 512
    channel_base: int = 1024
    channel_max: int = 128
    mapping_layers: int = 2
    # data
    kind: str = "global"  # which inputs of .h5 sources: "global" patches or "local" sub-patches
    max_tiles: int | None = 20000  # cap on the in-memory bank (random subset)
    # "bank": at most max_tiles tiles read once into memory; "stream": tiles streamed from every slide across the
    # run (isg.train.patch_stream); "auto": the bank when the cohort's tiles fit in max_tiles, else the stream
    sampler: str = "auto"
    stream_slides: int = SLIDES_PER_WINDOW
    stream_patches: int = PATCHES_PER_SLIDE
    augment: bool = True  # random flips / 90-degree rotations
    # optimisation
    epochs: float = 10.0
    max_steps: int | None = None  # overrides epochs when set
    batch_size: int = 32
    lr: float = 2e-3  # Adam, betas (0, 0.99), as StyleGAN2
    lpips_weight: float = 1.0  # lambda of Eq. 2
    # Without ImageNet AlexNet weights (torch hub cache or lpips_weights): "random" keeps the LPIPS term on a
    # random AlexNet (warned), "off" drops it (L1 + adversarial, warned). Chosen by an earlier Tab. 5 measurement
    # that the final code's Tab. 5 no longer supports (random AlexNet slightly higher; docs/features.md): open.
    lpips_without_weights: str = "off"
    adv_weight: float = 1.0
    r1_gamma: float = 1.0
    r1_interval: int = 16
    mbstd_group: int = 4
    ema_kimg: float = 10.0  # decoder EMA half-life in thousands of images
    ema_rampup: float = 0.05
    # run
    device: str = "cpu"
    amp: bool = True  # mixed precision on CUDA
    seed: int = 0
    checkpoint_every: int = 500
    lpips_weights: str | None = None  # AlexNet state dict; default: torch hub cache
    lpips_impl: str = "isg"  # LPIPS computed by isg ("isg") or by the lpips package ("lpips"): the same distance
    progress: bool = True  # the built-in tqdm bar (set False when a progress callback renders instead)

    def __post_init__(self):
        if self.kind not in ("global", "local"):
            raise ValueError(f"kind must be 'global' or 'local', got {self.kind!r}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        if self.lpips_without_weights not in LPIPS_WITHOUT_WEIGHTS:
            raise ValueError(f"lpips_without_weights must be one of {', '.join(LPIPS_WITHOUT_WEIGHTS)}, got {self.lpips_without_weights!r}")
        if self.resolution is None:
            self.resolution = self.GLOBAL_RESOLUTION if self.kind == "global" else self.LOCAL_RESOLUTION

    @classmethod
    def from_dict(cls, values: dict) -> AutoencoderTrainConfig:
        return from_known_fields(cls, values, "autoencoder training option(s)")

    def model_kwargs(self) -> dict:
        """The :class:`isg.features.Autoencoder` arguments."""
        return dict(resolution=self.resolution, d=self.d, channel_base=self.channel_base, channel_max=self.channel_max,
                    mapping_layers=self.mapping_layers)


__all__ = ["LPIPS_WITHOUT_WEIGHTS", "PATCHES_PER_SLIDE", "SAMPLERS", "SLIDES_PER_WINDOW", "AutoencoderTrainConfig", "TrainConfig"]
