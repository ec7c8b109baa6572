"""The leakage benchmark (how training-like an inversion's images are), as a script.

    python benchmarks/leakage.py                      # the default suite, the library's defaults
    python benchmarks/leakage.py --ablation           # + one variant per method option (tldr_fast.leakage.ABLATION)
    python benchmarks/leakage.py --suite quick        # CI's smoke test
    python benchmarks/leakage.py --suite full --device cuda

Its logic lives in ``tldr_fast.leakage`` (the command ``tldr-fast leakage`` takes the same options);
this script only forwards its arguments there. Results: ``--out`` (default leakage_out/) gets
results.json, results.md and grids/.
"""

import sys

from tldr_fast.cli import main

if __name__ == "__main__":
    sys.exit(main(["leakage", *sys.argv[1:]]))
