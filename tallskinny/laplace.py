"""The Laplace approximation of a trained chain: evidence, prior precision, predictive variance.

With a Gaussian prior ``θ ~ N(0, α⁻¹I)`` and the negative log-likelihood
``NLL(θ) = s·loss(θ) + c`` (``loss`` the chain's loss over the data), the Laplace
approximation around the trained ``θ*`` with the Gauss–Newton posterior precision
``Λ = s·GGN + αI`` gives the log marginal likelihood

    log p(D | α) ≈ −NLL(θ*) − ½α‖θ*‖² + (P/2)·log α − ½·log det Λ

(the ``2π`` factors of prior and posterior cancel). ``log det Λ = P·log s +
log det(GGN + (α/s)I)`` is exact, from one factorization of ``GGN + (α/s)I``; each
value of ``α`` costs one factorization of the same curvature.

The linearised predictive covariance of the network output ``f(x)`` at a test input is
``J(x) Λ⁻¹ J(x)ᵀ``, ``J`` the output Jacobian at ``θ*``.

``s`` and ``c`` are inferred for ``nn.CrossEntropyLoss`` (class-index targets, no
class weights or label smoothing: ``s`` = number of examples for reduction ``"mean"``,
1 for ``"sum"``; ``c = 0``) and ``nn.MSELoss`` (Gaussian noise of variance 1:
``s = ½·numel`` for ``"mean"``, ``½`` for ``"sum"``; ``c = ½·numel·log 2π``); for any
other loss pass ``nll_scale`` (and ``nll_offset``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .per_example import flat_parameters, output_at, output_jacobian
from .batches import one_batch
from .chain import Chain
from .curvature import check_damping


def _likelihood_scale(chain: Chain, targets: Tensor) -> tuple[float, float]:
    loss = chain.loss
    if isinstance(loss, nn.CrossEntropyLoss):
        if loss.weight is not None or loss.label_smoothing != 0 or targets.dtype.is_floating_point:
            raise ValueError(
                "a CrossEntropyLoss with class weights, label smoothing or probability targets is not "
                "a log-likelihood: pass nll_scale (and nll_offset) explicitly"
            )
        n = int((targets != loss.ignore_index).sum())
        return (float(n) if loss.reduction == "mean" else 1.0), 0.0
    if isinstance(loss, nn.MSELoss):
        n = targets.numel()
        return (0.5 * n if loss.reduction == "mean" else 0.5), 0.5 * n * math.log(2 * math.pi)
    raise ValueError(
        f"cannot infer the likelihood of the loss {type(loss).__name__}: pass nll_scale s "
        "(and nll_offset c) with NLL = s·loss + c"
    )


class Laplace:
    """The Laplace approximation of ``chain`` around its current parameters on ``(inputs, targets)``.

    The Gauss–Newton curvature is computed once here (its cost grows like the cube of the
    number of examples: use the whole data set only when it is small). See the module
    docstring for ``nll_scale`` (``s``) and ``nll_offset`` (``c``). ``distributed``: a
    loader under ``torch.distributed`` is this rank's shard (see
    :meth:`tallskinny.Chain.curvature`).
    """

    def __init__(
        self,
        chain: Chain,
        inputs,
        targets: Tensor | None = None,
        *,
        nll_scale: float | None = None,
        nll_offset: float | None = None,
        method: str = "auto",
        distributed: bool | None = None,
    ):
        if not isinstance(chain, Chain):
            raise TypeError(f"Laplace needs a tallskinny.Chain, got {type(chain).__name__}")
        inputs, targets = one_batch(
            inputs, targets, what="Laplace", distributed=distributed, parameters=chain.parameters()
        )
        if nll_scale is None:
            scale, offset = _likelihood_scale(chain, targets)
        else:
            scale, offset = float(nll_scale), 0.0
            if not math.isfinite(scale) or scale <= 0:
                raise ValueError(f"nll_scale must be a finite number > 0, got {nll_scale}")
        if nll_offset is not None:
            offset = float(nll_offset)
        self.chain = chain
        self.nll_scale = scale
        self.curvature = chain.curvature(inputs, targets, kind="ggn", method=method)
        self.nll = scale * float(self.curvature.loss) + offset
        theta = flat_parameters(chain)
        self.squared_norm = float(theta @ theta)
        self.num_parameters = theta.numel()
        self.prior_precision: float | None = None

    def _check_precision(self, prior_precision) -> float:
        if prior_precision is None:
            if self.prior_precision is None:
                raise ValueError("no prior_precision given and none optimised yet (call optimize_prior_precision)")
            return self.prior_precision
        alpha = check_damping(prior_precision)
        if alpha == 0:
            raise ValueError("prior_precision must be > 0")
        return alpha

    def posterior_logdet(self, prior_precision: float | None = None) -> float:
        """``log det(s·GGN + αI)``, exact (one factorization)."""
        alpha = self._check_precision(prior_precision)
        fact = self.curvature.factorize(alpha / self.nll_scale)
        return self.num_parameters * math.log(self.nll_scale) + float(fact.logdet())

    def log_marginal_likelihood(self, prior_precision: float | None = None) -> float:
        """``−NLL(θ*) − ½α‖θ*‖² + (P/2) log α − ½ log det(s·GGN + αI)``."""
        alpha = self._check_precision(prior_precision)
        return (
            -self.nll
            - 0.5 * alpha * self.squared_norm
            + 0.5 * self.num_parameters * math.log(alpha)
            - 0.5 * self.posterior_logdet(alpha)
        )

    def optimize_prior_precision(self, lower: float = 1e-6, upper: float = 1e6, *, tol: float = 1e-6) -> float:
        """The ``α`` in ``[lower, upper]`` maximising the log marginal likelihood (golden-section
        search on ``log α`` to ``tol`` in ``log α``; one factorization per evaluation).
        The result is also stored as ``self.prior_precision``."""
        lower, upper = check_damping(lower), check_damping(upper)
        if not 0 < lower < upper:
            raise ValueError(f"need 0 < lower < upper, got {lower}, {upper}")
        a, b = math.log(lower), math.log(upper)
        ratio = (math.sqrt(5) - 1) / 2

        def f(log_alpha: float) -> float:
            return -self.log_marginal_likelihood(math.exp(log_alpha))

        c, d = b - ratio * (b - a), a + ratio * (b - a)
        fc, fd = f(c), f(d)
        while b - a > tol:
            if fc < fd:
                b, d, fd = d, c, fc
                c = b - ratio * (b - a)
                fc = f(c)
            else:
                a, c, fc = c, d, fd
                d = a + ratio * (b - a)
                fd = f(d)
        self.prior_precision = math.exp(0.5 * (a + b))
        return self.prior_precision

    def predictive_covariance(self, inputs: Tensor, prior_precision: float | None = None) -> Tensor:
        """``(n, d, d)``: ``J(x) (s·GGN + αI)⁻¹ J(x)ᵀ`` for each of the ``n`` test inputs
        (``d`` outputs per example; one backward pass per output entry, one solve with
        ``n·d`` right-hand sides)."""
        alpha = self._check_precision(prior_precision)
        # first: a curvature made stale by later training raises before the Jacobian's passes
        fact = self.curvature.factorize(alpha / self.nll_scale)
        J = output_jacobian(self.chain, inputs)  # (n, d, P)
        if not bool(torch.isfinite(J.sum())) and not bool(torch.isfinite(J).all()):
            raise ValueError("the output Jacobian at inputs contains NaN or inf (check the inputs)")
        n, d, P = J.shape
        rows = J.reshape(n * d, P)
        solved = fact.solve(rows.T.contiguous()) / self.nll_scale
        cov = torch.einsum("idp,pie->ide", J, solved.reshape(P, n, d))
        return 0.5 * (cov + cov.mT)

    def predictive_variance(self, inputs: Tensor, prior_precision: float | None = None) -> Tensor:
        """``(n, d)``: the diagonal of :meth:`predictive_covariance`."""
        return torch.diagonal(self.predictive_covariance(inputs, prior_precision), dim1=-2, dim2=-1)

    def predictive_probabilities(
        self,
        inputs: Tensor,
        prior_precision: float | None = None,
        *,
        link: str = "probit",
        samples: int = 100,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """``(n, C)`` class probabilities of a classifier (logits out, cross-entropy) under
        the linearised Laplace posterior, with laplace-torch's conventions:

        * ``link="probit"``: ``softmax(f / √(1 + π/8·diag Σ))``, the probit approximation
          of ``E[softmax(f)]`` with ``f ~ N(f*, Σ)`` per class (MacKay);
        * ``link="mc"``: the mean of ``softmax(f)`` over ``samples`` draws of ``f ~ N(f*, Σ)``.

        ``f*`` is the network's output at ``inputs``, ``Σ`` :meth:`predictive_covariance`."""
        if link not in ("probit", "mc"):
            raise ValueError(f"link must be 'probit' or 'mc', got {link!r}")
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise ValueError(f"samples must be an integer >= 1, got {samples!r}")
        cov = self.predictive_covariance(inputs, prior_precision)
        with torch.no_grad():
            f = output_at(self.chain, flat_parameters(self.chain), inputs).reshape(cov.shape[:2])
        if link == "probit":
            kappa = torch.rsqrt(1.0 + math.pi / 8.0 * torch.diagonal(cov, dim1=-2, dim2=-1))
            return torch.softmax(kappa * f, dim=-1)
        # Σ may be singular (the softmax's invariance): a factor from its eigendecomposition
        lam, Q = torch.linalg.eigh(cov)
        root = Q * lam.clamp_min(0.0).sqrt().unsqueeze(-2)
        noise = torch.randn((samples,) + tuple(f.shape), generator=generator, dtype=f.dtype).to(f.device)
        draws = f + torch.einsum("nij,snj->sni", root, noise)
        return torch.softmax(draws, dim=-1).mean(0)
