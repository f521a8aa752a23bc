"""Random chains over every built-in block and both plugins, checked against dense references.

``make_case(seed)`` draws one chain (depth 1–10, widths 1–12 that grow and shrink, ``bias``
on and off, one-output heads, batch 1–6, convolutions and pooling, residual units,
``torch.func`` fallback modules, LayerNorm; cross-entropy with and without label
smoothing, MSE, both reductions), a ``kind``, a damping in ``1e-8 … 1e3`` and a route
(``method``: ``auto``, ``riccati``, ``dense`` and, for the Gauss–Newton matrix, ``kernel``).
``make_run_case(seed)`` draws chains with runs of square layers at batch 1 (the batched
elimination of :mod:`tallskinny.elimination.runs`), biases on, off and mixed.
``check_case(case)`` computes every quantity with tallskinny and with dense
``torch.func`` + ``torch.linalg`` references in float64 and returns a :class:`Report`
of the errors measured against the documented accuracy (``docs/chain.md``, "Accuracy");
one seed in four with the paths of large stages at every stage (:func:`wide_sweeps`).

The contract checked (``Report.failures``):

* products (``hvp``, ``gradient``) normwise to ``1e-10``: ``‖Hv − H_ref v‖ ≤ 1e-10·‖H‖·‖v‖``;
* ``solve``/``inverse_hvp``: normwise backward error ``‖b − (H+εI)x‖ / (‖H+εI‖‖x‖ + ‖b‖)
  ≤ 64·eps`` (plus the products' own disagreement with the reference, ``‖ΔH‖/‖H+εI‖``)
  and relative error ``≤ max(1e-9, 64·eps·cond)``, or an ``AccuracyWarning``;
* ``logdet``: error ``≤ 1e-9·max(1, |logdet|) + 1e-13·P·cond`` or an ``AccuracyWarning``;
* ``sign`` and ``inertia``: exact whenever ``min|λ| > 1e-8·max|λ|`` of ``H + εI`` (float32:
  ``min|λ| > (1e4·eps + η)·max|λ|``, ``η`` its model's distance from the float64 Hessian);
* ``SingularSystemError`` only where ``min|λ| ≤ SINGULAR_RATIO·eps·max|λ|``.

float32 chains are compared with the float64 references of the same model; their
tolerances scale with float32's ``eps``, and a product may be as far from the reference as
``torch.func``'s Hessian of the same float32 model is (times 10).
"""

from __future__ import annotations

import contextlib
import copy
import math
import random
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

import tallskinny as ts
from tallskinny.testing import dense_ggn, dense_gradient, dense_hessian, large_stage_paths

try:  # the plugins are installed in CI; the fuzzer covers them where present
    from tallskinny_residual import Residual
except ImportError:  # pragma: no cover
    Residual = None
try:
    import tallskinny_conv  # noqa: F401
    from tallskinny_conv import shifted

    HAVE_CONV = True
except ImportError:  # pragma: no cover
    HAVE_CONV = False
    shifted = None


INERTIA_RATIO = 1e-8
"""Inertia (and sign) must be exact where ``min|λ| > INERTIA_RATIO·max|λ|`` (float64)."""

INERTIA_RATIO_LOW = 1e4
"""float32: where ``min|λ| > (INERTIA_RATIO_LOW·eps + η)·max|λ|``, with ``η`` the float32
model's own distance from the float64 Hessian or its products' (its eigenvalues move by up
to that)."""

SINGULAR_RATIO = 10.0
"""A ``SingularSystemError`` is a right verdict only where ``H + εI`` is singular to working
precision: ``min|λ| ≤ SINGULAR_RATIO·eps·max|λ|`` (``eps`` of the chain's dtype)."""


# -- modules ------------------------------------------------------------------------------------
class ScaledSine(nn.Module):
    """An unregistered module (the ``torch.func`` fallback): ``a ⊙ sin(x) + x``."""

    def __init__(self, width: int, gen: torch.Generator):
        super().__init__()
        self.a = nn.Parameter(torch.randn(width, generator=gen))

    def forward(self, x):
        return self.a * torch.sin(x) + x


