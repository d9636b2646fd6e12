"""Evaluate everything on whatever backend JAX sees; see ``cascade/bench/evaluate.py``.

    python scripts/evaluate.py --out DIR [--quick] [--data FILE] [--sections matmul,decode,ptq,kv,cascade]
"""

import sys

from cascade.bench.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
