"""Training of the StyleGAN2-based patch autoencoders (ISG paper, Sec. 3.2, Eq. 2).

The paper writes the objective with u = Softplus and C the discriminator:

    min_{E, D} max_C  |x - D(E(x))|_1 + lambda * LPIPS(x, D(E(x))) + u(C(x)) + u(-C(D(E(x))))

We train it as StyleGAN2 (which the paper builds on) implements this logistic game, with
u = softplus: E and D minimise L1 + lambda * LPIPS + adv_weight * u(-C(D(E(x)))) (the
non-saturating generator term), C minimises u(C(D(E(x)))) + u(-C(x)) plus a lazy R1 penalty on
real images. Adam with betas (0, 0.99),
an exponential moving average of the decoder (exported with the encoder), mixed precision on
CUDA (bfloat16, or float16 with loss scaling), a resumable checkpoint ``checkpoint.pt`` (also a
valid autoencoder checkpoint) and ``history.json`` in ``out_dir``.

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
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from isg.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from isg.data.patch_file import read_patch_file
from isg.features.autoencoder import Autoencoder, extractor_size, save_autoencoder, shard_noise, tiles_to_input
from isg.features.lpips_loss import ALEXNET_FILE, cached_alexnet_weights, load_lpips
from isg.features.patches import open_patch_slide, split_local
from isg.io import BATCH_SIZE, NUM_WORKERS, iter_tiles
from isg.train.config import AutoencoderTrainConfig
from isg.train.distributed import Ranks, barrier, check_global_batch, mean_over_ranks, ranks_now, shard, sync_gradients
from isg.train.patch_stream import PatchStream, resized_tiles
from isg.utils import h5_sources, write_text_atomic

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
EXPORT = "autoencoder.pt"
HISTORY = "history.json"
LOSSES = ("l1", "lpips", "adv", "d_loss", "r1")


# ----------------------------------------------------------------------------- data


def _usable_patch_files(h5_paths: list, kind: str) -> list:
    """``(SlidePatches, S)`` of the patch files whose geometry and slide can be used (others logged, left out);
    S = local patches per side (1 for ``kind="global"``)."""
    usable = []
    for path in h5_paths:
        try:
            info = read_patch_file(path, features=False)
            if info.geometry is None:
                raise ValueError(f"patch file {path}: 'coords' lacks its geometry attrs (patch_size, patch_level)")
            grid = info.geometry.grid if kind == "local" else 1  # checks that q divides p
        except (OSError, ValueError) as exc:
            log.warning("skipping %s: %s", path, exc)
            continue
        if info.slide_path is None or not Path(info.slide_path).is_file():  # do not spend the tile budget on it
            log.warning("skipping %s: slide %s not found", path, info.slide_path)
            continue
        usable.append((info, grid))
    return usable


def collect_tiles(h5_paths: list, kind: str, resolution: int, max_tiles: int | None = None, seed: int = 0, batch_size: int = BATCH_SIZE, num_workers: int = NUM_WORKERS) -> torch.Tensor:
    """Training bank uint8 [N, r, r, 3] from the selected patches of preprocessed slides.

    ``kind="global"``: each selected p-pixel patch; ``"local"``: each of its S x S q-pixel
    sub-patches; all resized to ``resolution``. With ``max_tiles`` a random subset of global
    patches (spread over slides) is read. Slides that fail are logged and skipped.
    """
    if kind not in ("global", "local"):
        raise ValueError(f"kind must be 'global' or 'local', got {kind!r}")
    infos = _usable_patch_files(h5_paths, kind)
    counts = np.array([info.n_selected for info, _ in infos])
    per_patch = [grid**2 for _, grid in infos]
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
    for (info, _), idx in zip(infos, chosen):
        if len(idx) == 0:
            continue
        g = info.geometry
        try:
            with open_patch_slide(info) as slide:
                for _, tiles in iter_tiles(slide, info.coords[idx], g.size_at_level, level=g.patch_level,
                                           batch_size=batch_size, device="cpu", num_workers=num_workers,
                                           out_size=g.patch_size):
                    if kind == "local":
                        tiles = split_local(tiles, g.local_size).reshape(-1, g.local_size, g.local_size, 3)
                    bank.append(resized_tiles(tiles, resolution))
        except (OSError, ValueError) as exc:
            log.warning("skipping slide %s: %s", info.slide_path, exc)
    if not bank:
        raise ValueError(f"no {kind} training tiles could be read from {len(h5_paths)} .h5 file(s)")
    return torch.cat(bank)


class _Bank:
    """Training tiles held in memory; global batch t = tiles at random indices drawn from the step's generator."""

    def __init__(self, tiles: torch.Tensor, ranks: Ranks):
        self.tiles, self.ranks = tiles, ranks

    def __len__(self) -> int:
        return len(self.tiles)

    def take(self, step: int, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        idx = torch.randint(0, len(self.tiles), (batch_size,), generator=generator)  # the global batch
        return self.tiles[shard(idx, self.ranks)]

    def close(self) -> None:
        pass


class _Stream:
    """Training tiles streamed from the cohort (:class:`~isg.train.patch_stream.PatchStream`), consumed in step order."""

    def __init__(self, stream: PatchStream):
        self.stream, self.batches, self.next_step = stream, None, None

    def __len__(self) -> int:
        return self.stream.tiles_per_pass

    def take(self, step: int, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        if self.batches is None or step != self.next_step:
            self.close()
            self.batches = self.stream.batches(batch_size, start_step=step)
        self.next_step = step + 1
        return next(self.batches)

    def close(self) -> None:
        if self.batches is not None:
            self.batches.close()


def _training_tiles(tiles_source, config: AutoencoderTrainConfig, ranks: Ranks):
    """The in-memory bank or the cohort stream, as ``config.sampler`` says (``auto``: the bank when it holds
    every tile of the cohort within ``max_tiles``)."""
    if isinstance(tiles_source, (torch.Tensor, np.ndarray)):
        tiles = torch.as_tensor(tiles_source)
        if tiles.ndim != 4 or tiles.shape[-1] != 3 or tiles.dtype != torch.uint8 or len(tiles) == 0:
            raise ValueError(f"tiles_source must be uint8 RGB tiles [N, H, W, 3] (N > 0), got {tiles.dtype} {tuple(tiles.shape)}")
        return _Bank(tiles.cpu(), ranks)
    paths = h5_sources(tiles_source)
    sampler = config.sampler
    if sampler == "auto":
        total = sum(info.n_selected * grid**2 for info, grid in _usable_patch_files(paths, config.kind))
        sampler = "bank" if config.max_tiles is None or total <= config.max_tiles else "stream"
        log.info("%s autoencoder: %d training tiles in the cohort, max_tiles %s: %s", config.kind, total,
                 config.max_tiles, "in-memory bank" if sampler == "bank" else "streamed from every slide")
    if sampler == "bank":
        return _Bank(collect_tiles(paths, config.kind, config.resolution, config.max_tiles, config.seed), ranks)
    return _Stream(PatchStream(paths, config.kind, config.resolution, config.seed, slides_per_window=config.stream_slides,
                               patches_per_slide=config.stream_patches, ranks=ranks))


def _augment(x: torch.Tensor, ops: torch.Tensor) -> torch.Tensor:
    """Element ``ops[i]`` of the dihedral group applied to sample i (histology has no orientation). x [B, 3, r, r]."""
    out = x.clone()
    for k in range(8):
        sel = (ops == k).nonzero().flatten()
        if len(sel):
            y = torch.rot90(x[sel], k % 4, dims=(2, 3))
            out[sel] = y.flip(3) if k >= 4 else y
    return out


# ----------------------------------------------------------------------------- training


@dataclass
class AutoencoderProgress:
    """One training step, as :func:`train_autoencoder` reports it to its ``progress`` callback."""

    kind: str  # "global" or "local"
    step: int  # steps done
    steps: int  # steps in all
    losses: dict  # this step's l1, lpips, adv, d_loss, r1
    seconds: float  # since this call started
    seconds_left: float  # remaining steps at the mean step time of this call


def _lpips_of(config: AutoencoderTrainConfig, device) -> torch.nn.Module | None:
    """The LPIPS module of Eq. 2, or None when the term is off: ``lpips_weight`` 0, or no ImageNet AlexNet
    weights and ``lpips_without_weights="off"`` (said in a warning)."""
    if config.lpips_weight <= 0:
        return None
    if config.lpips_weights is None and cached_alexnet_weights() is None and config.lpips_without_weights == "off":
        warnings.warn(f"LPIPS: no ImageNet AlexNet weights ({ALEXNET_FILE}) in the torch hub cache and none given, so the "
                      "LPIPS term is off (lpips_without_weights='off'): the autoencoders train with L1 + adversarial only. "
                      "`isg info` says where the weights go.", UserWarning, stacklevel=3)
        return None
    return load_lpips(config.lpips_weights, device, config.lpips_impl)


def objective_record(config: AutoencoderTrainConfig, lpips: torch.nn.Module | None) -> dict:
    """What an autoencoder was trained with, as every checkpoint, feature file and table row records it:
    ``loss_terms`` (e.g. ``"l1 + lpips + adv"``), ``lpips_backbone`` (``"imagenet"``, ``"random"`` or
    ``"none"``: the AlexNet under the LPIPS term), the weights, and the extractor size."""
    terms = ["l1"] + (["lpips"] if lpips is not None else []) + (["adv"] if config.adv_weight > 0 else [])
    backbone = "none" if lpips is None else "imagenet" if lpips.pretrained_backbone else "random"
    return {"loss_terms": " + ".join(terms), "lpips_backbone": backbone, "lpips_weight": config.lpips_weight if lpips else 0.0,
            "adv_weight": config.adv_weight, "extractor_size": extractor_size(config.model_kwargs())}


def _export_state(ae: Autoencoder, decoder_ema: torch.nn.Module) -> dict:
    """State dict of E with the EMA decoder: the autoencoder to extract features with."""
    state = {f"encoder.{k}": v for k, v in ae.encoder.state_dict().items()}
    state.update({f"decoder.{k}": v for k, v in decoder_ema.state_dict().items()})
    return {k: v.detach().cpu().clone() for k, v in state.items()}


class _Trainer:
    """E, D, the EMA decoder, C, LPIPS, optimisers and loss scaling of one run; one method per part of a step."""

    def __init__(self, config: AutoencoderTrainConfig, ranks: Ranks = Ranks()):
        self.config, self.device, self.ranks = config, torch.device(config.device), ranks
        self.ae = Autoencoder(**config.model_kwargs()).to(self.device)
        shard_noise(self.ae, ranks.rank, ranks.world_size)  # N processes draw the noise one process would
        self.disc = self.ae.make_discriminator(config.mbstd_group).to(self.device)
        self.decoder_ema = copy.deepcopy(self.ae.decoder).eval().requires_grad_(False)
        self.lpips = _lpips_of(config, self.device)
        self.objective = objective_record(config, self.lpips)
        self.opt_g = torch.optim.Adam(self.ae.parameters(), lr=config.lr, betas=(0.0, 0.99), eps=1e-8)
        r1_ratio = config.r1_interval / (config.r1_interval + 1)  # lazy regularisation (StyleGAN2)
        self.opt_d = torch.optim.Adam(self.disc.parameters(), lr=config.lr * r1_ratio, betas=(0.0, 0.99**r1_ratio), eps=1e-8)
        self.use_amp = config.amp and self.device.type == "cuda"
        self.amp_dtype = torch.bfloat16 if self.use_amp and torch.cuda.is_bf16_supported() else torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp and self.amp_dtype == torch.float16)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.use_amp)

    def batch(self, tiles, step: int) -> torch.Tensor:
        """This rank's real images [B / ranks, 3, r, r] of ``step``'s global batch: a function of (seed, step), so a
        resumed run, and N processes together, draw what one process draws."""
        generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + step)
        real = tiles_to_input(tiles.take(step, self.config.batch_size, generator), self.config.resolution, self.device)
        if not self.config.augment:
            return real
        ops = torch.randint(0, 8, (self.config.batch_size,), generator=generator)  # one per image of the global batch
        return _augment(real, shard(ops, self.ranks).to(real.device))

    def generator_step(self, real: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """E, D: L1 + lambda LPIPS + the non-saturating adversarial term u(-C(D(E(x))))."""
        config, zero = self.config, torch.zeros((), device=self.device)
        self.disc.requires_grad_(False)
        with self.autocast():
            fake = self.ae(real)
            l1 = (fake.float() - real).abs().mean()
            perceptual = self.lpips(fake, real).mean() if self.lpips is not None else zero
            adv = F.softplus(-self.disc(fake)).float().mean() if config.adv_weight > 0 else zero
            loss = l1 + config.lpips_weight * perceptual + config.adv_weight * adv
        self.opt_g.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        sync_gradients(self.ae.parameters(), self.ranks)
        self.scaler.step(self.opt_g)
        return fake, {"l1": l1, "lpips": perceptual, "adv": adv}

    def discriminator_step(self, real: torch.Tensor, fake: torch.Tensor, step: int) -> dict:
        """C: u(C(fake)) + u(-C(real)), plus R1 = |grad_x C(x)|^2 on real images every ``r1_interval`` steps."""
        config = self.config
        d_loss = r1 = torch.zeros((), device=self.device)
        if config.adv_weight > 0:
            self.disc.requires_grad_(True)
            do_r1 = config.r1_gamma > 0 and step % config.r1_interval == 0
            real_d = real.detach().requires_grad_(do_r1)
            with self.autocast():
                real_logits = self.disc(real_d).float()  # [B]
                d_loss = (F.softplus(self.disc(fake.detach()).float()) + F.softplus(-real_logits)).mean()
            loss = d_loss
            if do_r1:
                (grad,) = torch.autograd.grad(real_logits.sum(), real_d, create_graph=True)
                r1 = grad.float().square().sum(dim=(1, 2, 3)).mean()
                loss = loss + r1 * (config.r1_gamma / 2) * config.r1_interval
            self.opt_d.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            sync_gradients(self.disc.parameters(), self.ranks)
            self.scaler.step(self.opt_d)
        self.scaler.update()
        return {"d_loss": d_loss, "r1": r1}

    @torch.no_grad()
    def update_ema(self, step: int) -> None:
        """EMA of the decoder: half-life ``ema_kimg`` thousand images, ramped up early on."""
        config = self.config
        ema_nimg = min(config.ema_kimg * 1000, (step + 1) * config.batch_size * config.ema_rampup)
        beta = 0.5 ** (config.batch_size / max(ema_nimg, 1e-8))
        for p_ema, p in zip(self.decoder_ema.parameters(), self.ae.decoder.parameters()):
            p_ema.lerp_(p.detach(), 1 - beta)
        for b_ema, b in zip(self.decoder_ema.buffers(), self.ae.decoder.buffers()):
            b_ema.copy_(b)

    def exported(self) -> Autoencoder:
        """E + the EMA decoder, on CPU."""
        result = Autoencoder(**self.config.model_kwargs())
        result.load_state_dict(_export_state(self.ae, self.decoder_ema))
        return result

    def save(self, path: Path, step: int, history: dict) -> None:
        """Resumable checkpoint (an autoencoder checkpoint whose ``state["train"]`` holds the training state)."""
        train_state = {
            "autoencoder": self.ae.state_dict(), "decoder_ema": self.decoder_ema.state_dict(), "discriminator": self.disc.state_dict(),
            "opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict(), "scaler": self.scaler.state_dict(),
            "rng": torch.get_rng_state(),
            **({"cuda_rng": torch.cuda.get_rng_state(self.device)} if self.device.type == "cuda" else {}),
        }
        extra = {"train_config": asdict(self.config), "objective": self.objective, "step": step, "history": history}
        save_checkpoint(path, "autoencoder", dict(self.ae.config), {"model": _export_state(self.ae, self.decoder_ema), "train": train_state}, extra)
        write_text_atomic(path.parent / HISTORY, json.dumps(history))

    def resume(self, path: Path) -> tuple[int, dict]:
        """(step, history) of the run saved at ``path``, with every state restored."""
        try:
            checkpoint = load_checkpoint(path, "autoencoder")
        except (CheckpointError, OSError) as exc:
            raise ValueError(f"{exc}; delete it or use resume=False") from exc
        saved = checkpoint.extra.get("train_config", {})
        if "train" not in checkpoint.state:
            raise ValueError(f"{path}: not a resumable isg autoencoder checkpoint")
        if saved.get("kind") != self.config.kind or checkpoint.config != self.ae.config:
            raise ValueError(f"{path}: written with a different model/kind ({checkpoint.config}, kind={saved.get('kind')}); "
                             "use another --out or resume=False")
        state = checkpoint.state["train"]
        self.ae.load_state_dict(state["autoencoder"])
        self.decoder_ema.load_state_dict(state["decoder_ema"])
        self.disc.load_state_dict(state["discriminator"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"])
        if self.device.type == "cuda" and "cuda_rng" in state:
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        history = checkpoint.extra.get("history", {})
        return int(checkpoint.extra["step"]), {k: list(v) for k, v in history.items()}


def train_autoencoder(tiles_source, out_dir: str | os.PathLike, config: AutoencoderTrainConfig | dict | None = None,
                      resume: bool = True, progress: Callable[[AutoencoderProgress], None] | None = None) -> tuple[Autoencoder, dict]:
    """Train one autoencoder (global or local) and write it to ``out_dir``.

    Args:
        tiles_source: uint8 tiles [N, H, W, 3] (array or tensor), or a folder / list of
            per-slide .h5 files (see :func:`collect_tiles`; ``config.kind`` picks global or local).
        out_dir: gets ``checkpoint.pt`` (every ``checkpoint_every`` steps and at the end),
            ``autoencoder.pt`` (encoder + EMA decoder) and ``history.json``.
        config: :class:`AutoencoderTrainConfig` or a dict of its fields.
        resume: continue from ``out_dir/checkpoint.pt`` when present (same config required).
        progress: called with an :class:`AutoencoderProgress` after every step (None: silent;
            ``config.progress`` draws a tqdm bar besides).

    Returns:
        (autoencoder with the EMA decoder, in eval mode, history {"step": [...], "l1": [...], ...}).
    """
    config = config if isinstance(config, AutoencoderTrainConfig) else AutoencoderTrainConfig.from_dict(config or {})
    ranks = ranks_now()  # under torchrun: this process's share of every global batch (isg.train.distributed)
    check_global_batch(config.batch_size, ranks)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    tiles = _training_tiles(tiles_source, config, ranks)  # the in-memory bank or the cohort stream
    steps = config.max_steps if config.max_steps is not None else max(1, math.ceil(config.epochs * len(tiles) / config.batch_size))
    trainer = _Trainer(config, ranks)
    start, history = 0, {"step": [], **{k: [] for k in LOSSES}}
    if resume and (out_dir / CHECKPOINT).is_file():
        start, history = trainer.resume(out_dir / CHECKPOINT)
        log.info("resuming %s from step %d", out_dir, start)
    barrier()  # every rank has read the checkpoint before rank 0 writes the next one

    trainer.ae.train(), trainer.disc.train()
    clock = time.perf_counter()
    bar = tqdm(range(start, steps), initial=start, total=steps, desc=f"autoencoder ({config.kind})",
               disable=not (config.progress and ranks.is_main))
    try:
        for step in bar:
            real = trainer.batch(tiles, step)
            fake, losses = trainer.generator_step(real)
            losses.update(trainer.discriminator_step(real, fake, step))
            trainer.update_ema(step)
            values = mean_over_ranks(torch.stack([losses[k].detach().float() for k in LOSSES]), ranks).tolist()
            history["step"].append(step)
            for name, value in zip(LOSSES, values):
                history[name].append(value)
            bar.set_postfix(l1=f"{history['l1'][-1]:.3f}", lpips=f"{history['lpips'][-1]:.3f}", d=f"{history['d_loss'][-1]:.3f}")
            if progress is not None and ranks.is_main:
                seconds = time.perf_counter() - clock
                progress(AutoencoderProgress(config.kind, step + 1, steps, {k: history[k][-1] for k in LOSSES}, seconds,
                                             seconds / (step + 1 - start) * (steps - step - 1)))
            if config.checkpoint_every and (step + 1) % config.checkpoint_every == 0 and step + 1 < steps and ranks.is_main:
                trainer.save(out_dir / CHECKPOINT, step + 1, history)
    finally:
        bar.close()
        tiles.close()

    if ranks.is_main:  # one writer; the other ranks wait for the files
        trainer.save(out_dir / CHECKPOINT, steps, history)
    result = trainer.exported()  # after the save: building it draws random numbers
    result.extra = {"train_config": asdict(config), "objective": trainer.objective, "steps": steps, "n_tiles": len(tiles),
                    "processes": ranks.world_size}
    if ranks.is_main:
        save_autoencoder(out_dir / EXPORT, result, extra=result.extra)
    barrier()
    result.checkpoint_path = str(out_dir / EXPORT)  # as load_autoencoder sets it: features record where they came from
    return result.to(trainer.device).eval(), history


__all__ = ["AutoencoderProgress", "AutoencoderTrainConfig", "train_autoencoder", "collect_tiles", "h5_sources", "objective_record"]
