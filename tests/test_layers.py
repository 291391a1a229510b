"""The import graph follows the layers (tools/check_layers.py), and the checker catches offences."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checker():
    spec = importlib.util.spec_from_file_location("check_layers", ROOT / "tools" / "check_layers.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["check_layers"] = module
    spec.loader.exec_module(module)
    return module


def test_isg_imports_follow_the_layers(checker):
    assert checker.check(ROOT / "isg") == []


def _package_tree(root: Path, checker) -> Path:
    """An empty isg/ with every layered package, as the checker sees the real one."""
    (root / "isg").mkdir()
    (root / "isg" / "__init__.py").write_text("")
    for name in checker.LAYERS:
        if name and name != "__main__":
            (root / "isg" / name).mkdir()
            (root / "isg" / name / "__init__.py").write_text("")
    return root / "isg"


@pytest.mark.parametrize("source, fragment", [
    ("from isg.model import create_model\n", "not downward"),  # io (2) -> model (5)
    ("def f():\n    from isg.train.expression import cross_validate\n", "not downward"),  # inside a function
    ("from isg.ops.shannon import _threads\n", "imports the private"),  # downward, but private
    ("import isg.cli\n", "not downward"),
])
def test_checker_flags_upward_and_private_imports(checker, tmp_path, source, fragment):
    root = _package_tree(tmp_path, checker)
    (root / "io" / "bad.py").write_text(source)
    offences = checker.check(root)
    assert len(offences) >= 1 and fragment in offences[0], offences


def test_checker_accepts_downward_imports(checker, tmp_path):
    root = _package_tree(tmp_path, checker)
    (root / "model" / "good.py").write_text("from isg.io import PATCH_SIZE\nfrom isg.ops.attention import gated_hadamard\n"
                                     "from isg.utils import atomic_path\nfrom isg.model.vit import x\n")
    assert checker.check(root) == []
