"""``isg extract``: train the global/local autoencoders (``fit``) and write patch features (``run``).

``isg extract fit --h5-dir D --out CKPT_DIR`` trains ``CKPT_DIR/global`` and ``CKPT_DIR/local``
(each with ``checkpoint.pt``, ``autoencoder.pt``, ``history.json``; rerunning resumes).
``isg extract run --h5-dir D --global CKPT_DIR/global --local CKPT_DIR/local`` adds ``features``
and ``local_features`` to every ``D/*.h5``, one task per slide through the cohort runner (``--scheduler``:
threads, processes or a Dask address; each worker loads the extractors once). Exit code 0 when every slide
is done, 1 when some failed (listed), 2 on bad arguments. Under ``torchrun`` ``fit`` trains on every process.
"""

from __future__ import annotations

import sys
from pathlib import Path

from isg.cli._cluster import add_scheduler_arguments, scheduler_from_args

SUMMARY = "extract_summary.json"  # beside the patch files (preprocess's summary.json stays as it was)


def register(subparsers) -> None:
    import inspect

    from isg.cli import add_quiet, defaults_of
    from isg.pipeline.extract import extract_slide
    from isg.train.config import LPIPS_WITHOUT_WEIGHTS, SAMPLERS
    from isg.train.config import AutoencoderTrainConfig as AE

    default = defaults_of(AE)
    extract_defaults = {name: p.default for name, p in inspect.signature(extract_slide).parameters.items()}
    parser = subparsers.add_parser("extract", help="autoencoder features of the selected patches (fit | run)",
                                   description="StyleGAN2 autoencoder patch features (ISG Sec. 3.2).")
    commands = parser.add_subparsers(dest="extract_command", metavar="{fit,run}")

    fit = commands.add_parser("fit", help="train the global and local autoencoders on the selected patches",
                              description="Train the global (whole p-pixel patches) and local (q-pixel sub-patches) "
                                          "autoencoders on the selected patches of D/*.h5; reruns resume.")
    fit.add_argument("--h5-dir", required=True, help="folder of per-slide .h5 files written by isg preprocess")
    fit.add_argument("--out", required=True, help="checkpoint folder (gets global/ and local/)")
    fit.add_argument("--which", choices=("both", "global", "local"), default="both", help="which autoencoder(s) to train")
    fit.add_argument("--epochs", type=float, default=default["epochs"], help="passes over the tile bank")
    fit.add_argument("--steps", type=int, help="training steps (overrides --epochs)")
    fit.add_argument("--batch-size", type=int, default=default["batch_size"], help="tiles per step")
    fit.add_argument("--lr", type=float, default=default["lr"], help="Adam learning rate (encoder, decoder, critic)")
    fit.add_argument("--global-resolution", type=int, default=AE.GLOBAL_RESOLUTION, help="global AE input size; patches are resized")
    fit.add_argument("--local-resolution", type=int, default=AE.LOCAL_RESOLUTION, help="local AE input size")
    fit.add_argument("--global-d", type=int, default=default["d"], help="global feature size")
    fit.add_argument("--local-d", type=int, default=default["d"], help="local feature size")
    fit.add_argument("--channel-base", type=int, default=default["channel_base"],
                     help="channels at resolution r: min(base / r, max): the compact, fast extractor; 8192 with "
                          "--channel-max 256 --global-resolution 128 --local-resolution 64 is the large one")
    fit.add_argument("--channel-max", type=int, default=default["channel_max"], help="most channels of a layer")
    fit.add_argument("--max-tiles", type=int, default=default["max_tiles"], help="cap on training tiles read into memory per AE")
    fit.add_argument("--sampler", choices=SAMPLERS, default=default["sampler"],
                     help="bank: at most --max-tiles tiles read once into memory; stream: tiles streamed from every "
                          "slide across the run, read while training, in bounded memory; auto: the bank when the "
                          "cohort's tiles fit in --max-tiles, else the stream")
    fit.add_argument("--stream-slides", type=int, default=default["stream_slides"],
                     help="stream: slides read together and shuffled as one window")
    fit.add_argument("--stream-patches", type=int, default=default["stream_patches"],
                     help="stream: patches taken from a slide each time the stream visits it")
    fit.add_argument("--lpips-weight", type=float, default=default["lpips_weight"], help="lambda of the LPIPS term (Eq. 2)")
    fit.add_argument("--adv-weight", type=float, default=default["adv_weight"], help="weight of the adversarial term")
    fit.add_argument("--r1-gamma", type=float, default=default["r1_gamma"], help="R1 penalty weight on the critic")
    fit.add_argument("--lpips-weights", help="torchvision AlexNet state dict (default: torch hub cache; none: see --lpips-without-weights)")
    fit.add_argument("--lpips-without-weights", choices=LPIPS_WITHOUT_WEIGHTS, default=default["lpips_without_weights"],
                     help="without ImageNet AlexNet weights: keep the LPIPS term on a random AlexNet (warned) or turn it off "
                          "(default off; Tab. 5 compares them: docs/features.md)")
    fit.add_argument("--lpips-impl", choices=("isg", "lpips"), default=default["lpips_impl"],
                     help="LPIPS computed by isg or by the lpips package (the same distance; the package is optional)")
    fit.add_argument("--checkpoint-every", type=int, default=default["checkpoint_every"], help="steps between resumable checkpoints")
    fit.add_argument("--device", default=default["device"], help="cpu or cuda[:i] (mixed precision on CUDA)")
    fit.add_argument("--seed", type=int, default=default["seed"], help="seed of initialisation and batches")
    fit.add_argument("--no-resume", dest="resume", action="store_false", help="start over even if a checkpoint exists")
    add_quiet(fit)
    fit.set_defaults(func=run_fit)

    run = commands.add_parser("run", help="write features / local_features into each slide's .h5",
                              description="Encode the selected patches of every D/*.h5 with the trained autoencoders. "
                                          "Slides that already have features are skipped unless --overwrite.")
    run.add_argument("--h5-dir", required=True, help="folder of per-slide .h5 files written by isg preprocess")
    run.add_argument("--global", dest="global_ckpt", required=True, help="global autoencoder: autoencoder.pt/checkpoint.pt or its folder")
    run.add_argument("--local", dest="local_ckpt", help="local autoencoder (omit to write global features only)")
    run.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    run.add_argument("--batch-size", type=int, default=extract_defaults["batch_size"], help="global patches per batch")
    run.add_argument("--num-workers", type=int, default=extract_defaults["num_workers"], help="tile reader threads")
    run.add_argument("--overwrite", action="store_true", help="recompute slides that already have features")
    run.add_argument("--amp", action="store_true", help="bfloat16 encoders where the device runs bf16 natively (CUDA; CPUs "
                     "with AVX512-BF16 or AMX): ~1.8x faster on such a CPU, features within 2e-2 of float32")
    add_scheduler_arguments(run.add_argument_group("execution"),
                            "slides at a time in-process (default 1: the encoders hold the device)")
    add_quiet(run)
    run.set_defaults(func=run_extract)
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])


