"""The stagewise elimination on synthetic oracles, against a dense Hessian.

The oracles here are random matrices, not derivatives of a network: the elimination
must be exact for *any* LQ problem, which also lets us build singular stages on purpose.
"""

from __future__ import annotations

import pytest
import torch

from tallskinny import SingularSystemError, elimination
from tallskinny.blocks.protocol import Oracle
from tallskinny.linalg import Dense, Inertia, LowRank, Zero
from tallskinny.elimination.stages.dense import DenseStage
from tallskinny.elimination.riccati import RiccatiFactorization
from tallskinny.elimination.stages import Stage, StageFactor
from tallskinny.elimination.algebra import StageSingular
from tallskinny import elimination



pytestmark = pytest.mark.usefixtures("float64")


def riccati(oracles, loss, damping):
    return RiccatiFactorization(elimination.prepare_stages(oracles, loss), loss, damping)


def _sym(n, gen, scale=1.0):
    M = torch.randn(n, n, generator=gen) * scale
    return (M + M.T) / 2


def _parameter_curvature(p, gen, rank):
    if not p:
        return Zero(0, 0)
    if rank is None:
        return Dense(_sym(p, gen), symmetric=True)
    return LowRank(torch.randn(p, rank, generator=gen), _sym(rank, gen))


def random_problem(sizes, seed, *, a0=3, psd_loss=True, rank=None):
    """``sizes`` is a list of ``(a_l, p_l)``; returns (oracles, loss_oracle). ``rank``: each
    ``A`` a :class:`LowRank` of that many columns instead of dense."""
    gen = torch.Generator().manual_seed(seed)
    oracles, a_in = [], a0
    for a, p in sizes:
        G = torch.randn(a, p, generator=gen) if p else None
        F = torch.randn(a, a_in, generator=gen) / max(a_in, 1) ** 0.5
        oracles.append(
            Oracle(
                G=Dense(G) if p else Zero(a, 0),
                F=Dense(F),
                A=_parameter_curvature(p, gen, rank),
                C=Dense(torch.randn(p, a_in, generator=gen)) if p else Zero(0, a_in),
                E=Dense(_sym(a_in, gen, 0.5), symmetric=True),
            )
        )
        a_in = a
    M = torch.randn(a_in, a_in, generator=gen)
    E_loss = M @ M.T if psd_loss else (M + M.T) / 2
    loss = Oracle(G=Zero(1, 0), F=Dense(torch.randn(1, a_in, generator=gen)), A=Zero(0, 0), C=Zero(0, a_in), E=Dense(E_loss, symmetric=True))
    return oracles, loss


def dense_hessian(oracles, loss):
    """The Hessian of the LQ objective Σ ½θᵀAθ + θᵀCy + ½yᵀEy + ½y_Lᵀ E_loss y_L."""
    sizes = [o.G.shape[1] for o in oracles]

    def objective(theta):
        parts = torch.split(theta, sizes)
        y = torch.zeros(oracles[0].F.shape[1])
        total = theta.new_zeros(())
        for o, t in zip(oracles, parts):
            A, C, E = o.A.to_dense(), o.C.to_dense(), o.E.to_dense()
            total = total + 0.5 * t @ A @ t + t @ C @ y + 0.5 * y @ E @ y
            y = o.F.to_dense() @ y + o.G.to_dense() @ t
        return total + 0.5 * y @ loss.E.to_dense() @ y

    P = sum(sizes)
    return torch.func.hessian(objective)(torch.zeros(P))


SHAPES = [
    [(4, 3)],
    [(3, 5), (3, 0), (2, 4)],
    [(2, 3), (4, 0), (4, 6), (1, 2)],
    [(5, 7), (5, 0), (5, 7), (5, 0), (3, 6)],
]


