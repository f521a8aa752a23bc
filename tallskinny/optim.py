"""Optimizers that take exact second-order steps on a :class:`~tallskinny.Chain`.

Both are ``torch.optim.Optimizer``s over ``chain.parameters()`` and change those
parameters **in place** (the one place in tallskinny where the model is modified, on
purpose). Each ``step`` needs the current mini-batch: pass ``step((inputs, targets))``
or ``step(closure)`` with ``closure()`` returning ``(inputs, targets)``. Per step:

1. ``curv = chain.curvature(inputs, targets, kind)`` — once;
2. a step ``s`` from exact solves with ``H + λI`` (as many dampings as needed, all on
   the same ``curv``);
3. the ratio ``ρ = (L(θ) − L(θ + s)) / m(s)`` of actual to predicted decrease,
   ``m(s) = −(gᵀs + ½sᵀHs)`` (one forward pass per trial, through the blocks at the
   values ``θ + s``: the parameters change only when a step is accepted, so ``curv``
   stays valid for the retries); a step with ``ρ ≤ η`` is not applied and is retried
   with more damping / a smaller radius, up to ``max_retries``.

* :class:`DampedNewton` — Levenberg–Marquardt: ``s = −(H + λI)⁻¹g``, ``λ`` adapted
  from ``ρ`` (×``1/3`` when ``ρ > ¾``, ×4 when ``ρ < ¼``). With ``kind="hessian"``
  ``λ`` is first raised until ``H + λI`` is positive definite (read off its inertia),
  so every step is a descent direction.
* :class:`TrustRegion` — ``s = argmin gᵀs + ½sᵀHs`` over ``‖s‖ ≤ Δ``, solved exactly
  by :func:`tallskinny.trust_region.solve_subproblem` (indefinite ``H`` and the hard
  case included); ``Δ`` ×¼ when ``ρ < ¼``, ×2 (up to ``max_radius``) when ``ρ > ¾``
  on the boundary.

``step(batch, gradient_batch)``: with a second, larger ``gradient_batch`` the gradient
and the ratio test use it while the curvature stays on ``batch`` (sub-sampled Newton:
the curvature's cost grows like the cube of its batch, a gradient's only linearly).
``step`` returns the loss before the step; ``last_step`` holds a :class:`StepReport`.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Union

import attrs
import torch
from torch import Tensor

from .per_example import flat_parameters, loss_at
from .batches import one_batch
from .chain import Chain
from .curvature import Curvature, check_kind
from .errors import SingularSystemError
from .trust_region import solve_subproblem

Batch = tuple  # (inputs, targets)
BatchOrClosure = Union[Batch, Callable[[], Batch]]


@attrs.frozen
class StepReport:
    """What one ``step`` did: the loss before and after (after = before if rejected),
    ``ratio`` actual/predicted decrease of the accepted (or last) trial, the ``damping``
    (``λ``) and ``radius`` (``Δ``, TrustRegion only) of that trial, the step norm, how
    many trials and factorizations it took, and whether the step was ``accepted``. The
    adapted values for the next step are in ``optimizer.param_groups[0]``."""

    loss: float
    new_loss: float
    ratio: float
    damping: float
    radius: float | None
    step_norm: float
    trials: int
    factorizations: int
    accepted: bool


def _positive(name: str, value, *, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be a finite number {'>=' if allow_zero else '>'} 0, got {value}")
    return value


class _ExactStepOptimizer(torch.optim.Optimizer):
    def __init__(self, chain: Chain, kind: str, defaults: dict, eta: float, max_retries: int):
        if not isinstance(chain, Chain):
            raise TypeError(f"the optimizer needs a tallskinny.Chain, got {type(chain).__name__}")
        check_kind(kind)
        if not (0 <= eta < 0.25):
            raise ValueError(f"eta (the acceptance threshold) must be in [0, 0.25), got {eta}")
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise ValueError(f"max_retries must be an integer >= 0, got {max_retries!r}")
        params = list(chain.parameters())
        chain.layout()  # one dtype/device, at least one parameter
        super().__init__(params, defaults)
        self.chain = chain
        self.kind = kind
        self.eta = eta
        self.max_retries = max_retries
        self.last_step: StepReport | None = None

    # -- helpers -------------------------------------------------------------------------
    def _batch(self, batch_or_closure: BatchOrClosure) -> Batch:
        """The step's ``(inputs, targets)``: a pair, a closure returning one, or a loader (a
        re-iterable of pairs, concatenated as by ``chain.curvature(loader)``)."""
        batch = batch_or_closure() if callable(batch_or_closure) else batch_or_closure
        if not isinstance(batch, (tuple, list, Tensor)) and isinstance(batch, Iterable):
            return one_batch(batch, what="the step's batches", parameters=self._params())
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise TypeError(
                "step needs the mini-batch: (inputs, targets) or a closure returning (inputs, targets), "
                f"got {type(batch).__name__}"
            )
        return batch[0], batch[1]

    def _params(self) -> list[Tensor]:
        return self.param_groups[0]["params"]

    def _add(self, step: Tensor) -> None:
        """``θ ← θ + step`` in place."""
        params = self._params()
        with torch.no_grad():
            for p, piece in zip(params, torch.split(step, [p.numel() for p in params])):
                p.add_(piece.view_as(p))

    def _loss(self, inputs, targets, step: Tensor) -> float:
        """The loss at ``θ + step``, the parameters unchanged (the step's curvature, which
        shares memory with them, stays valid for a retry)."""
        with torch.no_grad():
            return float(loss_at(self.chain, flat_parameters(self.chain) + step, inputs, targets))

    def _begin_step(self, closure: BatchOrClosure, gradient_batch: BatchOrClosure | None) -> tuple:
        """``(curvature, g, loss, inputs, targets)`` at the start of a step: the curvature of
        the step's batch and the gradient and loss the ratio test uses."""
        inputs, targets = self._batch(closure)
        curv = self.chain.curvature(inputs, targets, kind=self.kind)
        g, loss, inputs, targets = self._gradient_and_loss(curv, inputs, targets, gradient_batch)
        return curv, g, loss, inputs, targets

    def _gradient_and_loss(self, curv: Curvature, inputs, targets, gradient_batch) -> tuple:
        """``(g, loss, inputs, targets)`` of the batch the ratio test uses: the curvature batch,
        or ``gradient_batch`` (a plain autograd gradient) when one is given."""
        if gradient_batch is None:
            return curv.gradient(), float(curv.loss), inputs, targets
        g_inputs, g_targets = self._batch(gradient_batch)
        params = self._params()
        with torch.enable_grad():
            loss = self.chain(g_inputs, g_targets)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        flat = torch.cat([(torch.zeros_like(p) if d is None else d).reshape(-1) for p, d in zip(params, grads)])
        if not bool(torch.isfinite(flat.sum())) and not bool(torch.isfinite(flat).all()):
            raise ValueError(
                f"the gradient on gradient_batch contains NaN or inf (loss there: {float(loss.detach())}); "
                "no step can be taken from it"
            )
        return flat.detach(), float(loss.detach()), g_inputs, g_targets

    def _try(self, curv, g: Tensor, inputs, targets, step: Tensor, loss: float) -> tuple[float, float, float]:
        """Judge ``step``; return (new loss, predicted decrease, ratio); apply it if ρ > η."""
        # the model m(s) = gᵀs + ½sᵀ(H + δI)s
        predicted = -float(g @ step + 0.5 * (step @ curv.hvp(step)))
        new_loss = self._loss(inputs, targets, step)
        if predicted > 0 and math.isfinite(new_loss):
            ratio = (loss - new_loss) / predicted
        else:
            ratio = -math.inf if not math.isfinite(new_loss) else (1.0 if new_loss <= loss else -math.inf)
        if ratio > self.eta:
            self._add(step)
        return new_loss, predicted, ratio