def _h5_files(h5_dir: str) -> list[Path]:
    from isg.cli import CLIError
    from isg.utils import h5_sources

    try:
        return h5_sources(h5_dir)
    except (FileNotFoundError, ValueError) as exc:
        raise CLIError(f"--h5-dir: {exc} (run isg preprocess first)") from None


def _checkpoint(value: str, option: str) -> Path:
    from isg.cli import CLIError

    path = Path(value)
    if path.is_dir():
        for name in ("autoencoder.pt", "checkpoint.pt"):
            if (path / name).is_file():
                return path / name
        raise CLIError(f"{option} {path}: folder holds no autoencoder.pt or checkpoint.pt")
    if not path.is_file():
        raise CLIError(f"{option} {path}: checkpoint not found")
    return path


def _positive(args, names: list[str]) -> None:
    from isg.cli import CLIError

    for name in names:
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise CLIError(f"--{name.replace('_', '-')} must be positive, got {value}")


def run_fit(args) -> int:
    """Under ``torchrun --nproc-per-node N`` each process trains on its share of every global batch
    (isg.train.distributed); rank 0 alone prints, logs and writes."""
    from isg.cli import CLIError, quiet_other_ranks
    from isg.train.autoencoder import AutoencoderTrainConfig, train_autoencoder
    from isg.train.distributed import close_distributed, init_distributed

    files = _h5_files(args.h5_dir)
    _positive(args, ["epochs", "steps", "batch_size", "lr", "global_resolution", "local_resolution", "global_d", "local_d",
                     "max_tiles", "stream_slides", "stream_patches"])
    if args.lpips_weights and not Path(args.lpips_weights).is_file():
        raise CLIError(f"--lpips-weights {args.lpips_weights}: no such file")
    try:
        ranks, device = init_distributed(args.device)
    except RuntimeError as exc:
        raise CLIError(str(exc)) from None
    quiet_other_ranks(ranks)
    out = Path(args.out)
    kinds = ("global", "local") if args.which == "both" else (args.which,)
    try:
        for kind in kinds:
            config = AutoencoderTrainConfig(
                resolution=getattr(args, f"{kind}_resolution"), d=getattr(args, f"{kind}_d"), channel_base=args.channel_base,
                channel_max=args.channel_max, kind=kind, max_tiles=args.max_tiles, sampler=args.sampler,
                stream_slides=args.stream_slides, stream_patches=args.stream_patches, epochs=args.epochs,
                max_steps=args.steps, batch_size=args.batch_size, lr=args.lr, lpips_weight=args.lpips_weight,
                adv_weight=args.adv_weight, r1_gamma=args.r1_gamma, device=device, seed=args.seed,
                checkpoint_every=args.checkpoint_every, lpips_weights=args.lpips_weights, lpips_impl=args.lpips_impl,
                lpips_without_weights=args.lpips_without_weights,
                progress=not args.quiet and ranks.is_main,
            )
            try:
                _, history = train_autoencoder(files, out / kind, config, resume=args.resume)
            except ValueError as exc:  # bad resolution, no readable tiles, mismatching checkpoint, uneven batch, ...
                raise CLIError(f"{kind} autoencoder: {exc}") from exc
            l1 = history["l1"]
            if ranks.is_main:
                print(f"{kind}: {len(l1)} steps, L1 {l1[0]:.4f} -> {l1[-1]:.4f}; wrote {out / kind / 'autoencoder.pt'}"
                      if l1 else f"{kind}: already trained ({out / kind})")
    finally:
        close_distributed()
    return 0


