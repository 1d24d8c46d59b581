"""`python -m mlxgpt.setup_blas`: install OpenBLAS for MLX's Linux CPU wheel if missing; `--bench` compares speeds."""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys

from mlxgpt.blas import DEBIAN_PACKAGE, HINT, describe, find_openblas, is_linux_cpu_wheel, use_fast_blas


def _install_system_openblas() -> bool:
    """apt-get install OpenBLAS when running as root on a Debian-like system (containers, CI)."""
    if not (shutil.which("apt-get") and hasattr(os, "geteuid") and os.geteuid() == 0):
        return False
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "env": env}
    subprocess.run(["apt-get", "update", "-qq"], **quiet)
    return subprocess.run(["apt-get", "install", "-y", "-qq", DEBIAN_PACKAGE], **quiet).returncode == 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--setup", action="store_true", help="install OpenBLAS if missing and possible")
    parser.add_argument("--bench", action="store_true", help="compare reference and OpenBLAS matmul speed")
    args = parser.parse_args(argv)
    if not is_linux_cpu_wheel():
        print("mlxgpt: BLAS: nothing to do on this platform (MLX uses its own fast backend)")
        return 0
    if args.setup and find_openblas() is None:
        if not _install_system_openblas():
            print(f"mlxgpt: WARNING: no OpenBLAS found, CPU training will be ~30-60x slower; {HINT}")
            return 0
        use_fast_blas(recheck=True)  # `import mlxgpt` looked before the install
    if args.bench:
        code = "import mlxgpt, mlxgpt.blas as b; print(b.matmul_gflops())"
        rates = {}
        for name, value in (("reference", "reference"), ("openblas", "")):
            env = dict(os.environ, MLXGPT_BLAS=value) if value else os.environ
            out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
            rates[name] = float(out.stdout.strip())
        print("| BLAS | fp32 1024x1024 matmul GFLOP/s |\n|---|---|")
        for name, rate in rates.items():
            print(f"| {name} | {rate:.1f} |")
        print(f"speed-up: {rates['openblas'] / rates['reference']:.1f}x")
        return 0
    use_fast_blas()
    print(f"mlxgpt: BLAS: {describe()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
