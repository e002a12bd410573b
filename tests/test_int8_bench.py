"""bench/int8_products.py: its int8 product and gradient against fp32 on random matrices."""

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import int8_products  # noqa: E402

pytestmark = pytest.mark.skipif("fbgemm" not in torch.backends.quantized.supported_engines,
                                reason="fbgemm's int8 kernels are x86 only")


def test_int8_linear_tracks_fp32_and_per_row_scaling_keeps_small_rows():
    torch.manual_seed(0)
    weight = torch.randn(96, 64) * 0.05
    x = torch.randn(12, 64)
    x[0] *= 50  # one token far larger than the rest, as a few are in an LM
    packed, packed_t = int8_products.quantized(weight), int8_products.quantized(weight.t())
    exact = x @ weight.t()

    def error(per_row: bool) -> float:
        """The worst relative error over the rows other than the large one."""
        got = int8_products.int8_product(x, packed, per_row)
        return float(((got - exact)[1:].norm(dim=1) / exact[1:].norm(dim=1)).max())

    assert error(per_row=True) < 0.05
    assert error(per_row=False) > 3 * error(per_row=True)  # one scale for the matrix loses the small rows

    x.requires_grad_(True)
    out = int8_products.Int8Linear.apply(x, packed, packed_t, True)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    expected = grad_out @ weight
    assert torch.nn.functional.cosine_similarity(x.grad.flatten(), expected.flatten(), dim=0) > 0.99
