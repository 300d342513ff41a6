"""Benchmark bnpy against PyTorch, NumPy and memcpy: see bnpy/bench.py.

python benchmarks/bench.py [--quick] [--results benchmarks/RESULTS.md]
"""

import sys

from bnpy.bench import main

if __name__ == "__main__":
    sys.exit(main())
