"""``isg info``: versions and which optional backends are usable."""

from __future__ import annotations


def register(subparsers) -> None:
    parser = subparsers.add_parser("info", help="show versions and available backends")
    parser.set_defaults(func=run)


def run(args) -> int:
    import torch

    import isg
    from isg import _ext

    print(f"isg {isg.__version__}  torch {torch.__version__}")
    for name, ok in isg.backends().items():
        extra = ""
        if name == "ext" and not ok:
            extra = f"  ({_ext.ext_error()})"
        if name == "ext" and ok:
            extra = f"  (built with CUDA: {getattr(_ext.ext(), 'built_with_cuda', False)})"
        if name == "cuda":
            extra = f"  ({_ext.cuda_status()[1]})"
        print(f"  {name:<10} {'yes' if ok else 'no'}{extra}")
    return 0
