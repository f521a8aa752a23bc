"""The elimination engine: factor and solve ``H + εI`` block by block (internal).

Layers inside, each importing only from those before it::

    workspace, algebra, structure   (leaves: the scratch pool, dense stage algebra,
                                     structure detection of the oracles)
    compiled, runs, hessian         (oracles compiled to tensor functions; runs of
                                     one-sample Linear + activation layers; the HVP)
    stages/                         (one file per stage kind, the Stage protocol)
    prepare, riccati, kkt, factor   (oracles → stages → the Riccati recursion, or the
                                     pivoted KKT fallback)
    flops                           (the operations of a factorization and a solve)
    mixed                           (the recursion in float32 on float32 copies of the
                                     oracles, for mixed-precision solves)

Notation (the oracles of block ``l``: ``z_l = f_l(z_{l-1}; θ_l)``, linearised as
``y_l = F y_{l-1} + G θ_l``, second-order terms ``½θᵀAθ + θᵀCy + ½yᵀEy``):

* ``S`` — the value Hessian w.r.t. a block's output (``S = E_loss`` after the last
  block); ``t`` — the matching gradient (adjoint) in the sweeps.
* ``Q_θθ = A + εI + GᵀSG``, ``Q_θy = C + GᵀSF`` — the stage's pivot and coupling; the
  Riccati step is ``S ← E + FᵀSF − Q_θyᵀ Q_θθ⁻¹ Q_θy``.
* Affine blocks: ``G = P_out (I_m ⊗ X̃) P_θ``, ``C = P_θᵀ (Γ ⊗ Ẽ)``. ``Θ̃ = P_θ θ`` read as
  an ``m × q`` matrix; ``X̃`` (``R × q``) the rows the parameters act on (inputs with a
  column of ones); ``Γ`` the output-side and ``Ẽ`` the input-side factor of ``C``.
* ``X̃ = UΣVᵀ`` (rank ``r``): ``Θ̃ = ZVᵀ + Θ̃_⊥``. ``Z`` is the span (``m·r`` numbers,
  ``ζ = vec Z``), ``Q_ζζ`` its pivot; on the complement ``G = 0`` and ``Q = εI``.
  ``C_⊥`` is ``C`` restricted to the complement; it adds ``−C_⊥ᵀC_⊥/ε`` to ``S``.
* ``ε`` — the damping; ``inertia(H + εI) = Σ_l inertia(Q_θθ,l)`` (Sylvester).

The names below are exactly those :mod:`tallskinny.curvature` uses.
"""

from . import mixed, workspace
from .compiled import CompiledOracle, compile_oracles
from .factor import factorize
from .flops import EliminationFlops, StageFlops, stage_flops
from .hessian import gradient, hvp, last_blocks_norm_bound
from .kkt import KKTFactorization, kkt_bytes
from .prepare import prepare_stages

__all__ = [
    "CompiledOracle",
    "EliminationFlops",
    "KKTFactorization",
    "StageFlops",
    "compile_oracles",
    "factorize",
    "gradient",
    "hvp",
    "kkt_bytes",
    "last_blocks_norm_bound",
    "mixed",
    "prepare_stages",
    "stage_flops",
    "workspace",
]