class BatchMix(nn.Module):
    """An unregistered, parameter-free module whose samples interact."""

    def forward(self, x):
        return torch.tanh(x - 0.5 * x.mean(dim=0, keepdim=True))


def _activation(rng: random.Random) -> nn.Module:
    choice = rng.choice(["tanh", "relu", "sigmoid", "softplus", "silu", "gelu", "gelu_tanh", "identity"])
    return {
        "tanh": nn.Tanh,
        "relu": nn.ReLU,
        "sigmoid": nn.Sigmoid,
        "softplus": lambda: nn.Softplus(beta=rng.choice([1.0, 2.0]), threshold=rng.choice([1.0, 20.0])),
        "silu": nn.SiLU,
        "gelu": nn.GELU,
        "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
        "identity": nn.Identity,
    }[choice]()


def _width(rng: random.Random, previous: int) -> int:
    """Widths 1–12 that grow and shrink (a third of the time kept)."""
    if rng.random() < 0.33:
        return previous
    return rng.randint(1, 12)


def _linear(rng, n_in, n_out):
    return nn.Linear(n_in, n_out, bias=rng.random() < 0.6)


def _dense_body(rng, gen, d_in: int, depth: int) -> tuple[list, int]:
    """Modules on ``(B, width)`` features: Linear, activations, LayerNorm, residual units,
    fallback modules; returns the modules and the width after them."""
    modules, w = [], d_in
    while len(modules) < depth:
        r = rng.random()
        if r < 0.4:
            w_new = _width(rng, w)
            modules.append(_linear(rng, w, w_new))
            w = w_new
        elif r < 0.7:
            modules.append(_activation(rng))
        elif r < 0.78:
            affine = rng.random() < 0.7
            modules.append(nn.LayerNorm(w, elementwise_affine=affine, bias=affine and rng.random() < 0.7))
        elif r < 0.9 and Residual is not None:
            inner = [_linear(rng, w, w), _activation(rng)]
            if rng.random() < 0.5:
                inner = inner[::-1]
            shortcut = _linear(rng, w, w) if rng.random() < 0.3 else None
            modules.append(Residual(inner, shortcut))
        elif r < 0.93:
            modules.append(ScaledSine(w, gen))
        elif r < 0.95:
            modules.append(nn.Dropout(rng.choice([0.0, 0.3])).eval())
        else:
            modules.append(BatchMix())
    return modules, w


def _conv_body(rng, gen, channels: int, length: int, two_d: bool, depth: int) -> tuple[list, int]:
    """Conv1d/Conv2d, pooling and activations on ``(B, C, L)`` / ``(B, C, L, L)``; ends with
    ``Flatten``; returns the modules and the number of features after them."""
    modules, c, size = [], channels, length
    while len(modules) < depth:
        r = rng.random()
        if r < 0.45:
            c_new = rng.randint(1, 3)
            k = rng.randint(1, min(3, size + 2))
            padding = rng.choice([0, 1]) if k > 1 else 0
            stride = rng.choice([1, 1, 2])
            out = (size + 2 * padding - k) // stride + 1
            if out < 1:
                continue
            conv = nn.Conv2d if two_d else nn.Conv1d
            modules.append(conv(c, c_new, k, stride=stride, padding=padding, bias=rng.random() < 0.6))
            c, size = c_new, out
        elif r < 0.75:
            modules.append(_activation(rng))
        elif size >= 2:
            pool = rng.choice(["avg", "max", "adaptive"])
            if pool == "adaptive":
                size = rng.randint(1, size)
                modules.append(nn.AdaptiveAvgPool2d(size) if two_d else nn.AdaptiveAvgPool1d(size))
            else:
                cls = {("avg", False): nn.AvgPool1d, ("avg", True): nn.AvgPool2d,
                       ("max", False): nn.MaxPool1d, ("max", True): nn.MaxPool2d}[(pool, two_d)]
                modules.append(cls(2))
                size = size // 2
    modules.append(nn.Flatten())
    return modules, c * size * (size if two_d else 1)


