"""Image -> pixel values: pyvl's fused C++ kernel vs the original Pillow + torch pipeline (same machine, same run).

python benchmarks/bench_preprocess.py            # same as `pyvl bench preprocess`
"""

import sys

from pyvl.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "preprocess", *sys.argv[1:]]))
