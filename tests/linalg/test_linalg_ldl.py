"""``linalg.ldl``: the explicit Bunch–Kaufman factors reproduce the matrix, and their
half solves compose to ``A⁻¹`` and to ``BᵀA⁻¹B``, on indefinite matrices with many
``2×2`` blocks and interchanges, with exact zeros, in both precisions."""

from __future__ import annotations

import pytest
import torch

from tallskinny.linalg.ldl import explicit_ldl


def matrices(n: int, seed: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=g, dtype=torch.float64)
    sym = A + A.mT  # indefinite: 2×2 pivots and interchanges throughout
    zero_diagonal = sym - torch.diag(sym.diagonal())  # every pivot a 2×2 block or a swap
    graded = sym * torch.logspace(0, 6, n, dtype=torch.float64)  # rows and columns scaled
    graded = graded * torch.logspace(0, 6, n, dtype=torch.float64).unsqueeze(1)
    kkt = torch.zeros(n, n, dtype=torch.float64)  # [[I, B], [Bᵀ, 0]]: a saddle point (regular)
    h = (n + 1) // 2
    kkt[:h, :h] = torch.eye(h, dtype=torch.float64)
    kkt[:h, h:] = torch.randn(h, n - h, generator=g, dtype=torch.float64)
    kkt[h:, :h] = kkt[:h, h:].mT
    return {"gaussian": sym.to(dtype), "zero_diagonal": zero_diagonal.to(dtype), "graded": graded.to(dtype),
            "kkt": kkt.to(dtype)}


def D_of(f) -> torch.Tensor:
    n = f.d.shape[0]
    D = torch.diag(f.d)
    if n > 1:
        D += torch.diag(f.e[:-1], -1) + torch.diag(f.e[:-1], 1)
    return D


@pytest.mark.parametrize("n", [1, 2, 3, 8, 33, 130])
@pytest.mark.parametrize("seed", [0, 1])
def test_the_explicit_factors_reproduce_the_matrix(n, seed):
    for name, Q in matrices(n, seed).items():
        ld, piv, info = torch.linalg.ldl_factor_ex(Q)
        if int(info):  # (an exactly singular D: the callers treat it as singular)
            continue
        f = explicit_ldl(ld.clone(), piv)
        where = f"{name} n={n} seed={seed}"
        assert torch.equal(f.L, torch.tril(f.L)) and bool((f.L.diagonal() == 1).all()), where
        assert torch.equal(torch.sort(f.perm).values, torch.arange(n)), where
        assert torch.equal(f.perm[f.inverse], torch.arange(n)), where
        scale = float(Q.abs().max())
        err = float((Q[f.perm][:, f.perm] - f.L @ D_of(f) @ f.L.mT).abs().max())
        assert err <= 1e-13 * n * scale * float(f.L.abs().max()) ** 2, (where, err)
        # D's 2×2 blocks sit where the pivots say, nowhere else
        assert torch.equal(f.e != 0, torch.isin(torch.arange(n), f.pairs) & (f.e != 0)), where
        torch.testing.assert_close(torch.sort(f.eigenvalues).values, torch.linalg.eigvalsh(D_of(f)), rtol=1e-12, atol=1e-12 * scale)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-3)])
@pytest.mark.parametrize("n", [5, 64])
def test_half_solves_compose_to_the_inverse_and_the_schur_product(dtype, tol, n):
    g = torch.Generator().manual_seed(n)
    for name, Q in matrices(n, 3, dtype).items():
        if name == "graded":
            continue  # (cond ~1e12: the float64 reference itself is the limit there)
        f = explicit_ldl(*torch.linalg.ldl_factor(Q))
        B = torch.randn(n, 7, generator=g, dtype=torch.float64).to(dtype)
        Q64, B64 = Q.double(), B.double()
        expected = torch.linalg.solve(Q64, B64)
        cond = float(torch.linalg.cond(Q64))
        assert float((f.solve(B).double() - expected).norm() / expected.norm()) <= tol * cond / 100, name
        W = f.lower_solve(B)
        assert W.stride(-1) == 1, name  # row-major, as the products with it want
        Y = f.pivot_solve(W)
        schur = B64.mT @ expected
        assert float((W.mT @ Y).double().sub(schur).norm() / schur.norm()) <= tol * cond / 100, name
        assert float((f.upper_solve(Y).double() - expected).norm() / expected.norm()) <= tol * cond / 100, name
        # the 2×2 block solve against its dense inverse
        torch.testing.assert_close(Y.double(), torch.linalg.solve(D_of(f).double(), W.double()), rtol=tol, atol=tol * float(Y.abs().max()))


def test_a_row_of_interchanges_reaches_the_earlier_columns():
    """Interchanges late in the factorization move rows of the first columns: a matrix
    whose largest entries sit in its last rows makes every step swap."""
    n = 6
    Q = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        Q[i, i] = 1e-3 * (i + 1)
    Q[0, n - 1] = Q[n - 1, 0] = 1.0
    Q[1, n - 2] = Q[n - 2, 1] = 2.0
    ld, piv = torch.linalg.ldl_factor(Q)
    assert bool((piv.abs() - 1 != torch.arange(n)).any())  # interchanges happened
    f = explicit_ldl(ld.clone(), piv)
    torch.testing.assert_close(Q[f.perm][:, f.perm], f.L @ D_of(f) @ f.L.mT, rtol=0, atol=1e-15)
