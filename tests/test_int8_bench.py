"""bench/int8_products.py: one scale for the whole input matrix (fbgemm's own) loses the rows that are
small beside another, which `int8-frozen`'s one scale a row keeps."""

import sys
from pathlib import Path

import pytest
import torch

from vlmkit.device import cpu_int8_products
from vlmkit.model.frozen_int8 import pack, product

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import int8_products  # noqa: E402

pytestmark = pytest.mark.skipif(not cpu_int8_products(), reason="fbgemm's int8 kernels are x86 only")


def test_one_scale_for_the_matrix_loses_the_small_rows():
    torch.manual_seed(0)
    weight = torch.randn(96, 64) * 0.05
    x = torch.randn(12, 64)
    x[0] *= 50  # one token far larger than the rest, as a few are in an LM
    packed, exact = pack(weight), x @ weight.t()

    def error(got: torch.Tensor) -> float:
        """The worst relative error over the rows other than the large one."""
        return float(((got - exact)[1:].norm(dim=1) / exact[1:].norm(dim=1)).max())

    assert error(product(x, packed)) < 0.05
    assert error(int8_products.per_matrix_product(x, packed)) > 3 * error(product(x, packed))
