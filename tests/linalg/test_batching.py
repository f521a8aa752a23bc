"""``linalg.batching``: equal-shape runs bounded in size, and the checks that use them."""

from __future__ import annotations

import pytest
import torch

from tallskinny.linalg import SymmetricBlockTridiagonal
from tallskinny.linalg.batching import STACK_ENTRIES, same_shape_batches


def test_runs_group_equal_shapes_and_stay_under_the_limit():
    shapes = [(2, 2), (3, 3), (2, 2), (0, 4), (3, 3), (2, 2)]
    assert same_shape_batches(shapes) == [[0, 2, 5], [1, 4]]
    assert same_shape_batches(shapes, limit=8) == [[0, 2], [5], [1], [4]]
    # a block larger than the limit is a run of its own
    assert same_shape_batches([(5, 5), (5, 5)], limit=10) == [[0], [1]]
    assert same_shape_batches([]) == [] and same_shape_batches([(0, 3)]) == []


def test_asymmetric_block_is_found_in_a_later_run():
    n = int((STACK_ENTRIES // 2) ** 0.5) + 1  # two blocks exceed the limit: runs of one
    assert len(same_shape_batches([(n, n)] * 3)) == 3
    gen = torch.Generator().manual_seed(0)
    diagonal = []
    for _ in range(3):
        A = torch.randn(n, n, generator=gen, dtype=torch.float64)
        diagonal.append(A + A.mT)
    diagonal[2][0, 1] += 1.0
    lower = [torch.zeros(n, n, dtype=torch.float64)] * 2
    SymmetricBlockTridiagonal(diagonal[:2], lower[:1])  # symmetric: accepted
    with pytest.raises(ValueError, match="diagonal block 2 is not symmetric"):
        SymmetricBlockTridiagonal(diagonal, lower)
