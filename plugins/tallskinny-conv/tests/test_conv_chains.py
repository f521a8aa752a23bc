"""Chains with convolutions and pooling: HVP, solves, log|det| and inertia of H + εI
against the dense Hessian of the plain PyTorch loss (float64, batches 1–4)."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

import tallskinny as ts
from tallskinny.testing import check_chain, dense_hessian
from tallskinny.testing import relative_error as rel


def check_against_dense(chain, X, y, damping, *, gen, k=2, tol=1e-9):
    H = check_chain(chain, X, y, damping, generator=gen, k=k, rtol=tol)
    eig = torch.linalg.eigvalsh(H + damping * torch.eye(H.shape[0], dtype=H.dtype))
    return H, ((eig > 0).sum().item(), (eig < 0).sum().item(), 0)
from tallskinny_conv.conv import ConvBlock


def small_cnn():
    """Conv2d → ReLU → Conv2d → ReLU → Flatten → Linear (P = 193)."""
    return [nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 3, 3, stride=2), nn.ReLU(), nn.Flatten(),
            nn.Linear(12, 4)]


def pooling_cnn():
    """Grouped conv, max and average pooling, a Conv1d-free 2-D path with tanh (P = 127)."""
    return [nn.Conv2d(2, 4, 3, padding=1, groups=2), nn.Tanh(), nn.MaxPool2d(2), nn.Conv2d(4, 3, 2, padding=1),
            nn.Softplus(), nn.AvgPool2d(2, ceil_mode=True), nn.Flatten(), nn.Linear(12, 3)]


def conv1d_net():
    return [nn.Conv1d(2, 3, 3, padding="same", padding_mode="circular"), nn.SiLU(), nn.Conv1d(3, 2, 2, stride=2),
            nn.Flatten(), nn.Linear(6, 3)]


NETS = {"small_cnn": (small_cnn, (2, 5, 5)), "pooling_cnn": (pooling_cnn, (2, 6, 6)), "conv1d": (conv1d_net, (2, 6))}


@pytest.mark.parametrize("batch", [1, 2, 4])
@pytest.mark.parametrize("name", NETS)
def test_conv_chain_matches_dense(name, batch):
    torch.manual_seed(batch)
    make, shape = NETS[name]
    chain = ts.Chain(make(), nn.CrossEntropyLoss())
    assert any(isinstance(b, ConvBlock) for b in chain.blocks)
    gen = torch.Generator().manual_seed(batch)
    X = torch.randn(batch, *shape, generator=gen)
    y = torch.randint(0, 3, (batch,), generator=gen)
    negatives = 0
    for damping in (1e-3, 0.1):
        _, inertia = check_against_dense(chain, X, y, damping, gen=gen)
        negatives += inertia[1]
    assert negatives > 0  # indefinite cases included


def test_small_cnn_inverse_hvp_and_fallback_agree():
    """The analytic chain and the same modules through the torch.func fallback give the same solve."""
    torch.manual_seed(0)
    modules = small_cnn()
    X, y = torch.randn(3, 2, 5, 5), torch.tensor([0, 3, 1])
    analytic = ts.Chain(modules, nn.CrossEntropyLoss())
    fallback = ts.Chain([ts.blocks.FuncBlock(m) if isinstance(m, nn.Conv2d) else m for m in modules],
                        nn.CrossEntropyLoss())
    b = torch.randn(sum(p.numel() for p in analytic.parameters()))
    H = dense_hessian(analytic, X, y)
    x = analytic.inverse_hvp(X, y, b, damping=1e-2)
    expected = torch.linalg.solve(H + 1e-2 * torch.eye(H.shape[0]), b)
    assert rel(x, expected) <= 1e-9
    assert rel(fallback.inverse_hvp(X, y, b, damping=1e-2), x) <= 1e-9


def test_conv_chain_ggn():
    torch.manual_seed(1)
    chain = ts.Chain(small_cnn(), nn.CrossEntropyLoss())
    X, y = torch.randn(2, 2, 5, 5), torch.tensor([1, 2])
    curv = chain.curvature(X, y, kind="ggn")
    params = list(chain.parameters())
    sizes = [p.numel() for p in params]

    def outputs(theta):
        pieces = iter(t.reshape(p.shape) for t, p in zip(theta.split(sizes), params))
        z = X
        for m in chain.modules:
            names = [n for n, _ in m.named_parameters()]
            z = torch.func.functional_call(m, {n: next(pieces) for n in names}, (z,))
        return z

    theta0 = torch.cat([p.detach().reshape(-1) for p in params])
    J = torch.func.jacrev(outputs)(theta0).reshape(-1, theta0.numel())
    z = outputs(theta0).detach()
    Hl = torch.func.jacrev(torch.func.grad(lambda zz: chain.loss(zz.reshape(z.shape), y)))(z.reshape(-1))
    GGN = J.mT @ Hl @ J
    M = GGN + 1e-3 * torch.eye(GGN.shape[0])
    V = torch.randn(GGN.shape[0], 2)
    assert rel(curv.hvp(V), GGN @ V) <= 1e-11
    assert rel(curv.factorize(1e-3).solve(V), torch.linalg.solve(M, V)) <= 1e-9


def test_conv_chain_float32():
    """float32 solves agree with float64 ones to about 1e-3 where H + εI is well conditioned."""
    torch.manual_seed(2)
    modules = pooling_cnn()
    X, y = torch.randn(2, 2, 6, 6), torch.tensor([0, 2])
    b = torch.randn(sum(p.numel() for p in ts.Chain(modules, nn.CrossEntropyLoss()).parameters()))
    x64 = ts.Chain(modules, nn.CrossEntropyLoss()).inverse_hvp(X, y, b, damping=1.0)
    modules32 = [m.float() for m in modules]
    x32 = ts.Chain(modules32, nn.CrossEntropyLoss()).inverse_hvp(X.float(), y, b.float(), damping=1.0)
    assert x32.dtype == torch.float32
    assert rel(x32.double(), x64) <= 1e-4


@pytest.mark.parametrize("damping", [1e-6, 1e-2])
@pytest.mark.parametrize("batch", [1, 2])
def test_convolutions_are_eliminated_as_affine_stages(damping, batch):
    """A convolution (groups = 1) is affine in its parameters: the solver eliminates it as
    an affine stage (its C, which ends with the unfold of the input, read densely), not
    as a generic dense stage, and the solve stays exact at small damping. At one sample
    its output is channel-major, and its span stage needs no permutations."""
    from tallskinny.testing import AffineStage, ReducedAffineStage, stages as engine_stages

    torch.manual_seed(0)
    chain = ts.Chain([nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 2, 2), nn.Tanh(), nn.Flatten(),
                      nn.Linear(32, 3)], nn.CrossEntropyLoss())
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(batch, 2, 5, 5, generator=gen)
    y = torch.randint(0, 3, (batch,), generator=gen)
    curv = chain.curvature(X, y)
    stages = engine_stages(curv)
    conv_stages = [s for s, b in zip(stages, chain.blocks) if isinstance(b, ConvBlock)]
    assert conv_stages and all(isinstance(s, (AffineStage, ReducedAffineStage)) for s in conv_stages)
    assert all(s.C_span is not None for s in conv_stages)  # the general-C path
    reduced = [s for s in conv_stages if isinstance(s, ReducedAffineStage)]
    assert reduced and all(s.channel_major == (batch == 1) for s in reduced)
    check_against_dense(chain, X, y, damping, gen=gen)


@pytest.mark.parametrize("damping", [1e-6, 1e-2])
def test_dead_relu_units_split_the_span_channel_by_channel(damping, monkeypatch):
    """A convolution at one sample followed by a ReLU is a dense stage on ``vec Θ̃`` (a
    :class:`PermutedStage`): its ``G = I_m ⊗ X̃`` with the dead units' rows dropped is block
    diagonal, so its SVD is taken channel by channel (small SVDs instead of one of size
    ``m·R × m·q``), the rest of each channel's parameters has pivots ``ε`` exactly, and the
    products of a damping run on the live outputs and, after a ReLU, the live inputs only.
    Same ranks as the span stage of the affine block with the dense SVD of its masked
    span, the same solves, and exact against dense references."""
    from tallskinny.testing import PermutedStage, ReducedAffineStage, Supported, plain_dense_stages, stages as engine_stages

    def dense(S):
        return S.dense() if isinstance(S, Supported) else S

    torch.manual_seed(2)
    chain = ts.Chain([nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 3, 3, padding=1), nn.ReLU(),
                      nn.Flatten(), nn.Linear(75, 3)], nn.CrossEntropyLoss())
    gen = torch.Generator().manual_seed(3)
    X, y = torch.randn(1, 2, 5, 5, generator=gen), torch.tensor([1])
    curv = chain.curvature(X, y)
    inner = [s.inner for s in engine_stages(curv) if isinstance(s, PermutedStage)]
    assert len(inner) == 2 and all(st.V is not None and st.r < st.p for st in inner)  # dead units dropped
    for st in inner:  # each basis vector lies in one channel's block, exactly
        channels = (st.V.reshape(3, -1, st.r) != 0).any(dim=1)  # m = 3 output channels
        assert (channels.sum(dim=0) == 1).all()
    lo, li = inner[1].live[:2]  # the second convolution: dead units on both sides
    assert lo.numel() < inner[1].GV.shape[0] and li.numel() < inner[1].F.shape[1]
    for st in inner:  # G_V on the live rows by channel blocks = the dense G_V there
        assert isinstance(st.live[3], list)
        a_out = st.F.shape[0]
        S = torch.randn(a_out, a_out, generator=gen, dtype=st.GV.dtype)
        S = S + S.mT
        S_blocks, f_blocks = st.eliminate(S.clone(), damping, 0)
        live = st.live
        st.live = live[:3] + (st.GV.index_select(0, live[0]),) + live[4:]
        S_dense, f_dense = st.eliminate(S.clone(), damping, 0)
        st.live = live
        tol = 1e-5 if S.dtype == torch.float32 else 1e-12
        K_blocks, K_dense = (f.factor.complete(f.Y_r) for f in (f_blocks, f_dense))  # Q_θθ⁻¹Q_θy
        for got, want in ((dense(S_blocks), dense(S_dense)), (f_blocks.Q_ry, f_dense.Q_ry), (K_blocks, K_dense)):
            assert rel(got, want) <= tol
    b = torch.randn(curv.num_parameters, generator=gen)
    fact = curv.factorize(damping)
    x = fact.solve(b)
    with plain_dense_stages():  # the affine span stage, the dense SVD of its whole masked span
        dense_curv = chain.curvature(X, y)
        dense_inner = [s.inner for s in engine_stages(dense_curv) if isinstance(s, ReducedAffineStage) and s.channel_major]
        assert [st.r for st in dense_inner] == [st.r for st in inner]
        dense_fact = dense_curv.factorize(damping)
        x_dense_svd = dense_fact.solve(b)
    assert rel(x, x_dense_svd) <= 1e-10
    # log|det| and inertia are read off the factors without refinement: the elimination itself agrees
    assert abs(float(fact.logdet()) - float(dense_fact.logdet())) <= 1e-10 * abs(float(dense_fact.logdet()))
    assert fact.inertia() == dense_fact.inertia()
    check_against_dense(chain, X, y, damping, gen=gen)


def test_the_value_hessian_passes_the_relus_on_its_support(monkeypatch):
    """The dense stage of the second convolution hands the ReLU before it its value
    Hessian on the live units only (a ``Supported``), and the first convolution's stage
    reads it there: never embedded in zeros. The answers equal those of the same
    elimination reading the embedded matrix, and dense references."""
    from tallskinny.testing import Supported

    torch.manual_seed(2)
    chain = ts.Chain([nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 3, 3, padding=1), nn.ReLU(),
                      nn.Flatten(), nn.Linear(75, 3)], nn.CrossEntropyLoss())
    gen = torch.Generator().manual_seed(3)
    X, y = torch.randn(1, 2, 5, 5, generator=gen), torch.tensor([1])
    embedded, read = [], []
    to_dense, block = Supported.dense, Supported.block
    monkeypatch.setattr(Supported, "dense", lambda self: embedded.append(self.n) or to_dense(self))
    monkeypatch.setattr(Supported, "block", lambda self, index: read.append(index.shape[0]) or block(self, index))
    curv = chain.curvature(X, y)
    b = torch.randn(curv.num_parameters, generator=gen)
    x = curv.factorize(1e-3).solve(b)
    assert read and not embedded and 0 < read[0] < 75
    monkeypatch.setattr(Supported, "block", lambda self, index: to_dense(self)[index.unsqueeze(1), index])
    x_embedded = chain.curvature(X, y).factorize(1e-3).solve(b)
    assert rel(x, x_embedded) <= 1e-12
    check_against_dense(chain, X, y, 1e-3, gen=gen)


def test_dead_channels_and_a_dead_convolution():
    """A channel whose units are all dead, and a convolution with no live unit at all
    (an empty span): exact against dense references."""
    torch.manual_seed(0)
    c1, c2 = nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(3, 3, 3, padding=1)
    with torch.no_grad():
        c1.bias[1] = -100.0  # channel 1 of the first convolution: all dead
        c2.bias[:] = -100.0  # every unit of the second dead
    chain = ts.Chain([c1, nn.ReLU(), c2, nn.ReLU(), nn.Flatten(), nn.Linear(75, 3)], nn.CrossEntropyLoss())
    X, y = torch.randn(1, 2, 5, 5), torch.tensor([1])
    from tallskinny.testing import stages

    assert stages(chain.curvature(X, y))[2].inner.r == 0
    gen = torch.Generator().manual_seed(0)
    for damping in (1e-3, 1.0):
        check_against_dense(chain, X, y, damping, gen=gen)


def two_relu_convs():
    """Two convolutions at one sample between ReLUs (spans split by channel, live
    products, the value Hessian on its support, the complement inside the span stage)."""
    return [nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 3, 3, padding=1), nn.ReLU(), nn.Flatten(),
            nn.Linear(75, 3)]


def two_tanh_convs():
    """The same with tanh (no dead units: the span stage of a convolution with its
    complement inside)."""
    return [nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 3, 3, padding=1), nn.Tanh(), nn.Flatten(),
            nn.Linear(75, 3)]


def relu_convs_variants():
    """Bias-free, frozen-bias and Conv1d convolutions between ReLUs."""
    frozen = nn.Conv2d(3, 3, 3, padding=1)
    frozen.bias.requires_grad_(False)
    return [nn.Conv2d(2, 3, 3, padding=1, bias=False), nn.ReLU(), frozen, nn.ReLU(), nn.Flatten(), nn.Linear(75, 3)]


def relu_conv1d():
    return [nn.Conv1d(2, 3, 3, padding=1, padding_mode="circular"), nn.ReLU(), nn.Conv1d(3, 4, 3, padding=1, bias=False),
            nn.ReLU(), nn.Flatten(), nn.Linear(24, 3)]


UNREFINED = {"two_relu_convs": (two_relu_convs, (2, 5, 5)), "two_tanh_convs": (two_tanh_convs, (2, 5, 5)),
             "relu_convs_variants": (relu_convs_variants, (2, 5, 5)), "relu_conv1d": (relu_conv1d, (2, 6))}


@pytest.mark.parametrize("name", UNREFINED)
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("damping", [1e-2, -0.05])
@pytest.mark.parametrize("wide", [False, True])
def test_the_unrefined_elimination_equals_dense_solves(name, batch, damping, wide, monkeypatch):
    """``solve(b, refine=0)``: the elimination alone, which refinement and the pivoted KKT
    fallback of ``logdet`` would otherwise correct or replace, so that a wrong stage
    (a complement's Gram, a value Hessian on its support, a span basis, the coordinates
    of a stage on ``vec Θ̃``) shows here. float64; a shift (negative damping) too. With
    ``wide`` (``testing.large_stage_paths`` and ``SHIFTED_MIN_PATCHES`` lowered to 1) the
    sweeps take the wide thin products at every stage, the dense stages form their
    Schur complements by the upper blocks and the stride-1 convolutions take their
    shifted products on every block of columns, as the bench's 512-row stages do."""
    from tallskinny.testing import large_stage_paths
    from tallskinny_conv import shifted

    if wide:
        monkeypatch.setattr(shifted, "SHIFTED_MIN_PATCHES", 1)
    make, shape = UNREFINED[name]
    torch.manual_seed(11)
    chain = ts.Chain([m.double() for m in make()], nn.CrossEntropyLoss())
    gen = torch.Generator().manual_seed(12)
    X, y = torch.randn(batch, *shape, generator=gen, dtype=torch.float64), torch.arange(batch) % 3
    H = dense_hessian(chain, X, y)
    M = H + damping * torch.eye(H.shape[0], dtype=H.dtype)
    b = torch.randn(H.shape[0], 2, generator=gen, dtype=torch.float64)
    expected = torch.linalg.solve(M, b)
    with large_stage_paths() if wide else contextlib.nullcontext():
        curv = chain.curvature(X, y)
        fact = curv.factorize(damping) if damping > 0 else curv.factorize(shift=-damping)  # H − σI
        x = fact.solve(b, refine=0)
    cond = float(torch.linalg.cond(M))
    assert rel(x, expected) <= 1e-13 * cond, (rel(x, expected), cond)


