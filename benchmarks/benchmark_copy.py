"""The device's copy bandwidth (bytes read + written per second): the ceiling of the memory-bound ops,
and the denominator of their ``frac_copy`` in a run that includes this row.

    pytest benchmarks/benchmark_copy.py --benchmark-only
"""

import sys

import pytest
import torch

AXES = {"mib": {"cuda": (1024,), "cpu": (256,), "smoke": (1,)}}  # MiB copied per call


def test_copy(bench, device, mib):
    src = torch.empty(mib << 18, device=device).uniform_()  # [mib * 2^20 / 4] fp32
    dst = torch.empty_like(src)
    bench(lambda: dst.copy_(src), "copy", "torch", f"{mib} MiB", bytes=2 * (mib << 20), baseline=None)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "--benchmark-only", *sys.argv[1:]]))
