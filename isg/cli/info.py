"""``isg info``: versions and which optional backends are usable."""

from __future__ import annotations


def register(subparsers) -> None:
    parser = subparsers.add_parser("info", help="show versions and available backends")
    parser.set_defaults(func=run)


def run(args) -> int:
    import torch

    import isg
    from isg.features.lpips_loss import ALEXNET_FILE, cached_alexnet_weights

    print(f"isg {isg.__version__}  torch {torch.__version__}")
    for name, ok in isg.backends().items():
        detail = isg.backend_detail(name)
        print(f"  {name:<13} {'yes' if ok else 'no'}{f'  ({detail})' if detail else ''}")
    weights = cached_alexnet_weights()
    missing = f"missing: put {ALEXNET_FILE} in {torch.hub.get_dir()}/checkpoints, else LPIPS uses a random AlexNet"
    print(f"  {'lpips-weights':<13} {'yes' if weights else 'no'}  ({weights or missing})")
    return 0