class DampedNewton(_ExactStepOptimizer):
    """Levenberg–Marquardt with exact solves: ``θ ← θ − (H + λI)⁻¹ ∇L`` (see the module docstring).

    ``kind``: ``"ggn"`` (default; ``GGN + λI ≻ 0`` for ``λ > 0``) or ``"hessian"``.
    ``damping``: the initial ``λ``, adapted within ``[min_damping, max_damping]`` unless
    ``adaptive=False``.
    """

    def __init__(
        self,
        chain: Chain,
        *,
        kind: str = "ggn",
        damping: float = 1.0,
        adaptive: bool = True,
        min_damping: float = 1e-8,
        max_damping: float = 1e8,
        eta: float = 0.0,
        max_retries: int = 8,
    ):
        damping = _positive("damping", damping)
        min_damping = _positive("min_damping", min_damping)
        max_damping = _positive("max_damping", max_damping)
        if not min_damping <= damping <= max_damping:
            raise ValueError(f"need min_damping <= damping <= max_damping, got {min_damping}, {damping}, {max_damping}")
        defaults = dict(damping=damping, min_damping=min_damping, max_damping=max_damping, adaptive=bool(adaptive))
        super().__init__(chain, kind, defaults, eta, max_retries)

    def step(self, closure: BatchOrClosure, gradient_batch: BatchOrClosure | None = None) -> Tensor:  # type: ignore[override]
        """One damped Newton step on the batch; returns the loss before the step."""
        group = self.param_groups[0]
        curv, g, loss, inputs, targets = self._begin_step(closure, gradient_batch)
        lam = group["damping"]
        factorizations = 0
        new_loss, ratio, step_norm, accepted, trials = loss, -math.inf, 0.0, False, 0
        for trials in range(1, self.max_retries + 2):
            fact = None
            while fact is None:
                factorizations += 1
                try:
                    fact = curv.factorize(lam)
                    if not fact.is_positive_definite():
                        fact = None
                except SingularSystemError:
                    fact = None
                if fact is None:
                    if lam >= group["max_damping"]:
                        raise RuntimeError(f"H + λI is not positive definite even at λ = max_damping = {lam:g}")
                    lam = min(4.0 * lam, group["max_damping"])
            step = -fact.solve(g)
            used = lam
            step_norm = float(step.norm())
            new_loss, _, ratio = self._try(curv, g, inputs, targets, step, loss)
            accepted = ratio > self.eta
            if group["adaptive"]:
                if ratio > 0.75:
                    lam = max(lam / 3.0, group["min_damping"])
                elif ratio < 0.25:
                    lam = min(4.0 * lam, group["max_damping"])
            if accepted or not group["adaptive"]:
                break
        group["damping"] = lam
        self.last_step = StepReport(
            loss, new_loss if accepted else loss, ratio, used, None, step_norm, trials, factorizations, accepted
        )
        return torch.tensor(loss, dtype=g.dtype)