def run_extract(args) -> int:
    from isg.cli import CLIError
    from isg.features import ExtractorError, ExtractorRef
    from isg.pipeline.extract import FAILED, SKIPPED, WRITTEN, extract_cohort

    files = _h5_files(args.h5_dir)
    _positive(args, ["batch_size"])
    scheduler, workers, resources = scheduler_from_args(args)
    models = {}
    for role, value, option in (("global", args.global_ckpt, "--global"), ("local", args.local_ckpt, "--local")):
        if value is None:
            continue
        path = _checkpoint(value, option)
        try:
            models[role] = ExtractorRef.of(path, role)  # each process loads it once, on its first slide
            models[role].cached(args.device if scheduler is None else "cpu")  # a bad checkpoint: an argument error
        except (ValueError, RuntimeError, ExtractorError) as exc:
            raise CLIError(f"{option} {path}: {exc}") from exc
    try:
        results = extract_cohort(files, models["global"], models.get("local"), batch_size=args.batch_size,
                                 device=args.device, num_workers=args.num_workers, overwrite=args.overwrite,
                                 progress=not args.quiet, amp=args.amp, scheduler=scheduler, workers=workers,
                                 resources=resources, summary_path=Path(args.h5_dir) / SUMMARY)
    except ConnectionError as exc:
        raise CLIError(f"--scheduler: {exc}") from None
    counts = {status: sum(r.status == status for r in results) for status in (WRITTEN, SKIPPED, FAILED)}
    print(f"extract: {counts[WRITTEN]} written, {counts[SKIPPED]} skipped, {counts[FAILED]} failed of {len(results)} slide(s)")
    for r in results:
        if r.status == FAILED:
            print(f"  FAILED {r.h5_path}: {r.error}", file=sys.stderr)
    return 1 if counts[FAILED] else 0