def test_a_convolution_between_relus_is_a_stage_on_its_weights_only_where_it_pays():
    """A convolution at one sample followed by dead ReLU units is eliminated as a dense
    stage on ``vec Θ̃`` (``PermutedStage``) where ``C ≠ 0`` and its patches ``X̃`` have at
    most twice as many columns as rows; otherwise (the Gauss–Newton matrix, ``C = 0``;
    many channels on a small image) as an affine span stage, which carries only the span
    densely. Both exact."""
    from tallskinny.testing import PermutedStage, ReducedAffineStage, stages as engine_stages

    torch.manual_seed(11)
    gen = torch.Generator().manual_seed(12)
    chain = ts.Chain([m.double() for m in two_relu_convs()], nn.CrossEntropyLoss())
    X, y = torch.randn(1, 2, 5, 5, generator=gen, dtype=torch.float64), torch.tensor([1])
    kinds = [type(s) for s in engine_stages(chain.curvature(X, y))[:3:2]]
    assert kinds == [PermutedStage, PermutedStage]
    ggn = chain.curvature(X, y, kind="ggn", method="riccati")
    assert [type(s) for s in engine_stages(ggn)[:3:2]] == [ReducedAffineStage, ReducedAffineStage]
    wide = ts.Chain([nn.Conv2d(16, 3, 3, padding=1).double(), nn.ReLU(), nn.Conv2d(3, 3, 3, padding=1).double(),
                     nn.ReLU(), nn.Flatten(), nn.Linear(12, 3).double()], nn.CrossEntropyLoss())
    Xw = torch.randn(1, 16, 2, 2, generator=gen, dtype=torch.float64)  # first conv: R = 4, q = 145
    assert type(engine_stages(wide.curvature(Xw, y))[0]) is ReducedAffineStage
    for c, Xc in ((ggn, X), (wide.curvature(Xw, y), Xw)):
        M = c.to_dense() + 1e-2 * torch.eye(c.num_parameters, dtype=torch.float64)
        b = torch.randn(c.num_parameters, generator=gen, dtype=torch.float64)
        x = c.factorize(1e-2).solve(b, refine=0)
        assert rel(x, torch.linalg.solve(M, b)) <= 1e-13 * float(torch.linalg.cond(M))


