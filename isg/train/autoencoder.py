"""Training of the StyleGAN2-based patch autoencoders (ISG paper, Sec. 3.2, Eq. 2).

Objective, with u(t) = log sigmoid(t) = -softplus(-t) and C scoring real images high:

    min_{E, D} max_C  |x - D(E(x))|_1 + lambda * LPIPS(x, D(E(x))) + u(C(x)) + u(-C(D(E(x))))

implemented as StyleGAN2 does: E and D minimise L1 + lambda * LPIPS + adv_weight *
softplus(-C(D(E(x)))) (the non-saturating form of the adversarial term), C minimises
softplus(C(D(E(x)))) + softplus(-C(x)) plus a lazy R1 penalty on real images. Adam with
betas (0, 0.99), an exponential moving average of the decoder (exported with the encoder),
mixed precision on CUDA (bfloat16, or float16 with loss scaling), a resumable checkpoint
``checkpoint.pt`` (also a valid autoencoder checkpoint) and ``history.json`` in ``out_dir``.

Tiles come from a uint8 array/tensor [N, H, W, 3] or from preprocessed slides: a folder or
list of per-slide .h5 files whose selected patches (``kind="global"``) or their q-pixel
sub-patches (``kind="local"``) are read once into an in-memory bank at the model resolution.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from isg.utils import atomic_path, write_text_atomic
from isg.features.autoencoder import CHECKPOINT_FORMAT, Autoencoder, save_autoencoder, tiles_to_input
from isg.features.lpips_loss import load_lpips
from isg.features.patches import iter_patches, open_patch_slide, read_patch_info, split_local

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
EXPORT = "autoencoder.pt"
HISTORY = "history.json"
LOSSES = ("l1", "lpips", "adv", "d_loss", "r1")


@dataclass
class AutoencoderTrainConfig:
    # model
    resolution: int = 64
    d: int = 512
    channel_base: int = 1024
    channel_max: int = 128
    mapping_layers: int = 2
    # data
    kind: str = "global"  # which inputs of .h5 sources: "global" patches or "local" sub-patches
    max_tiles: int | None = 20000  # cap on the in-memory bank (random subset)
    augment: bool = True  # random flips / 90-degree rotations
    # optimisation
    epochs: float = 10.0
    max_steps: int | None = None  # overrides epochs when set
    batch_size: int = 32
    lr: float = 2e-3
    lpips_weight: float = 1.0  # lambda of Eq. 2
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
    progress: bool = True

    @classmethod
    def from_dict(cls, values: dict) -> AutoencoderTrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown autoencoder training option(s): {', '.join(unknown)}")
        return cls(**values)

    def model_kwargs(self) -> dict:
        return dict(resolution=self.resolution, d=self.d, channel_base=self.channel_base, channel_max=self.channel_max, mapping_layers=self.mapping_layers)


# ----------------------------------------------------------------------------- data


def h5_sources(source: str | os.PathLike | list) -> list[Path]:
    """A folder of .h5 files or a list of .h5 paths -> sorted list of paths (error when none)."""
    if isinstance(source, (list, tuple)):
        paths = [Path(p) for p in source]
    else:
        folder = Path(source)
        if not folder.is_dir():
            raise FileNotFoundError(f"h5 folder {folder}: no such directory")
        paths = sorted(folder.glob("*.h5"))
    if not paths:
        raise ValueError(f"h5 folder {source}: holds no .h5 files")
    return paths


def collect_tiles(h5_paths: list, kind: str, resolution: int, max_tiles: int | None = None, seed: int = 0, batch_size: int = 64, num_workers: int = 4) -> torch.Tensor:
    """Training bank uint8 [N, r, r, 3] from the selected patches of preprocessed slides.

    ``kind="global"``: each selected p-pixel patch; ``"local"``: each of its S x S q-pixel
    sub-patches; all resized to ``resolution``. With ``max_tiles`` a random subset of global
    patches (spread over slides) is read. Slides that fail are logged and skipped.
    """
    if kind not in ("global", "local"):
        raise ValueError(f"kind must be 'global' or 'local', got {kind!r}")
    infos = []
    for path in h5_paths:
        try:
            info = read_patch_info(path)
        except (OSError, ValueError) as exc:
            log.warning("skipping %s: %s", path, exc)
            continue
        if info.slide_path is None or not info.slide_path.is_file():  # do not spend the tile budget on it
            log.warning("skipping %s: slide %s not found", path, info.slide_path)
            continue
        infos.append(info)
    counts = np.array([len(info.coords) for info in infos])
    per_patch = [1 if kind == "global" else info.grid**2 for info in infos]
    rng = np.random.default_rng(seed)
    chosen = [np.arange(n) for n in counts]
    total = sum(n * k for n, k in zip(counts, per_patch))
    if max_tiles is not None and total > max_tiles:  # same random fraction of patches from every slide
        flat = rng.permutation(np.repeat(np.arange(len(infos)), counts))
        budget, keep = max_tiles, np.zeros(len(infos), int)
        for slide in flat:
            if budget < per_patch[slide]:
                break
            keep[slide] += 1
            budget -= per_patch[slide]
        chosen = [np.sort(rng.choice(n, size=k, replace=False)) for n, k in zip(counts, keep)]
    bank = []
    for info, idx in zip(infos, chosen):
        if len(idx) == 0:
            continue
        try:
            with open_patch_slide(info) as slide:
                for _, tiles in iter_patches(slide, info.coords[idx], info.patch_size, info.patch_level, batch_size, "cpu", num_workers):
                    if kind == "local":
                        tiles = split_local(tiles, info.local_size).reshape(-1, info.local_size, info.local_size, 3)
                    x = tiles_to_input(tiles, resolution)  # [B, 3, r, r]
                    bank.append(((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1))
        except (OSError, ValueError) as exc:
            log.warning("skipping slide of %s: %s", info.h5_path, exc)
    if not bank:
        raise ValueError(f"no {kind} training tiles could be read from {len(h5_paths)} .h5 file(s)")
    return torch.cat(bank)


def _as_bank(tiles_source, config: AutoencoderTrainConfig) -> torch.Tensor:
    if isinstance(tiles_source, (torch.Tensor, np.ndarray)):
        tiles = torch.as_tensor(tiles_source)
        if tiles.ndim != 4 or tiles.shape[-1] != 3 or tiles.dtype != torch.uint8 or len(tiles) == 0:
            raise ValueError(f"tiles_source must be uint8 RGB tiles [N, H, W, 3] (N > 0), got {tiles.dtype} {tuple(tiles.shape)}")
        return tiles.cpu()
    return collect_tiles(h5_sources(tiles_source), config.kind, config.resolution, config.max_tiles, config.seed)


def _augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random element of the dihedral group per sample (histology has no orientation). x [B, 3, r, r]."""
    ops = torch.randint(0, 8, (x.shape[0],), generator=generator)
    out = x.clone()
    for k in range(8):
        sel = (ops == k).nonzero().flatten()
        if len(sel):
            y = torch.rot90(x[sel], k % 4, dims=(2, 3))
            out[sel] = y.flip(3) if k >= 4 else y
    return out


