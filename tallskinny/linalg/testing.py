"""A shared test suite for linear operators, and random test matrices.

Every operator type gets a test class that subclasses :class:`LinearOperatorTestCase`
and implements :meth:`~LinearOperatorTestCase.make_operator`; the suite then checks all
of the operator's behaviour against a dense reference (its ``to_dense()``, or a matrix
that ``make_operator`` built independently)::

    class TestMyOperator(LinearOperatorTestCase):
        def make_operator(self, dtype, generator):
            return MyOperator(...)

The ``test_*`` methods run under pytest (or any runner that calls them); they need no
fixtures and import nothing but torch. Each loops over ``dtypes`` × ``seeds``; a seed
drives the generator, so operators of several ragged shapes are exercised.

The helpers ``random_*`` build reproducible, well-conditioned test matrices.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
from torch import Tensor

from . import factor
from .block import BlockTridiagonal, SymmetricBlockTridiagonal
from .errors import SingularMatrixError
from .operators import Dense, Identity

# ---------------------------------------------------------------------------------------
# moving every rank and pivot decision at once


@contextlib.contextmanager
def scaled_tolerances(scale: float) -> Iterator[None]:
    """Test-only: every rank and pivot tolerance (:func:`~tallskinny.linalg.factor.pivot_tolerance`,
    hence every decision of :mod:`tallskinny` that counts a pivot, singular value or
    eigenvalue as zero) multiplied by ``scale`` inside the block, restored after. A result
    must stay right whichever way a decision near its threshold falls: run it at
    ``scale = 1e-3`` and ``1e3``. Not thread-safe (it changes a module constant)."""
    previous = factor.PIVOT_TOLERANCE_FACTOR
    factor.PIVOT_TOLERANCE_FACTOR = previous * scale
    try:
        yield
    finally:
        factor.PIVOT_TOLERANCE_FACTOR = previous


def nudged(tensor: Tensor, ulps: int, generator: torch.Generator) -> Tensor:
    """A copy of ``tensor`` with each entry moved by a random number of units in the last
    place in ``[-ulps, ulps]`` (zeros stay zero): the same input as rounding on another
    machine might have left it, to test decisions that sit on their threshold."""
    steps = torch.randint(-ulps, ulps + 1, tensor.shape, generator=generator, device=tensor.device)
    steps = torch.where(tensor == 0, torch.zeros_like(steps), steps)
    out = tensor.clone()
    up, down = torch.full_like(out, float("inf")), torch.full_like(out, -float("inf"))
    for _ in range(ulps):
        moved = torch.nextafter(out, torch.where(steps > 0, up, down))
        out = torch.where(steps != 0, moved, out)
        steps = steps - steps.sign()
    return out


# ---------------------------------------------------------------------------------------
# random test matrices


def random_sizes(n: int, low: int, high: int, generator: torch.Generator) -> list[int]:
    """``n`` block sizes drawn uniformly from ``low..high`` (inclusive)."""
    return torch.randint(low, high + 1, (n,), generator=generator).tolist()


def random_orthogonal(b: int, generator: torch.Generator, dtype=torch.float64) -> Tensor:
    """A random ``b × b`` orthogonal matrix (QR of a Gaussian matrix)."""
    q, r = torch.linalg.qr(torch.randn(b, b, generator=generator, dtype=torch.float64))
    return (q * torch.sign(r.diagonal())).to(dtype)


def random_matrix(
    m: int,
    n: int,
    generator: torch.Generator,
    dtype=torch.float64,
    *,
    singular_values: tuple[float, float] = (1.0, 2.0),
    rank: int | None = None,
) -> Tensor:
    """``U diag(s) Vᵀ`` with ``s`` uniform in ``singular_values`` (the last ``min(m,n) − rank`` zero)."""
    k = min(m, n)
    s = singular_values[0] + (singular_values[1] - singular_values[0]) * torch.rand(k, generator=generator, dtype=torch.float64)
    if rank is not None:
        s[rank:] = 0.0
    u = random_orthogonal(m, generator)[:, :k]
    v = random_orthogonal(n, generator)[:, :k]
    return ((u * s) @ v.T).to(dtype)


def random_symmetric(
    b: int,
    generator: torch.Generator,
    dtype=torch.float64,
    *,
    eigenvalues: tuple[float, float] = (1.0, 2.0),
    negative_fraction: float = 0.5,
    rank: int | None = None,
) -> Tensor:
    """``Q diag(λ) Qᵀ`` with ``|λ|`` uniform in ``eigenvalues``, a random fraction negative
    (the last ``b − rank`` eigenvalues zero)."""
    lam = eigenvalues[0] + (eigenvalues[1] - eigenvalues[0]) * torch.rand(b, generator=generator, dtype=torch.float64)
    signs = torch.where(torch.rand(b, generator=generator) < negative_fraction, -1.0, 1.0).double()
    lam = lam * signs
    if rank is not None:
        lam[rank:] = 0.0
    q = random_orthogonal(b, generator)
    m = (q * lam) @ q.T
    return ((m + m.T) / 2).to(dtype)


def random_block_tridiagonal(
    sizes: Sequence[int],
    generator: torch.Generator,
    dtype=torch.float64,
    *,
    coupling: float = 0.4,
    singular_diagonal: bool = False,
) -> BlockTridiagonal:
    """A random block-tridiagonal matrix.

    By default block-diagonally dominant: diagonal blocks with singular values in
    ``[2, 3]`` and off-diagonal blocks of norm ``coupling`` give
    ``cond ≤ (3 + 2c) / (2 − 2c)`` (≤ 7 for ``c = 0.4``). With ``singular_diagonal``
    every diagonal block loses one rank (a 1×1 block is zero) and the off-diagonal
    blocks are Gaussian: the matrix is then usually nonsingular but not dominant.
    """
    n = len(sizes)
    diag, lower, upper = [], [], []
    for b in sizes:
        if singular_diagonal:
            diag.append(random_matrix(b, b, generator, dtype, rank=b - 1))
        else:
            diag.append(random_matrix(b, b, generator, dtype, singular_values=(2.0, 3.0)))
    for i in range(n - 1):
        for out, (r, c) in ((lower, (sizes[i + 1], sizes[i])), (upper, (sizes[i], sizes[i + 1]))):
            if singular_diagonal:
                out.append(torch.randn(r, c, generator=generator, dtype=torch.float64).to(dtype))
            else:
                out.append(random_matrix(r, c, generator, dtype, singular_values=(coupling, coupling)))
    return BlockTridiagonal(diag, lower, upper)


def random_symmetric_block_tridiagonal(
    sizes: Sequence[int],
    generator: torch.Generator,
    dtype=torch.float64,
    *,
    coupling: float = 0.4,
    negative_fraction: float = 0.5,
    singular_diagonal: bool = False,
) -> SymmetricBlockTridiagonal:
    """A random symmetric (indefinite) block-tridiagonal matrix.

    By default block-diagonally dominant: diagonal blocks with ``|λ|`` in ``[2, 3]``
    (a ``negative_fraction`` of them negative) and sub-diagonal blocks of norm
    ``coupling``. With ``singular_diagonal`` each diagonal block loses one rank and the
    couplings are Gaussian.
    """
    n = len(sizes)
    diag = [
        random_symmetric(b, generator, dtype, eigenvalues=(2.0, 3.0), negative_fraction=negative_fraction, rank=b - 1 if singular_diagonal else None)
        for b in sizes
    ]
    lower = []
    for i in range(n - 1):
        r, c = sizes[i + 1], sizes[i]
        if singular_diagonal:
            lower.append(torch.randn(r, c, generator=generator, dtype=torch.float64).to(dtype))
        else:
            lower.append(random_matrix(r, c, generator, dtype, singular_values=(coupling, coupling)))
    return SymmetricBlockTridiagonal(diag, lower)


def to_banded(matrix: Tensor, lower: int, upper: int) -> Tensor:
    """LAPACK/scipy band storage ``ab[upper + i − j, j] = M[i, j]`` of a dense matrix."""
    n = matrix.shape[0]
    ab = matrix.new_zeros((lower + upper + 1, n))
    for d in range(-lower, upper + 1):
        diag = matrix.diagonal(d)  # entries M[i, i + d]
        if d >= 0:
            ab[upper - d, d:] = diag
        else:
            ab[upper - d, : n + d] = diag
    return ab


def relative_error(x: Tensor, reference: Tensor) -> float:
    """``‖x − ref‖ / ‖ref‖`` in float64 (``‖x‖`` if the reference is zero)."""
    x, reference = x.double(), reference.double()
    denom = reference.norm()
    if denom == 0:
        return x.norm().item()
    return ((x - reference).norm() / denom).item()


# ---------------------------------------------------------------------------------------
class LinearOperatorTestCase:
    """The shared suite. Subclasses implement :meth:`make_operator` and may adjust:

    ``dtypes``, ``seeds`` — what to loop over; ``square`` — whether solves apply;
    ``singular`` — the operators are singular (factorize must raise);
    ``structure_preserved`` — ``+``/``-``/``*`` with an operator of the same type must
    return the same type; ``tolerance`` / ``solve_tolerance`` — relative errors allowed
    for products and for solves (operators should be well conditioned, cond ≲ 100).
    """

    dtypes: tuple[torch.dtype, ...] = (torch.float64, torch.float32)
    seeds: tuple[int, ...] = (0, 1, 2)
    square: bool = True
    singular: bool = False
    structure_preserved: bool = True
    tolerance = {torch.float64: 1e-12, torch.float32: 1e-5}
    solve_tolerance = {torch.float64: 1e-10, torch.float32: 1e-4}

    def make_operator(self, dtype: torch.dtype, generator: torch.Generator):
        """Return an operator, or ``(operator, dense_reference)``."""
        raise NotImplementedError

    # -- plumbing ---------------------------------------------------------------------------
    def _cases(self):
        for dtype in self.dtypes:
            for seed in self.seeds:
                gen = torch.Generator().manual_seed(seed)
                made = self.make_operator(dtype, gen)
                op, ref = made if isinstance(made, tuple) else (made, None)
                if ref is None:
                    ref = op.to_dense()
                yield op, ref.to(dtype), dtype, f"{type(op).__name__} {op.shape} {dtype} seed {seed}", gen

    def _close(self, got: Tensor, expected: Tensor, dtype, where: str, tol=None) -> None:
        tol = self.tolerance[dtype] if tol is None else tol
        assert got.shape == expected.shape, f"{where}: shape {tuple(got.shape)} != {tuple(expected.shape)}"
        assert got.dtype == dtype, f"{where}: dtype {got.dtype} != {dtype}"
        assert bool(torch.isfinite(got).all()), f"{where}: non-finite entries"
        err = relative_error(got, expected)
        assert err <= tol, f"{where}: relative error {err:.3g} > {tol:.1g}"

    @staticmethod
    def _rand(shape, dtype, gen) -> Tensor:
        return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)

    # -- basic properties -------------------------------------------------------------------
    def test_dense_shape_dtype(self):
        for op, ref, dtype, where, _ in self._cases():
            dense = op.to_dense()
            assert tuple(op.shape) == tuple(ref.shape), where
            assert op.dtype == dtype and dense.dtype == dtype, where
            assert dense.device == op.device, where
            self._close(dense, ref, dtype, where + " to_dense", tol=0.0 if dtype == torch.float64 else 1e-7)

    def test_dense_block(self):
        for op, ref, dtype, where, gen in self._cases():
            m, n = op.shape
            if not m or not n:
                continue
            for rows, cols in (
                (torch.randint(0, m, (max(m - 1, 1),), generator=gen), torch.randperm(n, generator=gen)[: (n + 1) // 2]),
                (torch.arange(m), torch.arange(n)),
            ):
                block = op.dense_block(rows, cols)
                expected = ref.index_select(0, rows).index_select(1, cols)
                self._close(block, expected, dtype, where + " dense_block", tol=0.0 if dtype == torch.float64 else 1e-7)
            for rows, cols in ((None, None), (None, torch.randperm(n, generator=gen)), (torch.randperm(m, generator=gen), None)):
                expected = ref if rows is None else ref.index_select(0, rows)
                expected = expected if cols is None else expected.index_select(1, cols)
                self._close(op.dense_block(rows, cols), expected, dtype, where + " dense_block (None: all)",
                            tol=0.0 if dtype == torch.float64 else 1e-7)

    def test_matmul_vector(self):
        for op, ref, dtype, where, gen in self._cases():
            x = self._rand(op.shape[1], dtype, gen)
            self._close(op @ x, ref.double() @ x.double(), dtype, where + " @ vector")

    def test_matmul_matrix(self):
        for op, ref, dtype, where, gen in self._cases():
            for k in (1, 3):
                x = self._rand((op.shape[1], k), dtype, gen)
                self._close(op @ x, ref.double() @ x.double(), dtype, f"{where} @ ({op.shape[1]}, {k})")

    def test_rmatmul(self):
        for op, ref, dtype, where, gen in self._cases():
            y = self._rand(op.shape[0], dtype, gen)
            self._close(y @ op, y.double() @ ref.double(), dtype, where + " vector @ op")
            Y = self._rand((2, op.shape[0]), dtype, gen)
            self._close(Y @ op, Y.double() @ ref.double(), dtype, where + " matrix @ op")

    def test_transpose(self):
        for op, ref, dtype, where, gen in self._cases():
            t = op.T
            assert t.shape == (op.shape[1], op.shape[0]), where
            self._close(t.to_dense(), ref.T, dtype, where + " .T")
            x = self._rand(op.shape[0], dtype, gen)
            self._close(t @ x, ref.double().T @ x.double(), dtype, where + " .T @ x")
            self._close(t.T.to_dense(), ref, dtype, where + " .T.T")
            if op.symmetric:
                self._close(ref.T, ref, dtype, where + " declared symmetric", tol=1e-6 if dtype == torch.float32 else 1e-12)

    def test_bad_vector(self):
        for op, _, dtype, where, _ in self._cases():
            m, n = op.shape
            _expect(ValueError, lambda: op @ torch.zeros(n + 1, dtype=dtype), where + " wrong length")
            _expect(ValueError, lambda: op @ torch.zeros(n, 2, 2, dtype=dtype), where + " 3-D")
            other = torch.float32 if dtype == torch.float64 else torch.float64
            _expect(TypeError, lambda: op @ torch.zeros(n, dtype=other), where + " wrong dtype")

    # -- algebra ----------------------------------------------------------------------------
    def test_scale_and_negate(self):
        for op, ref, dtype, where, _ in self._cases():
            for result, expected, what in (
                (2.5 * op, 2.5 * ref.double(), "2.5 * op"),
                (op * -0.5, -0.5 * ref.double(), "op * -0.5"),
                (-op, -ref.double(), "-op"),
            ):
                self._close(result.to_dense(), expected, dtype, f"{where} {what}")
                if self.structure_preserved:
                    assert type(result) is type(op), f"{where} {what}: {type(result).__name__}"

    def test_add_and_subtract(self):
        for op, ref, dtype, where, gen in self._cases():
            twice = op + op
            self._close(twice.to_dense(), 2 * ref.double(), dtype, where + " op + op")
            diff = op - 0.5 * op
            self._close(diff.to_dense(), 0.5 * ref.double(), dtype, where + " op - 0.5 op")
            if self.structure_preserved:
                assert type(twice) is type(op), f"{where} op + op: {type(twice).__name__}"
                assert type(diff) is type(op), f"{where} op - op: {type(diff).__name__}"
            R = self._rand(op.shape, dtype, gen)
            self._close((op + Dense(R)).to_dense(), ref.double() + R.double(), dtype, where + " op + Dense")
            self._close((Dense(R) - op).to_dense(), R.double() - ref.double(), dtype, where + " Dense - op")
            _expect(ValueError, lambda: op + Dense(torch.zeros(op.shape[0] + 1, op.shape[1], dtype=dtype)), where + " add shape")

    def test_compose(self):
        for op, ref, dtype, where, gen in self._cases():
            m, n = op.shape
            r = ref.double()
            self._close((op @ op.T).to_dense(), r @ r.T, dtype, where + " op @ op.T")
            self._close((op.T @ op).to_dense(), r.T @ r, dtype, where + " op.T @ op")
            R = self._rand((n, 3), dtype, gen)
            self._close((op @ Dense(R)).to_dense(), r @ R.double(), dtype, where + " op @ Dense")
            Lm = self._rand((2, m), dtype, gen)
            self._close((Dense(Lm) @ op).to_dense(), Lm.double() @ r, dtype, where + " Dense @ op")
            self._close((op @ Identity(n, dtype=dtype)).to_dense(), r, dtype, where + " op @ I")
            self._close((Identity(m, dtype=dtype) @ op).to_dense(), r, dtype, where + " I @ op")
            if m == n:
                self._close((op @ op).to_dense(), r @ r, dtype, where + " op @ op")
            _expect(ValueError, lambda: op @ Dense(torch.zeros(n + 1, 2, dtype=dtype)), where + " compose shape")

    # -- solves -----------------------------------------------------------------------------
    def test_solve(self):
        if not self.square or self.singular:
            return
        for op, ref, dtype, where, gen in self._cases():
            r64 = ref.double()
            b = self._rand(op.shape[0], dtype, gen)
            B = self._rand((op.shape[0], 3), dtype, gen)
            tol = self.solve_tolerance[dtype]
            self._close(op.solve(b), torch.linalg.solve(r64, b.double()), dtype, where + " solve (N,)", tol)
            self._close(op.solve(B), torch.linalg.solve(r64, B.double()), dtype, where + " solve (N,3)", tol)

    def test_factorize_reuse(self):
        if not self.square or self.singular:
            return
        for op, ref, dtype, where, gen in self._cases():
            f = op.factorize()
            assert tuple(f.shape) == tuple(op.shape) and f.dtype == dtype, where
            r64 = ref.double()
            tol = self.solve_tolerance[dtype]
            b = self._rand(op.shape[0], dtype, gen)
            x1 = f.solve(b)
            for k in (1, 4):
                B = self._rand((op.shape[0], k), dtype, gen)
                self._close(f.solve(B), torch.linalg.solve(r64, B.double()), dtype, f"{where} factor.solve (N,{k})", tol)
            assert torch.equal(f.solve(b), x1), where + ": a second solve with the same factors differs"
            self._close(x1, torch.linalg.solve(r64, b.double()), dtype, where + " factor.solve (N,)", tol)
            self._close(op @ x1, b.double(), dtype, where + " residual", 10 * tol)

    def test_logdet_and_sign(self):
        if not self.square or self.singular:
            return
        for op, ref, dtype, where, _ in self._cases():
            f = op.factorize()
            sign, logabs = torch.linalg.slogdet(ref.double())
            assert f.logdet().dim() == 0 and f.sign().dim() == 0, where
            assert f.sign().item() == sign.item(), f"{where}: sign {f.sign().item()} != {sign.item()}"
            tol = self.solve_tolerance[dtype] * max(1.0, abs(logabs.item()), op.shape[0])
            err = abs(f.logdet().item() - logabs.item())
            assert err <= tol, f"{where}: logdet {f.logdet().item()} vs {logabs.item()}"
            fsign, flog = f.slogdet()
            assert fsign.item() == sign.item() and flog.item() == f.logdet().item(), where

    def test_inertia(self):
        if not self.square or self.singular:
            return
        for op, ref, dtype, where, _ in self._cases():
            f = op.factorize()
            if not op.symmetric:
                _expect(TypeError, f.inertia, where + " inertia of a non-symmetric operator")
                continue
            ev = torch.linalg.eigvalsh(ref.double())
            expected = (int((ev > 0).sum()), int((ev < 0).sum()), 0)
            assert tuple(f.inertia()) == expected, f"{where}: inertia {f.inertia()} != {expected}"

    def test_singular_raises(self):
        if not self.square or not self.singular:
            return
        for op, _, dtype, where, gen in self._cases():
            _expect(SingularMatrixError, op.factorize, where + " factorize")
            _expect(SingularMatrixError, lambda: op.solve(self._rand(op.shape[0], dtype, gen)), where + " solve")

    def test_solve_bad_input(self):
        if not self.square or self.singular:
            return
        for op, _, dtype, where, _ in self._cases():
            f = op.factorize()
            n = op.shape[0]
            _expect(ValueError, lambda: f.solve(torch.zeros(n + 1, dtype=dtype)), where + " rhs length")
            other = torch.float32 if dtype == torch.float64 else torch.float64
            _expect(TypeError, lambda: f.solve(torch.zeros(n, dtype=other)), where + " rhs dtype")
            bad = torch.zeros(n, dtype=dtype)
            bad[0] = float("nan")
            _expect(ValueError, lambda: f.solve(bad), where + " NaN rhs")

    def test_not_square_cannot_solve(self):
        if self.square:
            return
        for op, _, dtype, where, gen in self._cases():
            if op.shape[0] != op.shape[1]:
                _expect(ValueError, op.factorize, where + " factorize non-square")


def _expect(error: type[BaseException], fn, where: str) -> BaseException:
    try:
        fn()
    except error as err:
        assert str(err), f"{where}: {error.__name__} without a message"
        return err
    raise AssertionError(f"{where}: expected {error.__name__}")


__all__ = [
    "LinearOperatorTestCase",
    "nudged",
    "random_block_tridiagonal",
    "random_matrix",
    "random_orthogonal",
    "random_sizes",
    "random_symmetric",
    "random_symmetric_block_tridiagonal",
    "relative_error",
    "scaled_tolerances",
    "to_banded",
]