class TrustRegion(_ExactStepOptimizer):
    """Exact trust-region method: each step solves ``min gᵀs + ½sᵀHs, ‖s‖ ≤ Δ`` exactly.

    ``kind``: ``"hessian"`` (default; indefinite ``H`` is handled exactly — negative
    curvature directions are followed to the boundary) or ``"ggn"``. ``radius``: the
    initial ``Δ``, adapted up to ``max_radius``. ``damping`` ``δ ≥ 0``: the model uses
    ``H + δI`` (default ``1e-6``). Without a small ``δ``, ``λ = 0`` is singular for the
    Gauss–Newton matrix of every over-parametrised network, and usually for its Hessian
    too, and proving a system singular costs far more than a regular factorization;
    with it, an interior step costs one factorization. ``damping=0`` gives the
    undamped model. ``rtol`` is passed to the subproblem solver
    (``‖s‖ = Δ`` to that relative accuracy; the previous step's ``λ`` is its warm start).
    """

    def __init__(
        self,
        chain: Chain,
        *,
        kind: str = "hessian",
        radius: float = 1.0,
        max_radius: float = 1e3,
        min_radius: float = 1e-10,
        eta: float = 0.1,
        max_retries: int = 8,
        rtol: float = 1e-3,
        damping: float = 1e-6,
    ):
        radius = _positive("radius", radius)
        max_radius = _positive("max_radius", max_radius)
        min_radius = _positive("min_radius", min_radius)
        if not min_radius <= radius <= max_radius:
            raise ValueError(f"need min_radius <= radius <= max_radius, got {min_radius}, {radius}, {max_radius}")
        if not (0 < rtol < 1):
            raise ValueError(f"rtol must be in (0, 1), got {rtol}")
        damping = _positive("damping", damping, allow_zero=True)
        defaults = dict(
            radius=radius, max_radius=max_radius, min_radius=min_radius, rtol=rtol, multiplier=0.0, damping=damping
        )
        super().__init__(chain, kind, defaults, eta, max_retries)

    def step(self, closure: BatchOrClosure, gradient_batch: BatchOrClosure | None = None) -> Tensor:  # type: ignore[override]
        """One trust-region step on the batch; returns the loss before the step."""
        group = self.param_groups[0]
        curv, g, loss, inputs, targets = self._begin_step(closure, gradient_batch)
        radius = group["radius"]
        model = _Shifted(curv, group["damping"]) if group["damping"] > 0 else curv
        factorizations = 0
        new_loss, ratio, step_norm, accepted, lam, trials = loss, -math.inf, 0.0, False, 0.0, 0
        for trials in range(1, self.max_retries + 2):
            sub = solve_subproblem(model, g, radius, rtol=group["rtol"], initial_multiplier=group["multiplier"])
            group["multiplier"] = sub.multiplier
            factorizations += sub.factorizations
            lam, step_norm = sub.multiplier, float(sub.step.norm())
            if sub.model_decrease <= 0:  # stationary for the model: nothing to do
                ratio, accepted = 0.0, False
                break
            used = radius
            new_loss, _, ratio = self._try(model, g, inputs, targets, sub.step, loss)
            accepted = ratio > self.eta
            if ratio < 0.25:
                radius = max(0.25 * step_norm, group["min_radius"])
            elif ratio > 0.75 and sub.boundary:
                radius = min(2.0 * radius, group["max_radius"])
            if accepted or radius <= group["min_radius"]:
                break
        group["radius"] = radius
        self.last_step = StepReport(
            loss, new_loss if accepted else loss, ratio, lam, used, step_norm, trials, factorizations, accepted
        )
        return torch.tensor(loss, dtype=g.dtype)


class _Shifted:
    """``H + δI`` with the interface of :class:`~tallskinny.Curvature` that the
    trust-region solver and the ratio test use."""

    def __init__(self, curvature: Curvature, shift: float):
        self.curvature, self.shift = curvature, shift

    def factorize(self, damping: float):
        return self.curvature.factorize(damping + self.shift)

    def hvp(self, v: Tensor) -> Tensor:
        return self.curvature.hvp(v) + self.shift * v

    def gradient(self) -> Tensor:
        return self.curvature.gradient()
