"""Every Triton kernel variant of each op with ``compile_cases`` compiles for Hopper (sm_90) without a GPU,
with float arguments typed both as Triton's launcher and as Inductor type them (``tldr_fast.kernels._aot``)."""

import pytest

from tldr_fast.kernels._aot import compile_check, compiled_ops

pytestmark = pytest.mark.triton


@pytest.mark.parametrize("op", compiled_ops())
def test_kernels_compile_for_hopper(op):
    result = compile_check(op)
    if result is None:
        pytest.skip("Triton's NVIDIA backend (ptxas) is not available")
    ok, output = result
    assert ok, output
