"""Instruction roofline of the Shannon histogram kernel, counted from its sm_90 SASS (no GPU needed).

    python3 csrc/shannon/sass_roofline.py            # compiles csrc/shannon/shannon_cuda.cu with nvcc, dumps SASS
    python3 csrc/shannon/sass_roofline.py --sass F   # counts a SASS listing dumped before (cuobjdump -sass)

Per kernel instantiation (pixel pitch P = 1, 3, 4 bytes) it finds, from the branches of the listing:
* the row loop: the innermost loop with 4 x kRows shared-memory atomics (kRows rows of one word per lane);
* the strip loop: the smallest loop around it; everything in it outside the row loop and the remainder loops
  (rows past a multiple of kRows) is counted as per-strip setup, executed once per strip and band. That is an
  upper bound: it includes the first-row code that only the band at the tile's top runs, and the branches
  not taken;
* the block's zeroing and write-out loops (shared histogram to global) and its straight-line code.
It then counts the warp-instructions one block executes for a tile (8 warps, one band each), divides by the
tile's bytes and compares with what an H200 can issue: 132 SMs x 4 schedulers x 32 lanes x 1.98 GHz = 33.4 T
thread-instructions per second against 4.8 TB/s of HBM (datasheet). docs/cuda.md shows the output.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WARPS, ROWS_AHEAD = 4, 8                        # kThreads / 32 and kRows in shannon_cuda.cu
ISSUE = 132 * 4 * 32 * 1.98e9                   # H200 thread-instructions per second
HBM = 4.8e12                                    # H200 bytes per second (datasheet; ~4.3e12 measured by a copy)
TILES = [("256 px RGB (P = 3)", 3, 256, 256), ("256 px RGBA view (P = 4)", 4, 256, 256),
         ("256 px grey (P = 1)", 1, 256, 256), ("64 px RGB local tile (P = 3)", 3, 64, 64)]


def find_tool(name: str) -> str:
    """nvcc / cuobjdump from PATH, CUDA_HOME, or the copy that ships with triton's package."""
    found = shutil.which(name) or next(iter(glob.glob(os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", name))), None)
    if not found:
        try:
            import triton  # noqa: F401  (its NVIDIA backend carries cuobjdump and nvdisasm)

            found = next(iter(glob.glob(str(Path(sys.modules["triton"].__file__).parent / "backends/nvidia/bin" / name))), None)
        except ImportError:
            pass
    if not found:
        sys.exit(f"sass_roofline: {name} not found (PATH, $CUDA_HOME/bin, triton's package)")
    return found


def dump_sass() -> str:
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "shannon.cubin"
        subprocess.run([find_tool("nvcc"), "-O3", "-std=c++17", "-arch=sm_90", "-cubin", "-Xptxas", "-v", f"-I{ROOT / 'csrc'}",
                        "-DISG_WITH_CUDA", "-o", str(cubin), str(ROOT / "csrc/shannon/shannon_cuda.cu")], check=True)
        return subprocess.run([find_tool("cuobjdump"), "-sass", str(cubin)], check=True, capture_output=True, text=True).stdout


def kernels(sass: str) -> dict[int, list[tuple[int, str]]]:
    """{pitch: [(address, instruction)]} of histogram_kernel<P>."""
    out, current = {}, None
    for line in sass.splitlines():
        name = re.search(r"Function : \S*histogram_kernelILi(\d)E", line)
        if name:
            current = out.setdefault(int(name.group(1)), [])
            continue
        ins = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
        if ins and current is not None:
            current.append((int(ins.group(1), 16), ins.group(2)))
    return out


def loops(code: list[tuple[int, str]]) -> list[tuple[int, int]]:
    """(first, last) addresses of every backward branch's range, taken branches of divergence fallbacks excluded."""
    found = []
    for address, text in code:
        target = re.search(r"\bBRA(?:\.\w+)*\s+(?:`?\(?\S+\)?\s*,\s*)?0x([0-9a-f]+)", text)
        if target and "BRA.DIV" not in text and int(target.group(1), 16) < address:
            found.append((int(target.group(1), 16), address))
    return found


def count(code, span, what=None) -> int:
    return sum(1 for a, t in code if span[0] <= a <= span[1] and (what is None or what in t))


def model(code: list[tuple[int, str]]) -> dict:
    spans = loops(code)
    row = [s for s in spans if count(code, s, "ATOMS") == 4 * ROWS_AHEAD and not any(o != s and s[0] <= o[0] and o[1] <= s[1] for o in spans)]
    assert len(row) == 1, f"expected one row loop with {4 * ROWS_AHEAD} atomics, found {row}"
    row = row[0]
    strip = min((s for s in spans if s[0] <= row[0] and row[1] <= s[1] and s != row), key=lambda s: s[1] - s[0])
    inner = [s for s in spans if strip[0] <= s[0] and s[1] <= strip[1] and s != strip]
    outermost_inner = [s for s in inner if not any(o != s and o[0] <= s[0] and s[1] <= o[1] for o in inner)]
    remainder = [s for s in outermost_inner if s != row]
    remainder_per_row = max((count(code, s) / max(1, count(code, s, "ATOMS") // 4) for s in remainder), default=0.0)
    setup = count(code, strip) - sum(count(code, s) for s in outermost_inner)
    zero = [s for s in spans if count(code, s, "STS") and not count(code, s, "ATOMS")]
    write = [s for s in spans if count(code, s, "STG") and not count(code, s, "ATOMS")]
    in_loops = {a for s in spans for a, _ in code if s[0] <= a <= s[1]}
    straight = sum(1 for a, t in code if a not in in_loops and a < strip[0])  # entry code (upper bound: both paths)
    return {"row_loop": count(code, row), "strip_setup": setup, "remainder_per_row": remainder_per_row,
            "zero_loop": count(code, zero[0]) if zero else 0, "write_loop": count(code, write[0]) if write else 0,
            "entry": straight, "row_loop_atomics": count(code, row, "ATOMS"), "row_loop_loads": count(code, row, "LDG")}


def per_tile(m: dict, pitch: int, height: int, width: int) -> dict:
    words, band = width * pitch // 4, -(-height // WARPS)
    strips = -(-words // 32)
    warp_instructions = 0.0
    for warp in range(WARPS):
        rows = max(0, min(height, (warp + 1) * band) - warp * band) - (1 if warp == 0 else 0)  # row 0: in the setup
        warp_instructions += m["entry"] + strips * (m["strip_setup"] + rows // ROWS_AHEAD * m["row_loop"]
                                                    + rows % ROWS_AHEAD * m["remainder_per_row"])
    slots = 5 * (256 + 11)
    warp_instructions += -(-slots // 256) * m["zero_loop"] * WARPS + -(-3 * 256 // 256) * m["write_loop"] * WARPS
    per_byte = warp_instructions * 32 / (height * width * pitch)
    loop_only = m["row_loop"] * 32 / (ROWS_AHEAD * 128)
    return {"per_byte": per_byte, "loop_per_byte": loop_only, "tb_s": ISSUE / per_byte / 1e12, "hbm": ISSUE / per_byte / HBM}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sass", help="a SASS listing (cuobjdump -sass) instead of compiling")
    args = parser.parse_args()
    code = kernels(Path(args.sass).read_text() if args.sass else dump_sass())
    print("| tile | row loop (SASS / 8 rows) | strip setup | thread-instr. per byte, loop only | per byte, all | "
          "issue-bound TB/s | % of 4.8 TB/s |")
    print("|---|---|---|---|---|---|---|")
    for name, pitch, height, width in TILES:
        m = model(code[pitch])
        r = per_tile(m, pitch, height, width)
        print(f"| {name} | {m['row_loop']} ({m['row_loop_atomics']} ATOMS, {m['row_loop_loads']} LDG) | {m['strip_setup']} | "
              f"{r['loop_per_byte']:.2f} | {r['per_byte']:.2f} | {r['tb_s']:.2f} | {r['hbm']:.0%} |")


if __name__ == "__main__":
    main()