@pytest.mark.parametrize("shift", [False, True])
def test_a_large_convolution_stage_takes_the_half_solves_by_default(shift, monkeypatch):
    """A convolution whose span pivot reaches the engine's order for half solves (384; 8
    channels on 7 × 7: order 392) with the default thresholds: its Schur complement goes
    through Bunch–Kaufman ``LDLᵀ`` (a ``torch.linalg.ldl_factor_ex`` of that order during
    the factorization) and the split Schur product, and the unrefined solve,
    ``log|det|`` and inertia equal the dense Hessian's (a shift inside the spectrum too)."""
    calls = []
    ldl_factor_ex = torch.linalg.ldl_factor_ex
    monkeypatch.setattr(torch.linalg, "ldl_factor_ex", lambda A, *a, **k: calls.append(A.shape[-1]) or ldl_factor_ex(A, *a, **k))
    torch.manual_seed(5)
    chain = ts.Chain([nn.Conv2d(8, 8, 3, padding=1).double(), nn.Tanh(), nn.Flatten(), nn.Linear(392, 3).double()],
                     nn.CrossEntropyLoss())
    gen = torch.Generator().manual_seed(6)
    X, y = torch.randn(1, 8, 7, 7, generator=gen, dtype=torch.float64), torch.tensor([1])
    H = dense_hessian(chain, X, y)
    eig = torch.linalg.eigvalsh(H)
    # a shift between the 10th and 11th largest eigenvalues (H − σI indefinite, away from
    # the parameter blocks' null space at 0)
    damping = -float(eig[-10] + eig[-11]) / 2 if shift else 1e-3
    M = H + damping * torch.eye(H.shape[0], dtype=H.dtype)
    b = torch.randn(H.shape[0], 3, generator=gen, dtype=torch.float64)
    curv = chain.curvature(X, y)
    fact = curv.factorize(damping) if damping > 0 else curv.factorize(shift=-damping)
    x = fact.solve(b, refine=0)
    assert 392 in calls  # (before any inertia is asked for)
    assert rel(x, torch.linalg.solve(M, b)) <= 1e-13 * float(torch.linalg.cond(M))
    shifted_eig = eig + damping
    assert fact.inertia() == ts.Inertia(int((shifted_eig > 0).sum()), int((shifted_eig < 0).sum()), 0)
    assert abs(float(fact.logdet()) - float(shifted_eig.abs().log().sum())) <= 1e-9 * abs(float(shifted_eig.abs().log().sum()))