# ----------------------------------------------------------------------------- training


def _export_state(ae: Autoencoder, decoder_ema: torch.nn.Module) -> dict:
    """State dict of E with the EMA decoder: the autoencoder to extract features with."""
    state = {f"encoder.{k}": v for k, v in ae.encoder.state_dict().items()}
    state.update({f"decoder.{k}": v for k, v in decoder_ema.state_dict().items()})
    return {k: v.detach().cpu().clone() for k, v in state.items()}


def _cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu(v) for v in obj)
    return obj


def train_autoencoder(tiles_source, out_dir: str | os.PathLike, config: AutoencoderTrainConfig | dict | None = None, resume: bool = True) -> tuple[Autoencoder, dict]:
    """Train one autoencoder (global or local) and write it to ``out_dir``.

    Args:
        tiles_source: uint8 tiles [N, H, W, 3] (array or tensor), or a folder / list of
            per-slide .h5 files (see :func:`collect_tiles`; ``config.kind`` picks global or local).
        out_dir: gets ``checkpoint.pt`` (every ``checkpoint_every`` steps and at the end),
            ``autoencoder.pt`` (encoder + EMA decoder) and ``history.json``.
        config: :class:`AutoencoderTrainConfig` or a dict of its fields.
        resume: continue from ``out_dir/checkpoint.pt`` when present (same config required).

    Returns:
        (autoencoder with the EMA decoder, in eval mode, history {"step": [...], "l1": [...], ...}).
    """
    config = config if isinstance(config, AutoencoderTrainConfig) else AutoencoderTrainConfig.from_dict(config or {})
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(config.device)
    torch.manual_seed(config.seed)
    bank = _as_bank(tiles_source, config)  # uint8 [N, H, W, 3] on CPU
    steps = config.max_steps if config.max_steps is not None else max(1, math.ceil(config.epochs * len(bank) / config.batch_size))

    ae = Autoencoder(**config.model_kwargs()).to(device)
    disc = ae.make_discriminator(config.mbstd_group).to(device)
    decoder_ema = copy.deepcopy(ae.decoder).eval().requires_grad_(False)
    lpips = load_lpips(config.lpips_weights, device) if config.lpips_weight > 0 else None
    adam = dict(lr=config.lr, betas=(0.0, 0.99), eps=1e-8)
    opt_g = torch.optim.Adam(ae.parameters(), **adam)
    r1_ratio = config.r1_interval / (config.r1_interval + 1)  # lazy regularisation (StyleGAN2)
    opt_d = torch.optim.Adam(disc.parameters(), lr=config.lr * r1_ratio, betas=(0.0, 0.99**r1_ratio), eps=1e-8)

    use_amp = config.amp and device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    autocast = lambda: torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp)  # noqa: E731

    history = {"step": [], **{k: [] for k in LOSSES}}
    start = 0
    ckpt_path = out_dir / CHECKPOINT
    if resume and ckpt_path.is_file():
        try:
            ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(f"{ckpt_path}: cannot be read ({exc}); delete it or use resume=False") from exc
        saved = ckpt.get("extra", {}).get("train_config", {})
        if ckpt.get("format") != CHECKPOINT_FORMAT or "train_state" not in ckpt:
            raise ValueError(f"{ckpt_path}: not a resumable isg autoencoder checkpoint")
        if saved.get("kind") != config.kind or ckpt["config"] != ae.config:
            raise ValueError(f"{ckpt_path}: written with a different model/kind ({ckpt['config']}, kind={saved.get('kind')}); use another --out or resume=False")
        ts = ckpt["train_state"]
        ae.load_state_dict(ts["autoencoder"])
        decoder_ema.load_state_dict(ts["decoder_ema"])
        disc.load_state_dict(ts["discriminator"])
        opt_g.load_state_dict(ts["opt_g"])
        opt_d.load_state_dict(ts["opt_d"])
        scaler.load_state_dict(ts["scaler"])
        torch.set_rng_state(ts["rng"])
        if device.type == "cuda" and "cuda_rng" in ts:
            torch.cuda.set_rng_state(ts["cuda_rng"], device)
        start, history = int(ts["step"]), {k: list(v) for k, v in ts["history"].items()}
        log.info("resuming %s from step %d", out_dir, start)

    def save_checkpoint(step: int) -> None:
        extra = {"train_config": asdict(config), "step": step, "history": history}
        state = {
            "format": CHECKPOINT_FORMAT, "config": dict(ae.config), "state_dict": _export_state(ae, decoder_ema), "extra": extra,
            "train_state": _cpu({
                "autoencoder": ae.state_dict(), "decoder_ema": decoder_ema.state_dict(), "discriminator": disc.state_dict(),
                "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(), "scaler": scaler.state_dict(),
                "rng": torch.get_rng_state(), "step": step, "history": history,
                **({"cuda_rng": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {}),
            }),
        }
        with atomic_path(ckpt_path) as tmp:
            torch.save(state, tmp)
        write_text_atomic(out_dir / HISTORY, json.dumps(history))

    ae.train(), disc.train()
    bar = tqdm(range(start, steps), initial=start, total=steps, desc=f"autoencoder ({config.kind})", disable=not config.progress)
    for step in bar:
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step)  # batch = f(seed, step): exact resume
        idx = torch.randint(0, len(bank), (config.batch_size,), generator=generator)
        real = tiles_to_input(bank[idx], config.resolution, device)  # [B, 3, r, r]
        if config.augment:
            real = _augment(real, generator)

        # E, D: L1 + lambda LPIPS + non-saturating adversarial term
        disc.requires_grad_(False)
        with autocast():
            fake = ae(real)
            l1 = (fake.float() - real).abs().mean()
            perceptual = lpips(fake, real).mean() if lpips is not None else torch.zeros((), device=device)
            adv = F.softplus(-disc(fake)).float().mean() if config.adv_weight > 0 else torch.zeros((), device=device)
            loss_g = l1 + config.lpips_weight * perceptual + config.adv_weight * adv
        opt_g.zero_grad(set_to_none=True)
        scaler.scale(loss_g).backward()
        scaler.step(opt_g)

        # C: softplus(C(fake)) + softplus(-C(real)), lazy R1 on real images
        d_loss = r1 = torch.zeros((), device=device)
        if config.adv_weight > 0:
            disc.requires_grad_(True)
            do_r1 = config.r1_gamma > 0 and step % config.r1_interval == 0
            real_d = real.detach().requires_grad_(do_r1)
            with autocast():
                real_logits = disc(real_d).float()  # [B]
                d_loss = (F.softplus(disc(fake.detach()).float()) + F.softplus(-real_logits)).mean()
            loss_d = d_loss
            if do_r1:  # R1 = |grad_x C(x)|^2 on real images, applied every r1_interval steps
                (grad,) = torch.autograd.grad(real_logits.sum(), real_d, create_graph=True)
                r1 = grad.float().square().sum(dim=(1, 2, 3)).mean()
                loss_d = loss_d + r1 * (config.r1_gamma / 2) * config.r1_interval
            opt_d.zero_grad(set_to_none=True)
            scaler.scale(loss_d).backward()
            scaler.step(opt_d)
        scaler.update()

        # EMA of the decoder (half-life ema_kimg thousand images, ramped up early on)
        with torch.no_grad():
            ema_nimg = min(config.ema_kimg * 1000, (step + 1) * config.batch_size * config.ema_rampup)
            beta = 0.5 ** (config.batch_size / max(ema_nimg, 1e-8))
            for p_ema, p in zip(decoder_ema.parameters(), ae.decoder.parameters()):
                p_ema.lerp_(p.detach(), 1 - beta)
            for b_ema, b in zip(decoder_ema.buffers(), ae.decoder.buffers()):
                b_ema.copy_(b)

        values = {"l1": l1, "lpips": perceptual, "adv": adv, "d_loss": d_loss, "r1": r1}
        history["step"].append(step)
        for k, v in values.items():
            history[k].append(float(v.detach()))
        bar.set_postfix(l1=f"{history['l1'][-1]:.3f}", lpips=f"{history['lpips'][-1]:.3f}", d=f"{history['d_loss'][-1]:.3f}")
        if config.checkpoint_every and (step + 1) % config.checkpoint_every == 0 and step + 1 < steps:
            save_checkpoint(step + 1)
    bar.close()

    save_checkpoint(steps)
    result = Autoencoder(**config.model_kwargs())
    result.load_state_dict(_export_state(ae, decoder_ema))
    save_autoencoder(out_dir / EXPORT, result, extra={"train_config": asdict(config), "steps": steps, "n_tiles": len(bank)})
    return result.to(device).eval(), history


__all__ = ["AutoencoderTrainConfig", "train_autoencoder", "collect_tiles", "h5_sources"]
