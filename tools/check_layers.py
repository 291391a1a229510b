#!/usr/bin/env python3
"""Check isg's import graph: imports only go down the layers, never into another package's privates.

    python3 tools/check_layers.py [ROOT]     # exit 1 and one line per offence

Layers, bottom first (a module may import its own package and anything in a lower layer):

    0  isg (the root modules: __init__, _ext, utils, checkpoint)
    1  ops                      faces of the native kernels
    2  io, data, eval           slides and tiles; tables, splits, bags; metrics
    3  select                   patch selectors and rules
    4  features, baselines      autoencoders; HE2RNA (its model and tile pipeline)
    5  model                    Dual Attention, ViT, the model registry and fold checkpoints
    7  train, pipeline            wiring (neither imports the other)
    8  paper                    the paper's tables: runs pipeline stages and training (both of layer 7)
    9  cli                      wiring
   10  __main__                 `python -m isg`

A private name (a module or symbol starting with ``_``, dunders aside) may only be imported inside its
own package; the one exception is ``isg._ext`` (the native-module loader), which the kernel faces in
``isg.ops`` use. Imports inside functions count: the scan walks the whole syntax tree.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

LAYERS = {"": 0, "ops": 1, "io": 2, "data": 2, "eval": 2, "select": 3, "features": 4, "model": 5,
          "baselines": 4, "train": 7, "pipeline": 7, "paper": 8, "cli": 9,
          "__main__": 10}
PRIVATE_ALLOWED = {("ops", "isg._ext")}


def package_of(module: str, root: Path) -> str:
    """``isg.io.slide`` -> ``io``; a root module (``isg``, ``isg.utils``, ``isg._ext``) -> ``""``."""
    parts = module.split(".")
    if len(parts) >= 2 and parts[1] == "__main__":
        return "__main__"
    if len(parts) < 2 or not (root / parts[1]).is_dir():
        return ""
    return parts[1]


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_names(tree: ast.AST):
    """(line, imported module, full dotted name) for every ``isg`` import in the tree."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.split(".")[0] == "isg":
            for alias in node.names:
                yield node.lineno, node.module, f"{node.module}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "isg":
                    yield node.lineno, alias.name, alias.name


def is_private(part: str) -> bool:
    return part.startswith("_") and not (part.startswith("__") and part.endswith("__"))


def check(root: Path) -> list[str]:
    offences = []
    for path in sorted(root.rglob("*.py")):
        here = package_of(module_name(path, root), root)
        tree = ast.parse(path.read_text(), filename=str(path))
        for line, target_module, full in imported_names(tree):
            there = package_of(target_module, root)
            where = f"{path}:{line}"
            if here not in LAYERS or there not in LAYERS:
                offences.append(f"{where}: package {here or there!r} has no layer in tools/check_layers.py")
                continue
            if there != here and LAYERS[there] >= LAYERS[here] and there != "":
                offences.append(f"{where}: {here or 'isg'} (layer {LAYERS[here]}) imports {full} "
                                f"({there}, layer {LAYERS[there]}): not downward")
            if there != here:
                private = [p for p in full.split(".")[1:] if is_private(p)]
                if private and (here, ".".join(full.split(".")[:2])) not in PRIVATE_ALLOWED:
                    offences.append(f"{where}: {here or 'isg'} imports the private {full} of package {there or 'isg'}")
    return offences


def main(argv: list[str]) -> int:
    root = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parents[1] / "isg"
    offences = check(root)
    for offence in offences:
        print(offence)
    print(f"{len(offences)} import offence(s) under {root}" if offences else f"imports follow the layers under {root}")
    return 1 if offences else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
