"""One OpenMP runtime per process, whichever of torch and isg._C is imported first.

isg._C links libgomp.so.1; torch ships its own libgomp.so.1 with the same soname, so the
dynamic loader must map exactly one of them. A second copy (for example a libgomp vendored
under another name by ``auditwheel repair``) would run a second thread pool that ignores
``torch.set_num_threads``. Exits non-zero, naming the libraries, when a process maps more
than one. Linux only (reads /proc/self/maps).
    python tools/check_openmp.py
"""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import {first}, {second}
libs = sorted({{line.split()[-1] for line in open("/proc/self/maps") if "gomp" in line.rsplit("/", 1)[-1]}})
print("\\n".join(libs))
"""


def mapped_openmp(first: str, second: str) -> list[str]:
    run = subprocess.run([sys.executable, "-c", PROBE.format(first=first, second=second)], capture_output=True, text=True)
    if run.returncode:
        sys.exit(f"import {first}, {second} failed:\n{run.stderr.strip()}")
    return run.stdout.split()


def main() -> int:
    failed = False
    for first, second in (("torch", "isg._C"), ("isg._C", "torch")):
        libs = mapped_openmp(first, second)
        ok = len(libs) == 1
        failed |= not ok
        print(f"{'ok ' if ok else 'BAD'} import {first} then {second}: {len(libs)} OpenMP runtime(s) {libs}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