@dataclass
class Case:
    seed: int
    modules: list
    loss: nn.Module
    X: torch.Tensor
    y: torch.Tensor
    kind: str
    damping: float
    dtype: torch.dtype
    method: str = "auto"
    description: str = ""


def make_case(seed: int, *, dtype: torch.dtype | None = None) -> Case:
    """One random chain, its data, ``kind`` and damping (float64 unless ``dtype`` is given;
    one case in eight is float32 when ``dtype`` is None)."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    with _default_dtype(torch.float64):
        batch = rng.randint(1, 6)
        depth = rng.randint(1, 10)
        if HAVE_CONV and rng.random() < 0.2:
            two_d = rng.random() < 0.4
            channels, length = rng.randint(1, 2), rng.randint(2, 4 if two_d else 6)
            shape = (batch, channels, length, length) if two_d else (batch, channels, length)
            body, w = _conv_body(rng, gen, channels, length, two_d, max(1, depth - 1))
        else:
            d_in = rng.randint(1, 12)
            shape = (batch, d_in)
            body, w = _dense_body(rng, gen, d_in, depth - 1)
        return _finish_case(rng, gen, seed, body, w, shape, batch, dtype)


def make_run_case(seed: int, *, dtype: torch.dtype | None = None) -> Case:
    """A chain with a run of 4–7 square (``nn.Linear`` + elementwise) pairs of one width,
    mostly at batch 1: where the elimination batches whole runs
    (:mod:`tallskinny.elimination.runs`). Biases on, off or mixed (a change of layout cuts
    a run), one activation or several, sometimes a zero weight (``x = 0`` after it: a
    bias-free layer then has ``G_V`` of rank zero); the head, loss, kind, damping, dtype
    and route are drawn as :func:`make_case` draws them."""
    rng = random.Random(10**9 + seed)
    gen = torch.Generator().manual_seed(10**9 + seed)
    with _default_dtype(torch.float64):
        batch = 1 if rng.random() < 0.8 else rng.randint(2, 3)
        w, d_in = rng.randint(1, 8), rng.randint(1, 8)
        biases = rng.choice(["on", "off", "mixed"])
        one_activation = _activation(rng) if rng.random() < 0.6 else None
        body = [nn.Linear(d_in, w, bias=rng.random() < 0.5), _activation(rng)]
        for _ in range(rng.randint(4, 7)):
            bias = {"on": True, "off": False}.get(biases, rng.random() < 0.5)
            body += [nn.Linear(w, w, bias=bias), copy.deepcopy(one_activation) if one_activation else _activation(rng)]
        case = _finish_case(rng, gen, seed, body, w, (batch, d_in), batch, dtype)
        if rng.random() < 0.15:  # a zero weight inside the run
            with torch.no_grad():
                case.modules[2 * rng.randint(1, len(body) // 2 - 1)].weight.zero_()
        case.description = "make_run_case: " + case.description
        return case


def _finish_case(rng, gen, seed: int, body: list, w: int, shape: tuple, batch: int, dtype) -> Case:
    """The head, the weights, the data, the loss, ``kind``, damping, dtype and route."""
    with _default_dtype(torch.float64):
        # the head: one output often, bias off sometimes
        classification = rng.random() < 0.5
        c = rng.choice([1, 1, 2, 3, 5]) if not classification else rng.choice([1, 2, 3, 5])
        modules = body + [nn.Linear(w, c, bias=rng.random() < 0.5)]
        if rng.random() < 0.3:
            modules.append(_activation(rng))
        for m in modules:  # moderate weights: tanh/sigmoid nets neither saturate nor vanish
            for p in m.parameters():
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=gen) * rng.choice([0.5, 1.0, 1.5]) / max(1, p.shape[-1]) ** 0.5)
        X = torch.randn(shape, generator=gen)
        reduction = rng.choice(["mean", "sum"])
        if classification:
            loss = nn.CrossEntropyLoss(reduction=reduction, label_smoothing=rng.choice([0.0, 0.0, 0.1, 0.3]))
            y = torch.randint(0, c, (batch,), generator=gen)
        else:
            loss = nn.MSELoss(reduction=reduction)
            y = torch.randn(batch, c, generator=gen)
    kind = rng.choice(["hessian", "ggn"])
    damping = 10 ** rng.uniform(-8, 3)
    if dtype is None:
        dtype = torch.float32 if rng.random() < 0.125 else torch.float64
    routes = ["auto", "riccati", "dense"] + (["kernel"] if kind == "ggn" else [])
    method = routes[rng.randrange(len(routes))]  # (drawn last: earlier draws stay as they were)
    case = Case(seed, modules, loss, X, y, kind, damping, dtype, method)
    case.description = describe(case)
    return case


def describe(case: Case) -> str:
    mods = ", ".join(_short(m) for m in case.modules)
    return (
        f"seed={case.seed} {case.kind} {case.method} ε={case.damping:.2e} {str(case.dtype).replace('torch.', '')} "
        f"X{tuple(case.X.shape)} [{mods}] {_short(case.loss)}"
    )


def _short(m) -> str:
    if isinstance(m, nn.Linear):
        return f"Linear({m.in_features},{m.out_features}{'' if m.bias is not None else ',nobias'})"
    if isinstance(m, (nn.Conv1d, nn.Conv2d)):
        return f"{type(m).__name__}({m.in_channels},{m.out_channels},{m.kernel_size[0]}{'' if m.bias is not None else ',nobias'})"
    if isinstance(m, nn.CrossEntropyLoss):
        return f"CE({m.reduction},ls={m.label_smoothing})"
    if isinstance(m, nn.MSELoss):
        return f"MSE({m.reduction})"
    if Residual is not None and isinstance(m, Residual):
        return f"Residual([{', '.join(_short(x) for x in m.inner)}]{', proj' if not isinstance(m.shortcut, nn.Identity) else ''})"
    if isinstance(m, nn.LayerNorm):
        return f"LayerNorm({m.normalized_shape[0]}{'' if m.elementwise_affine else ',noaffine'})"
    return type(m).__name__


class _default_dtype:
    def __init__(self, dtype):
        self.dtype = dtype

    def __enter__(self):
        self.previous = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)

    def __exit__(self, *exc):
        torch.set_default_dtype(self.previous)


# -- the check ----------------------------------------------------------------------------------
@dataclass
class Report:
    """Errors of one case, each divided by its tolerance (``≤ 1`` passes), and what failed."""

    case: str
    P: int = 0
    cond: float = math.nan
    min_ratio: float = math.nan  # min|λ| / max|λ| of H + εI
    scores: dict = field(default_factory=dict)  # name → error / tolerance
    warned: set = field(default_factory=set)  # quantities that came with an AccuracyWarning
    failures: list = field(default_factory=list)
    singular: bool = False
    unconverged: list = field(default_factory=list)  # searches that raised ConvergenceError

    def record(self, name: str, error: float, tol: float, *, warned: bool = False) -> None:
        score = error / tol if tol > 0 else (0.0 if error == 0 else math.inf)
        self.scores[name] = score
        if warned:
            self.warned.add(name)
        if not score <= 1.0 and not warned:  # NaN fails too
            self.failures.append(f"{name}: error {error:.2e} > tolerance {tol:.2e}")


def _accurate_sigmoid(input: torch.Tensor) -> torch.Tensor:
    """``1/(1 + e^{−x})`` for ``x ≥ 0``, ``e^x/(1 + e^x)`` below: autograd differentiates
    both into sums of positive terms (torch's backward ``s(1 − s)`` cancels where ``s → 1``)."""
    pos, neg = torch.where(input >= 0, input, 0.0), torch.where(input < 0, input, 0.0)
    e = torch.exp(neg)
    return torch.where(input >= 0, 1 / (1 + torch.exp(-pos)), e / (1 + e))


_TORCH_TANH = torch.tanh


def _accurate_tanh(input: torch.Tensor) -> torch.Tensor:
    """``tanh x = (1 − e)/(1 + e)``, ``e = e^{−2|x|}``, odd, from ``|x| ≥ 1/2``: autograd
    gives ``4e/(1 + e)²`` as two positive terms (torch's backward ``1 − t²`` cancels where
    ``|t| → 1``, and so does ``expm1``'s ``result + 1``); torch's own tanh below, where
    ``1 − t²`` is accurate."""
    big = input.abs() >= 0.5
    e = torch.exp(-2 * torch.where(big, input.abs(), 1.0))
    outer = torch.sign(input) * (1 - e) / (1 + e)
    return torch.where(big, outer, _TORCH_TANH(torch.where(big, 0.0, input)))


def _accurate_silu(input: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    return input * _accurate_sigmoid(input)


def _accurate_gelu(input: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """GELU in forms whose autograd derivatives keep their digits in the negative tail:
    ``x·s(2w)`` (tanh form, ``w = √(2/π)(x + 0.044715x³)``) and ``x·erfc(−x/√2)/2``."""
    if approximate == "tanh":
        return input * _accurate_sigmoid(2 * math.sqrt(2 / math.pi) * (input + 0.044715 * input**3))
    return 0.5 * input * torch.erfc(-input / math.sqrt(2))


@contextlib.contextmanager
def accurate_references():
    """The dense references with tanh, the logistic sigmoid, SiLU and GELU in forms whose
    autograd derivatives keep their digits where the unit saturates: torch's backward
    formulas ``1 − t²``, ``s(1 − s)``, ``1 + tanh w`` and ``1 + erf(x/√2)`` cancel there
    (GELU'(−5.34) off by 1.1e-9 relative, GELU'(−9) = 0, tanh'(±30) = 0), where
    tallskinny's rules are exact to rounding (runs-family seed 950683: an HVP "7× its
    tolerance" that was the reference's error). The same functions, so the references
    differ from torch's by rounding only where torch's are accurate."""
    F = torch.nn.functional
    saved = (torch.tanh, torch.sigmoid, F.gelu, F.silu)
    torch.tanh, torch.sigmoid, F.gelu, F.silu = _accurate_tanh, _accurate_sigmoid, _accurate_gelu, _accurate_silu
    try:
        yield
    finally:
        torch.tanh, torch.sigmoid, F.gelu, F.silu = saved


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    d = float((a.double() - b.double()).norm())
    n = float(b.norm())
    return d / n if n > 0 else d


def _reference_noise(case: Case, ref) -> tuple[float, float]:
    """``‖H(θ̃, X̃) − H(θ, X)‖₂`` and the same of the gradient, for a point moved by 4 ulps
    (float64) in every entry: the rounding-level sensitivity of the dense references."""
    gen = torch.Generator().manual_seed(case.seed + 1)
    eps = torch.finfo(torch.float64).eps

    def nudge(t: torch.Tensor) -> torch.Tensor:
        return t * (1 + 4 * eps * torch.randn(t.shape, generator=gen, dtype=t.dtype))

    modules = copy.deepcopy(case.modules)
    with torch.no_grad():
        for m in modules:
            for p in m.parameters():
                p.copy_(nudge(p))
    chain, moved = ts.Chain(case.modules, case.loss), ts.Chain(modules, case.loss)
    X = nudge(case.X)
    with accurate_references():
        H = ref(chain, case.X, case.y) - ref(moved, X, case.y)
        g = dense_gradient(chain, case.X, case.y) - dense_gradient(moved, X, case.y)
    return float(torch.linalg.matrix_norm(H, 2)), float(g.norm())


def _gauss_newton_scale(chain, X, y) -> float:
    """``‖J‖₂²·λ``: the output Jacobian ``J`` (w.r.t. all parameters, by ``torch.func``) and
    the size ``λ`` of the terms of the loss's Hessian in the outputs."""
    params = list(chain.parameters())
    if not params:
        return 0.0
    sizes = [p.numel() for p in params]
    owners = [[n for n, p in m.named_parameters() if any(p is q for q in params)] for m in chain.modules]

    def outputs(theta):
        pieces = iter(t.reshape(p.shape) for t, p in zip(torch.split(theta, sizes), params))
        z = X
        for module, names in zip(chain.modules, owners):
            z = torch.func.functional_call(module, {n: next(pieces) for n in names}, (z,))
        return z

    theta = torch.cat([p.detach().reshape(-1) for p in params])
    z = outputs(theta).detach()
    J = torch.func.jacrev(outputs)(theta).reshape(z.numel(), -1)
    # the size of the terms of Λ (autograd's reference forms diag(p) − ppᵀ with absolute
    # errors of eps·p, far above ‖Λ‖ where the softmax saturates)
    loss = chain.loss
    if isinstance(loss, nn.CrossEntropyLoss):
        terms = 1.0 / (z.shape[0] if loss.reduction == "mean" else 1)
    else:
        terms = 2.0 / (z.numel() if loss.reduction == "mean" else 1)
    return float(torch.linalg.matrix_norm(J, 2)) ** 2 * terms


def _backward_error(M: torch.Tensor, x: torch.Tensor, b: torch.Tensor, norm: float) -> float:
    """The largest normwise backward error ``‖b − Mx‖ / (‖M‖‖x‖ + ‖b‖)`` of the columns."""
    r = (b - M @ x).norm(dim=0)
    return float((r / (norm * x.norm(dim=0) + b.norm(dim=0))).max())


def call_recording_warnings(fn, warned: list):
    """``fn()`` with ``AccuracyWarning`` recorded (``warned`` gets ``True``) instead of raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ts.AccuracyWarning)
        out = fn()
    if any(issubclass(w.category, ts.AccuracyWarning) for w in caught):
        warned.append(True)
    return out


def wide_sweeps(seed: int) -> bool:
    """One seed in four takes the paths of large stages at every stage: the sweeps' wide
    products of :mod:`tallskinny.linalg.thin`, the dense stages' Schur complements by
    their upper blocks (``algebra.SPLIT_SCHUR_MIN``) and tallskinny-conv's shifted
    products of stride-1 convolutions, their thresholds lowered to 1: by default only
    stages of 256 rows and products of 2²¹ patch entries take them, which these small
    chains never have."""
    return seed % 4 == 3


@contextlib.contextmanager
def _wide_thresholds(on: bool):
    """The thresholds of :func:`wide_sweeps` at 1 inside, where ``on``."""
    if not on:
        yield
        return
    saved = None if shifted is None else shifted.SHIFTED_MIN_PATCHES
    if shifted is not None:
        shifted.SHIFTED_MIN_PATCHES = 1
    try:
        with large_stage_paths():
            yield
    finally:
        if shifted is not None:
            shifted.SHIFTED_MIN_PATCHES = saved


def check_case(case: Case, *, rhs: int = 2) -> Report:
    """Every quantity of ``case`` against dense float64 references (for
    :func:`wide_sweeps` seeds, with the wide thin products at every stage)."""
    with _wide_thresholds(wide_sweeps(case.seed)):
        return _check_case(case, rhs)


def _check_case(case: Case, rhs: int) -> Report:
    report = Report(case.description)
    modules = case.modules
    modules64 = modules if case.dtype == torch.float64 else copy.deepcopy(modules)
    chain64 = ts.Chain(modules64, case.loss)
    X64 = case.X
    ref = dense_hessian if case.kind == "hessian" else dense_ggn
    with accurate_references():
        H = ref(chain64, X64, case.y)
        g_ref = dense_gradient(chain64, X64, case.y)
    P = H.shape[0]
    report.P = P
    y = case.y
    if case.dtype == torch.float64:
        chain, X = chain64, X64
    else:
        low = [copy.deepcopy(m).to(case.dtype) for m in modules]
        chain, X = ts.Chain(low, case.loss), X64.to(case.dtype)
        y = y.to(case.dtype) if y.dtype.is_floating_point else y
    eps = torch.finfo(case.dtype).eps
    scale = eps / torch.finfo(torch.float64).eps  # float32: tolerances grow with eps
    gen = torch.Generator().manual_seed(case.seed)
    V = torch.randn(P, rhs, generator=gen, dtype=torch.float64)
    H_norm = float(torch.linalg.matrix_norm(H, 2)) if P else 0.0
    # products are exact to rounding relative to the size of their terms: JᵀΛJ can be far
    # larger than H where the output Jacobian falls in the loss Hessian's null space
    with accurate_references():
        product_scale = max(H_norm, _gauss_newton_scale(chain64, X64, case.y))

    curv = chain.curvature(X, y, kind=case.kind, method=case.method)
    # products: normwise against ‖H‖‖v‖ (the result itself may be tiny by cancellation)
    low_V = V.to(case.dtype)
    mismatch = 0.0  # max ‖(H − H_ref)v‖/‖v‖ seen: the products' own disagreement with the reference
    products = [("hvp", curv.hvp(low_V)), ("hvp1", curv.hvp(low_V[:, 0]).unsqueeze(1))]
    g = curv.gradient().double()
    strict = [1e-10 * scale * max(product_scale, 1e-300) * float(V[:, : got.shape[1]].norm()) for _, got in products]
    errors = [float((got.double() - H @ V[:, : got.shape[1]]).norm()) for _, got in products]
    if any(e > t for e, t in zip(errors, strict)):
        # a second reference by another order of operations (forward over reverse): where
        # terms cancel exactly the first keeps their rounding, which ‖H‖ does not show
        # (seed 5046: LayerNorm over one feature is constant, H = 0, and jacrev(grad) gives
        # 3.6e-15 at the GELU residual's bias). The one the products agree with better is
        # the reference from here on (solves, backward errors, inertia, log-determinant)
        with accurate_references():
            H_forward = ref(chain64, X64, case.y, outer="forward")
        forward_errors = [float((got.double() - H_forward @ V[:, : got.shape[1]]).norm()) for _, got in products]
        if max(forward_errors) < max(errors):
            H, errors = H_forward, forward_errors
    g_err, g_tol = float((g - g_ref).norm()), 1e-10 * scale * float(g_ref.norm()) + 1e-14 * scale
    H_noise = g_noise = 0.0
    # a float32 chain's own Hessian (torch.func on the float32 model) is as far from the
    # float64 reference as rounding of its inputs and of terms that cancel makes it
    # (LayerNorm over two features: 1.7e-5·‖H‖ at seed 500409); its solves answer it
    model_gap = 0.0
    if case.dtype != torch.float64:
        with accurate_references():
            model_gap = float(torch.linalg.matrix_norm(ref(chain, X, y).double() - H, 2))
    if any(e > t for e, t in zip(errors, strict)) or g_err > g_tol:
        # functions evaluated where they are ill-conditioned (a saturated GELU's 1 + tanh u)
        # are exact only to their condition number: so is the reference, and its change
        # under a perturbation of the point by a few ulps measures that
        H_noise, g_noise = _reference_noise(case, ref)
        if case.dtype != torch.float64:
            # a float32 chain: no worse than torch.func's own Hessian of the same float32
            # model (terms that cancel, as LayerNorm(1)'s, leave float32 rounding of their
            # size, which ‖H‖ does not show)
            H_noise = max(H_noise, model_gap)
    for (name, got), err, tol in zip(products, errors, strict):
        v_norm = float(V[:, : got.shape[1]].norm())
        mismatch = max(mismatch, err / v_norm)
        report.record(name, err, tol + 10 * H_noise * v_norm + 1e-300)
    report.record("gradient", g_err, g_tol + 10 * g_noise)

    M = H + case.damping * torch.eye(P, dtype=H.dtype)
    eig = torch.linalg.eigvalsh(M)
    lam_max, lam_min = float(eig.abs().max()), float(eig.abs().min())
    report.min_ratio = lam_min / lam_max
    report.cond = lam_max / lam_min if lam_min > 0 else math.inf
    warned: list = []
    try:
        fact = call_recording_warnings(lambda: curv.factorize(case.damping), warned)
    except ts.SingularSystemError:
        report.singular = True
        if report.min_ratio > SINGULAR_RATIO * eps:
            report.failures.append(f"SingularSystemError at min|λ|/max|λ| = {report.min_ratio:.1e}")
        return report
    factor_warned = bool(warned)
    # the rounding of H itself (seen as the products' disagreement with the reference) moves
    # the exact answers by up to cond·‖ΔH‖/‖H+εI‖ (solves) and P·cond·‖ΔH‖/‖H+εI‖ (log|det|)
    noise = max(10 * mismatch, model_gap) / lam_max
    # solves: a relative perturbation η of M moves the answer by up to cond·η/(1 − cond·η),
    # no bound at all from cond·η ≥ 1/2 (the backward error below still binds there)
    x_ref = torch.linalg.solve(M, V)
    moved = report.cond * noise
    sol_tol = (max(1e-9 * scale, 64 * eps * report.cond) + moved) / (1 - moved) if moved < 0.5 else math.inf
    solve_warned: list = []
    x = call_recording_warnings(lambda: fact.solve(low_V), solve_warned)
    report.record("solve", _relative(x, x_ref), sol_tol, warned=bool(solve_warned) or factor_warned)
    # the solve's backward error w.r.t. its own H, seen through the reference's H
    report.record("backward", _backward_error(M, x.double(), V, lam_max), 64 * eps + noise, warned=bool(solve_warned))
    ihvp_warned: list = []
    x1 = call_recording_warnings(lambda: chain.inverse_hvp(X, y, low_V[:, 0], damping=case.damping, kind=case.kind, method=case.method), ihvp_warned)
    report.record("inverse_hvp", _relative(x1, x_ref[:, 0]), sol_tol, warned=bool(ihvp_warned) or factor_warned)
    if case.dtype == torch.float64 and curv.method == "riccati":
        # mixed precision: float32 factors refined in float64 to the same promises (or the
        # float64 fallback, which must keep them too)
        mixed_warned: list = []
        xm = call_recording_warnings(lambda: curv.factorize(case.damping, precision="mixed").solve(V), mixed_warned)
        report.record("mixed solve", _relative(xm, x_ref), sol_tol, warned=bool(mixed_warned) or factor_warned)
        report.record("mixed backward", _backward_error(M, xm, V, lam_max), 64 * eps + noise, warned=bool(mixed_warned))
    # spectrum's signs and log-determinant
    inertia_warned: list = []
    inertia = call_recording_warnings(fact.inertia, inertia_warned)
    want = (int((eig > 0).sum()), int((eig < 0).sum()), 0)
    if case.dtype == torch.float64:
        exact_required = report.min_ratio > INERTIA_RATIO
    else:
        exact_required = report.min_ratio > INERTIA_RATIO_LOW * eps + noise
    if tuple(inertia) != want:
        report.scores["inertia"] = math.inf
        if exact_required:
            report.failures.append(f"inertia {tuple(inertia)} != {want}")
        elif inertia_warned or factor_warned:
            report.warned.add("inertia")
    else:
        report.scores["inertia"] = 0.0
    sign = float(fact.sign())
    if sign != (-1.0) ** want[1] and exact_required:
        report.failures.append(f"sign {sign} != {(-1.0) ** want[1]}")
    logdet_warned: list = []
    logdet = float(call_recording_warnings(fact.logdet, logdet_warned))
    logdet_ref = float(eig.abs().log().sum())
    tol = 1e-9 * scale * max(1.0, abs(logdet_ref)) + (1e-13 * scale + noise) * P * report.cond
    report.record("logdet", abs(logdet - logdet_ref), tol, warned=bool(logdet_warned) or factor_warned)
    return report