@pytest.mark.parametrize("sizes", SHAPES)
@pytest.mark.parametrize("seed", range(3))
def test_hvp_matches_dense(sizes, seed):
    oracles, loss = random_problem(sizes, seed)
    H = dense_hessian(oracles, loss)
    V = torch.randn(H.shape[0], 4, generator=torch.Generator().manual_seed(seed))
    compiled = elimination.compile_oracles(oracles), elimination.CompiledOracle(loss)
    torch.testing.assert_close(elimination.hvp(*compiled, V), H @ V, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("sizes", SHAPES)
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("damping", [0.0, 1e-3, 0.5, 10.0])
@pytest.mark.parametrize("method", ["riccati", "kkt"])
def test_solve_logdet_inertia_match_dense(sizes, seed, damping, method):
    oracles, loss = random_problem(sizes, seed, psd_loss=seed % 2 == 0)
    H = dense_hessian(oracles, loss)
    M = H + damping * torch.eye(H.shape[0])
    eig = torch.linalg.eigvalsh(M)
    cls = riccati if method == "riccati" else elimination.KKTFactorization
    fact = cls(oracles, loss, damping)
    B = torch.randn(H.shape[0], 3, generator=torch.Generator().manual_seed(100 + seed))
    X = fact.solve(B)
    cond = (eig.abs().max() / eig.abs().min()).item()
    tol = max(1e-10, 1e-15 * cond)
    ref = torch.linalg.solve(M, B)
    assert (X - ref).norm() / ref.norm() <= tol
    assert fact.inertia() == ((eig > 0).sum().item(), (eig < 0).sum().item(), 0)
    torch.testing.assert_close(fact.logdet(), eig.abs().log().sum(), rtol=1e-10, atol=1e-10)
    assert fact.sign().item() == torch.linalg.slogdet(M).sign.item()


@pytest.mark.parametrize("sizes", [[(2, 7)], [(3, 6), (3, 0), (2, 9)], [(4, 4), (2, 8)]])
@pytest.mark.parametrize("rank", [1, 3])
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("damping", [1e-3, 0.5, 10.0])
def test_low_rank_parameter_curvature(sizes, rank, seed, damping):
    """``A = U M Uᵀ`` (a residual unit's): null(G) splits into the part of range(U) with an
    eigenbasis and the rest with pivots ε exactly; same results as dense references, and as
    the same problem with ``A`` dense. (At ε = 1e-6 both lose digits alike, ~1e-10: the
    stagewise elimination does not pivot across blocks; ``Factorization.solve`` refines.)"""
    oracles, loss = random_problem(sizes, seed, rank=rank)
    stages = elimination.prepare_stages(oracles, loss)
    assert any(getattr(st, "k", 0) and st.n_rest for st in stages)  # both parts present
    H = dense_hessian(oracles, loss)
    M = H + damping * torch.eye(H.shape[0])
    eig = torch.linalg.eigvalsh(M)
    fact = riccati(oracles, loss, damping)
    B = torch.randn(H.shape[0], 2, generator=torch.Generator().manual_seed(7 + seed))
    ref = torch.linalg.solve(M, B)
    cond = (eig.abs().max() / eig.abs().min()).item()
    assert (fact.solve(B) - ref).norm() / ref.norm() <= max(1e-10, 1e-15 * cond)
    assert fact.inertia() == ((eig > 0).sum().item(), (eig < 0).sum().item(), 0)
    torch.testing.assert_close(fact.logdet(), eig.abs().log().sum(), rtol=1e-10, atol=1e-10)
    dense = [Oracle(G=o.G, F=o.F, A=Dense(o.A.to_dense(), symmetric=True) if o.G.shape[1] else o.A, C=o.C, E=o.E)
             for o in oracles]
    X_dense = riccati(dense, loss, damping).solve(B)
    assert (fact.solve(B) - X_dense).norm() / X_dense.norm() <= max(1e-10, 1e-15 * cond)


@pytest.mark.parametrize("rank, seed", [(1, 0), (1, 2), (3, 0), (3, 1)])
def test_low_rank_complement_lies_in_null_space_whatever_the_rounding(rank, seed):
    """Issue 14: where ``G`` has full column rank (``null(G) = {0}``), ``(I − VVᵀ)U`` is
    rounding noise, and a noise direction that passed the rank test became a column of
    ``Z`` outside ``null(G)`` (``n_rest = −1``, relative errors 0.02–5.5 on another
    machine). Inputs nudged by a few ulps put the decision on either side; ``Z`` must stay
    orthonormal and in ``null(G)``, and the solve must match the dense one."""
    from tallskinny.linalg.testing import nudged

    oracles, loss = random_problem([(4, 4), (2, 8)], seed, rank=rank)
    gen = torch.Generator().manual_seed(seed)
    B = torch.randn(12, 2, generator=gen)
    for trial in range(60):
        first = oracles[0]
        G = Dense(nudged(first.G.to_dense(), 4, gen))
        problem = [Oracle(G=G, F=first.F, A=first.A, C=first.C, E=first.E), *oracles[1:]]
        stages = elimination.prepare_stages(problem, loss)
        for st in stages:
            if not isinstance(st, DenseStage):
                continue
            assert st.n_rest >= 0 and st.k <= st.p - st.r
            if st.k:
                assert (st.Z.mT @ st.Z - torch.eye(st.k)).abs().max() <= 1e-13
                if st.r:
                    assert (st.V.mT @ st.Z).abs().max() <= 1e-13
        if trial % 20 == 0:
            M = dense_hessian(problem, loss) + 0.5 * torch.eye(12)
            X = RiccatiFactorization(stages, loss, 0.5).solve(B)
            ref = torch.linalg.solve(M, B)
            assert (X - ref).norm() / ref.norm() <= 1e-10


def test_singular_stage_falls_back_to_pivoted_kkt():
    """The last stage's Q_θθ = A + εI + GᵀE_loss G is made exactly singular; H + εI is not."""
    damping = 0.1
    oracles, loss = random_problem([(3, 4), (3, 0), (2, 3)], seed=7)
    last = oracles[-1]
    G = last.G.to_dense()
    q = torch.diag(torch.tensor([0.0, 1.0, 2.0]))
    A = -damping * torch.eye(3) - G.T @ loss.E.to_dense() @ G + q
    oracles[-1] = Oracle(G=last.G, F=last.F, A=Dense((A + A.T) / 2, symmetric=True), C=last.C, E=last.E)
    with pytest.raises(StageSingular):
        riccati(oracles, loss, damping)
    H = dense_hessian(oracles, loss) + damping * torch.eye(7)
    eig = torch.linalg.eigvalsh(H)
    assert eig.abs().min() > 1e-3  # the whole system is comfortably nonsingular
    fact = elimination.factorize(oracles, loss, damping)
    assert isinstance(fact, elimination.KKTFactorization)
    b = torch.randn(7, 2, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(fact.solve(b), torch.linalg.solve(H, b), rtol=1e-10, atol=1e-12)
    assert fact.inertia() == ((eig > 0).sum().item(), (eig < 0).sum().item(), 0)
    torch.testing.assert_close(fact.logdet(), eig.abs().log().sum(), rtol=1e-10, atol=1e-12)


def test_unconfirmed_breakdown_raises_without_the_pivoted_factorization(monkeypatch):
    """``confirm_singular=False``: the same singular stage of a regular ``H + εI`` raises
    ``SingularSystemError`` (with the stage) and forms no KKT system."""
    damping = 0.1
    oracles, loss = random_problem([(3, 4), (3, 0), (2, 3)], seed=7)
    last = oracles[-1]
    G = last.G.to_dense()
    A = -damping * torch.eye(3) - G.T @ loss.E.to_dense() @ G + torch.diag(torch.tensor([0.0, 1.0, 2.0]))
    oracles[-1] = Oracle(G=last.G, F=last.F, A=Dense((A + A.T) / 2, symmetric=True), C=last.C, E=last.E)
    assert isinstance(elimination.factorize(oracles, loss, damping), elimination.KKTFactorization)

    def refuse(*args, **kwargs):
        raise AssertionError("the pivoted factorization was formed")

    monkeypatch.setattr(elimination.factor, "KKTFactorization", refuse)
    with pytest.raises(SingularSystemError, match="not confirmed") as raised:
        elimination.factorize(oracles, loss, damping, confirm_singular=False)
    assert raised.value.stage == 2 and raised.value.damping == damping


@pytest.mark.parametrize("sizes", [[(3, 4), (3, 0), (2, 3)], [(4, 5), (2, 6)], [(3, 3), (3, 5)]])
def test_exactly_singular_stage_goes_to_the_pivoted_factorization(sizes):
    """Issue 14: the last stage's ``Q_θθ = A + εI + GᵀSG`` is made singular (up to
    rounding) by an ``A`` that cancels ``GᵀSG``; ``H + εI`` stays well conditioned. The
    rounding errors of ``Q`` scale with ``A`` and ``GᵀSG``, not with ``max|Q|``, and the
    pivot of LU or Cholesky can exceed them several times: the old test took such a pivot
    as nonzero in 35 of 180 cases (a silently wrong log|det| and inertia). ``Q``'s smallest
    eigenvalue against the bound of its rounding errors flags every one of them."""
    damping = 0.1
    for seed in range(20):
        oracles, loss = random_problem(sizes, seed=seed)
        last = oracles[-1]
        G = last.G.to_dense()
        p = G.shape[1]
        A = -damping * torch.eye(p) - G.T @ loss.E.to_dense() @ G + torch.diag(torch.arange(p, dtype=torch.float64))
        oracles[-1] = Oracle(G=last.G, F=last.F, A=Dense((A + A.T) / 2, symmetric=True), C=last.C, E=last.E)
        M = dense_hessian(oracles, loss) + damping * torch.eye(sum(q for _, q in sizes))
        eig = torch.linalg.eigvalsh(M)
        assert eig.abs().min() > 1e-8 * eig.abs().max()  # H + εI itself is fine
        fact = elimination.factorize(oracles, loss, damping)
        assert isinstance(fact, elimination.KKTFactorization), seed
        assert fact.inertia() == ((eig > 0).sum().item(), (eig < 0).sum().item(), 0)
        cond = (eig.abs().max() / eig.abs().min()).item()
        assert abs(fact.logdet().item() - eig.abs().log().sum().item()) <= 1e-9 + 1e-13 * M.shape[0] * cond


def test_singular_system_raises_with_damping():
    """A block whose parameters do not influence the loss makes H singular at ε = 0."""
    oracles, loss = random_problem([(3, 2), (2, 3)], seed=3)
    first = oracles[0]
    oracles[0] = Oracle(G=Dense(torch.zeros(3, 2)), F=first.F, A=Dense(torch.zeros(2, 2), symmetric=True), C=first.C, E=first.E)
    with pytest.raises(SingularSystemError) as info:
        elimination.factorize(oracles, loss, 0.0)
    assert info.value.damping == 0.0
    assert "singular" in str(info.value)
    fact = elimination.factorize(oracles, loss, 1e-2)  # damping makes it regular again
    b = torch.randn(5, 1, generator=torch.Generator().manual_seed(1))
    H = dense_hessian(oracles, loss) + 1e-2 * torch.eye(5)
    torch.testing.assert_close(fact.solve(b), torch.linalg.solve(H, b), rtol=1e-10, atol=1e-12)


def test_first_singular_tests_pivots_of_all_sizes_at_once():
    """Deferred pivot tests: the first factor (in the order given) with a pivot at or
    below ``pivot_tolerance`` — or a non-finite one — is reported; ``None`` if all pass."""
    from tallskinny.elimination.algebra import SymmetricFactor, first_singular

    gen = torch.Generator().manual_seed(0)
    good = [SymmetricFactor.unchecked(_sym(n, gen) + 5 * torch.eye(n)) for n in (2, 3, 3, 5)]
    assert first_singular(list(enumerate(good))) is None
    singular = _sym(3, gen)
    singular[:, 0] = singular[0, :] = 0.0
    nan = _sym(2, gen)
    nan[1, 1] = float("nan")
    items = [(7, good[0]), (6, SymmetricFactor.unchecked(nan)), (5, good[1]), (4, SymmetricFactor.unchecked(singular))]
    assert first_singular(items) == 6  # the order given, not the index
    assert first_singular(items[2:]) == 4
    # relative to max|Q| (tolerance n·eps·max|Q|): 1e-17 beside 1 is zero, alone it is not
    tiny = torch.diag(torch.tensor([1.0, 1e-17]))
    assert first_singular([(0, SymmetricFactor.unchecked(tiny))]) == 0
    assert first_singular([(0, SymmetricFactor.unchecked(1e-17 * torch.eye(2)))]) is None


@pytest.mark.parametrize("stack_bytes", [None, 1])
def test_fill_inertias_counts_every_factor_at_once(stack_bytes, monkeypatch):
    """``fill_inertias``: the inertia of LU factors of several sizes (one batched
    Bunch–Kaufman per size, or per stack of ``FILL_INERTIAS_BYTES``: here also one factor
    a stack), equal to each one's own and to ``eigvalsh``; factors that know theirs
    (Cholesky, ``LDLᵀ``, already filled) are left as they are."""
    from tallskinny.elimination import algebra
    from tallskinny.elimination.algebra import SymmetricFactor, fill_inertias

    if stack_bytes is not None:
        monkeypatch.setattr(algebra, "FILL_INERTIAS_BYTES", stack_bytes)
    gen = torch.Generator().manual_seed(5)
    mats = [_sym(n, gen) + shift * torch.eye(n) for n, shift in ((4, 0.0), (7, 0.5), (4, -1.0), (7, 0.0), (1, -2.0), (4, 0.3))]
    lu = [SymmetricFactor.unchecked(Q) for Q in mats]
    chol = SymmetricFactor.of(_sym(3, gen) + 10 * torch.eye(3))
    ldl = SymmetricFactor.of(_sym(algebra.HALF_SOLVE_MIN_ORDER, gen), half=True)
    known = SymmetricFactor.unchecked(mats[0])
    known._inertia = Inertia(1, 2, 3)  # (a sentinel: must stay)
    fill_inertias(lu + [chol, ldl, known])
    for Q, f in zip(mats, lu):
        eig = torch.linalg.eigvalsh(Q)
        assert f._inertia == Inertia(int((eig > 0).sum()), int((eig < 0).sum()), 0)
        assert f._inertia == SymmetricFactor.unchecked(Q).inertia()
    assert any(f._inertia.negative and f._inertia.positive for f in lu)  # indefinite ones included
    assert chol._inertia == Inertia(3, 0, 0) and ldl._inertia is None and known._inertia == Inertia(1, 2, 3)
    fill_inertias([])


@pytest.mark.parametrize("definite", [True, False])
def test_symmetric_factor_answers_keep_a_row_major_layout(definite):
    """Cholesky and LU solves (LAPACK) leave column-major answers; the sweeps multiply them
    by transposed factors, a product MKL runs 4–10× slower with both operands column-major:
    a row-major right-hand side of several columns gets a row-major answer, equal to the
    dense solve."""
    from tallskinny.elimination.algebra import SymmetricFactor

    gen = torch.Generator().manual_seed(3)
    Q = _sym(40, gen) + (60.0 if definite else 0.0) * torch.eye(40)
    factor = SymmetricFactor.of(Q)
    assert (factor.inertia().negative == 0) == definite
    B = torch.randn(40, 7, generator=gen)
    X = factor.solve(B)
    assert X.is_contiguous()
    torch.testing.assert_close(X, torch.linalg.solve(Q, B), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", ["cholesky", "ldl", "lu", "cholesky_k"])
@pytest.mark.parametrize("n", [40, 300])
def test_symmetric_factor_schur_operands_and_inertia(mode, n, monkeypatch):
    """``schur_operands(B) = (X, Y)`` with ``XᵀY = BᵀQ⁻¹B`` and ``complete(Y x) = Q⁻¹Bx``
    for each factorization — half solves (``half=True``, the order threshold lowered to
    1: Cholesky, or Bunch–Kaufman ``LDLᵀ`` where indefinite) or ``K = Q⁻¹B`` (LU, or
    Cholesky with ``half=False``); ``subtract_schur`` gives ``S − BᵀQ⁻¹B`` symmetric (from
    ``SPLIT_SCHUR_MIN`` on by the upper blocks of a product symmetric by construction);
    the inertia and ``log|det|`` are ``Q``'s, read off ``D`` for ``LDLᵀ``; a singular
    ``Q`` is refused."""
    from tallskinny.elimination import algebra
    from tallskinny.elimination.algebra import SPLIT_SCHUR_MIN, SymmetricFactor, subtract_schur

    monkeypatch.setattr(algebra, "HALF_SOLVE_MIN_ORDER", 1)
    half = mode in ("cholesky", "ldl")
    definite = mode.startswith("cholesky")
    gen = torch.Generator().manual_seed(n)
    Q = _sym(n, gen) + (3.0 * n if definite else 0.0) * torch.eye(n)
    factor = SymmetricFactor.of(Q, half=half)
    assert (factor._chol is not None, factor._ldl is not None, factor._lu is not None) == (
        definite, mode == "ldl", mode == "lu")
    assert factor.symmetric_schur == half
    B = torch.randn(n, 33, generator=gen)
    K = torch.linalg.solve(Q, B)
    X, Y = factor.schur_operands(B)
    cond = float(torch.linalg.cond(Q))
    tol = 1e-14 * cond
    assert float((X.mT @ Y - B.mT @ K).norm() / (B.mT @ K).norm()) <= tol
    x = torch.randn(33, 2, generator=gen)
    assert float((factor.complete(Y @ x) - K @ x).norm() / (K @ x).norm()) <= tol
    assert float((factor.solve(B) - K).norm() / K.norm()) <= tol
    S = _sym(33, gen)
    expected = S - B.mT @ K
    got = subtract_schur(S.clone(), X, Y, factor.symmetric_schur)
    assert torch.equal(got, got.mT)
    assert float((got - expected).norm() / expected.norm()) <= tol
    S_big = _sym(SPLIT_SCHUR_MIN + 3, gen)
    B_big = torch.randn(n, SPLIT_SCHUR_MIN + 3, generator=gen)
    X, Y = factor.schur_operands(B_big)
    got = subtract_schur(S_big.clone(), X, Y, factor.symmetric_schur)
    expected = S_big - B_big.mT @ torch.linalg.solve(Q, B_big)
    assert torch.equal(got, got.mT) and float((got - expected).norm() / expected.norm()) <= tol
    eig = torch.linalg.eigvalsh(Q)
    assert factor.inertia() == Inertia(int((eig > 0).sum()), int((eig < 0).sum()), 0)
    torch.testing.assert_close(factor.logdet(), eig.abs().log().sum(), rtol=1e-12, atol=1e-10)
    singular = Q.clone()
    singular[:, 1] = singular[1, :] = 0.0  # an exactly zero pivot (LAPACK's info > 0 for LDLᵀ)
    assert SymmetricFactor.of(singular, half=half) is None
    # a pivot below the tolerance without an exact zero (a diagonal matrix: its pivots are
    # its entries whatever the rounding): refused
    tiny = torch.tensor([1.0, 2.0, 1e-20, 3.0] if definite else [1.0, -2.0, 1e-20, 3.0])
    assert SymmetricFactor.of(torch.diag(tiny), half=half) is None
    assert SymmetricFactor.of(torch.diag(tiny + torch.tensor([0.0, 0.0, 1e-3, 0.0])), half=half) is not None
    if not definite:  # the scale is max|Q|, here a negative entry: 1e-12 is below 4·eps·1e4
        assert SymmetricFactor.of(torch.diag(torch.tensor([-1e4, 2.0, 1e-12, 3.0])), half=half) is None
        assert SymmetricFactor.of(torch.diag(torch.tensor([-1e2, 2.0, 1e-12, 3.0])), half=half) is not None


@pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")
def test_half_solves_take_lu_below_their_order_under_autograd_and_solve_vectors(monkeypatch):
    """``half=True`` takes Bunch–Kaufman ``LDLᵀ`` for an indefinite ``Q`` from
    ``HALF_SOLVE_MIN_ORDER`` on only, and not for a ``Q`` that requires grad (the
    conversion runs on the host): LU and ``K = Q⁻¹B`` there; a 1-D right-hand side is
    solved as a vector, as by LU."""
    from tallskinny.elimination import algebra
    from tallskinny.elimination.algebra import HALF_SOLVE_MIN_ORDER, SymmetricFactor

    gen = torch.Generator().manual_seed(9)
    small = SymmetricFactor.of(_sym(HALF_SOLVE_MIN_ORDER - 1, gen), half=True)
    assert small._lu is not None and not small.symmetric_schur
    assert SymmetricFactor.of(_sym(HALF_SOLVE_MIN_ORDER, gen), half=True)._ldl is not None
    monkeypatch.setattr(algebra, "HALF_SOLVE_MIN_ORDER", 1)
    Q = _sym(6, gen)
    b = torch.randn(6, generator=gen)
    ldl = SymmetricFactor.of(Q, half=True)
    assert ldl._ldl is not None
    x = ldl.solve(b)
    assert x.shape == (6,)
    torch.testing.assert_close(x, torch.linalg.solve(Q, b), rtol=1e-12, atol=1e-12)
    tracked = SymmetricFactor.of(Q.clone().requires_grad_(), half=True)
    assert tracked._ldl is None and tracked._lu is not None and not tracked.symmetric_schur
    definite = Q + 10 * torch.eye(6)
    for chol in (SymmetricFactor.of(definite, half=True), SymmetricFactor.of(definite)):
        assert chol._chol is not None
        torch.testing.assert_close(chol.solve(b), torch.linalg.solve(definite, b), rtol=1e-12, atol=1e-12)


class _Stage(Stage):
    """A stand-in stage: returns a given factor record, or raises."""

    p = 1

    def __init__(self, factor=None, error=None):
        self.factor, self.error = factor, error

    def eliminate(self, S, damping, index):
        if self.error is not None:
            raise self.error
        return S, self.factor


class _Record(StageFactor):
    def __init__(self, factor):
        self.unchecked = factor


def test_riccati_reports_the_first_unnoticed_singular_stage():
    """A stage whose pivot is singular is only found after the sweep; if a later stage
    then fails on the infs/NaNs it produced, the singular stage is still the one named
    (and a failure with every pivot sound is passed on as it is)."""
    from tallskinny.elimination.algebra import SymmetricFactor

    loss = Oracle(G=Zero(2, 0), F=Dense(torch.eye(2)), A=Zero(0, 0), C=Zero(0, 2), E=Dense(torch.eye(2)))
    fine = _Record(SymmetricFactor.unchecked(torch.eye(2)))
    bad = _Record(SymmetricFactor.unchecked(torch.zeros(2, 2)))
    with pytest.raises(StageSingular) as info:
        RiccatiFactorization([_Stage(fine), _Stage(bad), _Stage(fine)], loss, 0.1)
    assert info.value.stage == 1
    failing = _Stage(error=RuntimeError("linalg.eigh: failed to converge"))
    with pytest.raises(StageSingular) as info:
        RiccatiFactorization([failing, _Stage(bad), _Stage(fine)], loss, 0.1)
    assert info.value.stage == 1
    with pytest.raises(RuntimeError, match="converge"):
        RiccatiFactorization([failing, _Stage(fine)], loss, 0.1)


def test_scaled_identity_is_cached_only_when_small():
    from tallskinny.elimination.algebra import scaled_identity

    small = scaled_identity(4, 0.5, torch.float64, torch.device("cpu"))
    assert torch.equal(small, 0.5 * torch.eye(4)) and small is scaled_identity(4, 0.5, torch.float64, torch.device("cpu"))
    big = scaled_identity(300, 0.25, torch.float64, torch.device("cpu"))
    assert torch.equal(big, 0.25 * torch.eye(300)) and big is not scaled_identity(300, 0.25, torch.float64, torch.device("cpu"))


@pytest.mark.parametrize("n", [100, 600, 1031])
def test_symmetric_schur_update(n):
    """``S − QᵀK`` for ``K = P⁻¹Q`` (``P`` symmetric), symmetrised (in a pooled buffer
    where large): exactly symmetric, equal to ``(M + Mᵀ)/2`` of the full product."""
    from tallskinny.elimination.algebra import subtract_symmetric_product

    gen = torch.Generator().manual_seed(n)
    S = torch.randn(n, n, generator=gen, dtype=torch.float64)
    S = S + S.mT
    P = torch.randn(n, n, generator=gen, dtype=torch.float64)
    P = P + P.mT + 2 * n**0.5 * torch.eye(n, dtype=torch.float64)
    Q = torch.randn(n, n, generator=gen, dtype=torch.float64)
    K = torch.linalg.solve(P, Q)
    full = S - Q.mT @ K
    expected = (full + full.mT) / 2
    result = subtract_symmetric_product(S.clone(), Q, K)
    assert torch.equal(result, result.mT)
    assert ((result - expected).norm() / expected.norm()).item() <= 1e-13


def test_large_indefinite_stages_solve_through_row_major_lu(monkeypatch):
    """Stages of B·h = 128 ≥ ``linalg.lu.ROW_MAJOR_MIN``, indefinite pivots (shift inside
    the spectrum): the elimination's LU solves take the row-major path, and the solve,
    the inertia and the log-determinant equal dense ones."""
    from torch import nn

    import tallskinny as ts
    import tallskinny.linalg.lu as lu
    from tallskinny.testing import dense_hessian

    used = []
    solve = lu.LUFactors.solve
    monkeypatch.setattr(
        lu.LUFactors, "solve", lambda self, B: used.append(self.row_major_pays(B.shape[-1] if B.dim() > 1 else 1)) or solve(self, B)
    )
    torch.manual_seed(0)
    modules = [nn.Linear(8, 32).double(), nn.Tanh(), nn.Linear(32, 32).double(), nn.Tanh(), nn.Linear(32, 3).double()]
    chain = ts.Chain(modules, nn.CrossEntropyLoss())
    X, y = torch.randn(4, 8, dtype=torch.float64), torch.tensor([0, 1, 2, 1])
    H = dense_hessian(chain, X, y)
    sigma = 0.05 * float(torch.linalg.eigvalsh(H).abs().max())
    F = chain.curvature(X, y).factorize(shift=sigma)
    b = torch.randn(H.shape[0], 2, dtype=torch.float64)
    M = H - sigma * torch.eye(H.shape[0], dtype=torch.float64)
    x = F.solve(b)
    assert any(used)
    assert float((M @ x - b).norm() / (torch.linalg.matrix_norm(M, 2) * x.norm())) <= 64 * torch.finfo(torch.float64).eps
    bare = F.solve(b, refine=0)  # the two sweeps alone, no refinement to hide a wrong factor
    assert float((M @ bare - b).norm() / (torch.linalg.matrix_norm(M, 2) * bare.norm())) <= 1e-13
    ev = torch.linalg.eigvalsh(M)
    assert F.inertia().negative == int((ev < 0).sum())
    assert abs(float(F.logdet()) - float(ev.abs().log().sum())) <= 1e-9 * abs(float(ev.abs().log().sum()))
