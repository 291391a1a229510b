"""Planted bugs: does the emulated test suite catch them? (after ../shared/cuda-emu/mutate.sh)

    python3 csrc/emu/mutate.py              # every planted bug (about 30 min on 2 cores)
    python3 csrc/emu/mutate.py NAME ...     # some of them; --list names them

Each bug is one textual change to a CUDA source. The sources are copied to build/mutate/src, where the
emulated ``_C`` is built (CMake, ISG_EMU=ON, incrementally: one object per bug), and
tests/test_emulated_kernels.py runs against it (``ISG_EMU_BUILD``) until its first failure. A bug is
caught when the tests fail; the table at the end says which test caught it. Exit status 1 when one
was missed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WORK = ROOT / "build" / "mutate"
SHANNON, ATTENTION = "csrc/shannon/shannon_cuda.cu", "csrc/attention/attention_cuda.cu"

# name: (file, text, replacement, kernel family: the tests run are `-k "<family> or schedules"`)
BUGS = {
    "shannon-left-word-only-first-strips": (SHANNON, "lane == 0 && w0 > 0;", "lane == 0 && w0 > 32;", "shannon"),
    "shannon-rgb-phase": (SHANNON, "phase + 2 >= 3 ? phase - 1 : phase + 2", "phase + 1 >= 3 ? phase - 2 : phase + 1", "shannon"),
    "shannon-word-past-row-end-counted": (SHANNON, "strip_increments<P>(w < g.words,", "strip_increments<P>(w <= g.words,", "shannon"),
    "shannon-first-row-predictor": (SHANNON, "count_word(split(up), split(a), split(a), split(a), inc);",
                                    "count_word(split(up), split(a), split(up), split(a), inc);", "shannon"),
    "shannon-no-borrow-bias": (SHANNON, "__vimin3_u16x2(a.even, b.even, c.even) + 0x100u;", "__vimin3_u16x2(a.even, b.even, c.even);",
                               "shannon"),
    "shannon-no-barrier-after-zeroing": (SHANNON, "sub[k] = 0u;\n  __syncthreads();", "sub[k] = 0u;\n", "shannon"),
    "attention-no-barrier-before-group-sum": (ATTENTION, "buffer[threadIdx.x] = x;\n  __syncthreads();", "buffer[threadIdx.x] = x;\n",
                                              "attention"),
    "attention-no-barrier-after-group-sum": (ATTENTION, "total += buffer[g * W + group.lane];\n  __syncthreads();",
                                             "total += buffer[g * W + group.lane];\n", "attention"),
    "attention-half-shuffle-tree": (ATTENTION, "for (int offset = W >> 1; offset > 0; offset >>= 1) x += ",
                                    "for (int offset = W >> 2; offset > 0; offset >>= 1) x += ", "attention"),
    "attention-gated-skips-channels": (ATTENTION, "for (int64_t c0 = group.index; c0 < C; c0 += kStep) {   // no shuffles",
                                       "for (int64_t c0 = group.index; c0 < C; c0 += 2 * kStep) {   // no shuffles", "attention"),
    "attention-softmax-no-max": (ATTENTION, "  m = group_max<W>(m);\n", "  m = 0;\n", "attention"),
    "attention-softmax-weight-dropped": (ATTENTION, "for (int u = 0; u < kAhead; ++u) acc[u] += w * pv[u];",
                                         "for (int u = 0; u < kAhead; ++u) acc[u] += pv[u];", "attention"),
    "attention-softmax-mean-only-short-rows": (ATTENTION, "if (L <= W) mean = group_sum<W>(w * dw);",
                                               "if (L < W) mean = group_sum<W>(w * dw);", "attention"),
}


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, **kwargs)


def prepare() -> Path:
    """A copy of the sources and a configured emulation build of it."""
    src, build = WORK / "src", WORK / "build"
    if src.exists():
        shutil.rmtree(src)
    shutil.copytree(ROOT / "csrc", src / "csrc")
    shutil.copy(ROOT / "CMakeLists.txt", src / "CMakeLists.txt")
    if not (build / "CMakeCache.txt").exists():
        import pybind11

        generator = ["-G", "Ninja"] if shutil.which("ninja") else []
        run(["cmake", "-S", str(src), "-B", str(build), *generator, "-DISG_EMU=ON", "-DCMAKE_BUILD_TYPE=Release",
             f"-Dpybind11_DIR={pybind11.get_cmake_dir()}", f"-DPython_EXECUTABLE={sys.executable}"], check=True)
    return src


def try_bug(src: Path, name: str) -> tuple[bool, str]:
    path, old, new, family = BUGS[name]
    tests = f"{family} or schedules"  # the family's tests and the other thread orders (they expose missing barriers)
    original = (ROOT / path).read_text()
    assert original.count(old) == 1, f"{name}: the text to change occurs {original.count(old)} times in {path}"
    (src / path).write_text(original.replace(old, new))
    try:
        env = {**os.environ, "ISG_EMU_BUILD": str(WORK / "build"), "ISG_REQUIRE_EXT": "1"}
        result = run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "tests/test_emulated_kernels.py",
                      "-k", tests], env=env, timeout=1800)
        failed = [line.split(" - ")[0] for line in result.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
        if result.returncode == 0:
            return False, "not caught"
        return True, failed[0] if failed else f"exit {result.returncode}: {result.stdout[-200:]}"
    finally:
        (src / path).write_text(original)


def main() -> None:
    names = sys.argv[1:] or list(BUGS)
    if names == ["--list"]:
        print("\n".join(BUGS))
        return
    src = prepare()
    missed = 0
    for name in names:
        caught, how = try_bug(src, name)
        missed += not caught
        print(f"{'caught' if caught else 'MISSED'}  {name:<42} {how}", flush=True)
    run(["cmake", "--build", str(WORK / "build")])   # back to the unchanged sources
    print(f"{len(names) - missed} of {len(names)} planted bugs caught")
    sys.exit(1 if missed else 0)


if __name__ == "__main__":
    main()
