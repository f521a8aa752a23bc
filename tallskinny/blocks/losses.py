"""Analytic loss blocks: ``nn.CrossEntropyLoss`` and ``nn.MSELoss`` (reduction 'mean' or 'sum').

Cross-entropy, in every variant PyTorch offers (class-index or class-probability
targets, ``weight``, ``label_smoothing``, ``ignore_index``, extra dimensions
``(B, C, d₁, …)``), is one formula. Each row ``s`` (a sample, or a sample and a
position) with logits ``z_s`` and ``p_s = softmax(z_s)`` contributes
``Σ_c q_sc (logsumexp z_s − z_sc)`` with nonnegative target weights ``q_s``, and the
sum is divided by ``D``. With ``Q_s = Σ_c q_sc``:

    ∂loss/∂z_s = (Q_s p_s − q_s)/D        ∂²loss/∂z_s² = Q_s (diag p_s − p_s p_sᵀ)/D

For a class index ``y_s`` (not ignored): ``q_s = (1−ε) w_{y_s} e_{y_s} + (ε/C) w``;
an ignored row has ``q_s = 0``; ``D = Σ_{s not ignored} w_{y_s}`` for 'mean'.
For probabilities ``t_s``: ``q_s = w ⊙ ((1−ε) t_s + ε/C)``, ``D`` = number of rows for
'mean'. ``D = 1`` for 'sum'. (``w`` = class weights, 1 if none; ``ε`` = label smoothing.)

MSE over ``N`` entries: ``F = 2(z − y)ᵀ/N``, ``E = (2/N) I`` ('mean'; without ``/N`` for 'sum').
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..linalg import Dense, LinearOperator, ScaledIdentity
from .checks import check_finite, check_input, describe, zero
from .protocol import Oracle
from .registry import register

__all__ = [
    "CrossEntropyLossBlock",
    "LossModuleBlock",
    "MSELossBlock",
    "block_diagonal",
    "cross_entropy_weights",
    "softmax_cross_entropy_derivatives",
]


class LossModuleBlock:
    """Base of the analytic loss blocks: wraps a loss module with reduction 'mean' or 'sum'."""

    def __init__(self, module: nn.Module):
        if not isinstance(module, nn.Module):
            raise TypeError(f"{type(self).__name__} wraps a loss module, got {describe(module)}")
        reduction = getattr(module, "reduction", None)
        if reduction not in ("mean", "sum"):
            raise ValueError(
                f"{module._get_name()}(reduction={reduction!r}) does not return a scalar; "
                "a loss block needs reduction='mean' or 'sum'"
            )
        self.module = module

    def forward(self, z: Tensor, target: Tensor) -> Tensor:
        """The loss, computed by the module itself."""
        check_input(z, self._where("forward"))
        return self.module(z, target)

    def check_target(self, z: Tensor, target: Tensor) -> None:
        raise NotImplementedError

    def oracle_bytes(
        self, z_in: tuple[int, ...], z_out: tuple[int, ...], *, second_order: bool, itemsize: int
    ) -> tuple[int, int]:
        """The gradient, kept, and its temporaries: ``2a`` each (a subclass with a dense
        Hessian says more) (:class:`~tallskinny.blocks.protocol.OracleMemory`)."""
        a = math.prod(z_in) * itemsize
        return 2 * a, 2 * a

    def _loss_oracle(self, z: Tensor, grad: Tensor, hess: LinearOperator) -> Oracle:
        a = z.numel()
        return Oracle(G=zero(1, 0, z), F=Dense(grad.reshape(1, a)), A=zero(0, 0, z), C=zero(0, a, z), E=hess)

    def _where(self, method: str) -> str:
        return f"{type(self).__name__}({self.module._get_name()}).{method}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.module!r})"


# -- mean squared error -------------------------------------------------------------------
@register(nn.MSELoss)
class MSELossBlock(LossModuleBlock):
    """``nn.MSELoss``: ``F = 2(z − y)/N``, ``E = (2/N) I`` for 'mean' (``N = z.numel()``)."""

    module: nn.MSELoss

    def check_target(self, z: Tensor, target: Tensor) -> None:
        """The target must be a floating tensor of ``z``'s shape, dtype and device, and finite."""
        where = self._where("check_target")
        check_input(z, where)
        if not isinstance(target, Tensor) or not target.dtype.is_floating_point:
            raise TypeError(f"{where}: the target must be a floating-point tensor, got {describe(target)}")
        if target.shape != z.shape:
            raise ValueError(
                f"{where}: the target must have the shape of z {tuple(z.shape)}, got {tuple(target.shape)} "
                "(no broadcasting)"
            )
        if target.dtype != z.dtype or target.device != z.device:
            raise TypeError(
                f"{where}: the target has dtype {target.dtype} on {target.device}, z has dtype {z.dtype} "
                f"on {z.device}; they must agree"
            )
        if z.numel() == 0 and self.module.reduction == "mean":
            raise ValueError(f"{where}: the mean over an empty z is undefined")
        check_finite(target, "the target", where)

    def oracle(self, z: Tensor, target: Tensor) -> Oracle:
        where = self._where("oracle")
        self.check_target(z, target)
        z = z.detach()
        check_finite(z, "z", where)
        scale = 2.0 / z.numel() if self.module.reduction == "mean" else 2.0
        grad = scale * (z - target.detach())
        return self._loss_oracle(z, grad, ScaledIdentity(z.numel(), scale, dtype=z.dtype, device=z.device))


# -- cross-entropy ------------------------------------------------------------------------
@register(nn.CrossEntropyLoss)
class CrossEntropyLossBlock(LossModuleBlock):
    """``nn.CrossEntropyLoss`` with every option (see the module docstring for the formula)."""

    module: nn.CrossEntropyLoss

    def check_target(self, z: Tensor, target: Tensor) -> None:
        """Class indices (int64 or uint8) of shape ``(B, d₁, …)`` in ``[0, C)`` or equal to
        ``ignore_index``, or class probabilities: a floating tensor of ``z``'s shape and dtype."""
        where = self._where("check_target")
        check_input(z, where)
        if z.dim() == 0 or z.numel() == 0:
            raise ValueError(
                f"{where}: z must hold logits of shape (C,), (B, C) or (B, C, d1, ...), got {tuple(z.shape)}"
            )
        n_classes = _n_classes(z)
        weight = self.module.weight
        if weight is not None and (
            weight.shape != (n_classes,) or weight.dtype != z.dtype or weight.device != z.device
        ):
            raise TypeError(
                f"{where}: the class weights must be a tensor of shape ({n_classes},) with z's dtype "
                f"{z.dtype} on {z.device}, got {describe(weight)}"
            )
        if not isinstance(target, Tensor):
            raise TypeError(f"{where}: the target must be a tensor, got {describe(target)}")
        if target.device != z.device:
            raise ValueError(f"{where}: the target is on {target.device}, z on {z.device}")
        if target.dtype.is_floating_point:
            self._check_probabilities(z, target, where)
        elif target.dtype in (torch.int64, torch.uint8):
            self._check_indices(z, target, n_classes, where)
        else:
            raise TypeError(
                f"{where}: the target must hold class indices (dtype torch.int64 or torch.uint8) or class "
                f"probabilities (z's dtype {z.dtype}), got dtype {target.dtype}"
            )

    def oracle_bytes(
        self, z_in: tuple[int, ...], z_out: tuple[int, ...], *, second_order: bool, itemsize: int
    ) -> tuple[int, int]:
        """Kept: the dense block-diagonal Hessian ``a × a`` and the gradient; scratch: its
        ``R`` blocks ``C × C`` and their temporaries, the ``R × R`` selector of the blocks
        and, for spatial outputs, the Hessian reordered (``2a²``)
        (:class:`~tallskinny.blocks.protocol.OracleMemory`)."""
        a = math.prod(z_in)
        classes = z_in[1] if len(z_in) >= 2 else z_in[0] if z_in else 1
        R = a // max(classes, 1)
        scratch = R * R + 4 * R * classes * classes + 4 * a + (2 * a * a if len(z_in) > 2 else 0)
        return (a * a + a) * itemsize, scratch * itemsize

    def _check_probabilities(self, z: Tensor, target: Tensor, where: str) -> None:
        if target.shape != z.shape or target.dtype != z.dtype:
            raise ValueError(
                f"{where}: class-probability targets must have z's shape {tuple(z.shape)} and dtype {z.dtype}, "
                f"got shape {tuple(target.shape)} and dtype {target.dtype} (class indices must be "
                f"int64 of shape {_index_shape(z)})"
            )
        check_finite(target, "the target", where)

    def _check_indices(self, z: Tensor, target: Tensor, n_classes: int, where: str) -> None:
        expected = _index_shape(z)
        if target.shape != expected:
            raise ValueError(
                f"{where}: class-index targets for z of shape {tuple(z.shape)} must have shape {expected}, "
                f"got {tuple(target.shape)}"
            )
        valid = target != self.module.ignore_index
        kept = target[valid]
        if kept.numel() and (int(kept.min()) < 0 or int(kept.max()) >= n_classes):
            bad = kept[(kept < 0) | (kept >= n_classes)][0]
            raise ValueError(
                f"{where}: class indices must lie in [0, {n_classes}) (or equal ignore_index="
                f"{self.module.ignore_index}), found {int(bad)}"
            )
        if self.module.reduction == "mean":
            weight = self.module.weight
            total = kept.numel() if weight is None else float(weight[kept.long()].sum())
            if not total > 0:
                raise ValueError(
                    f"{where}: with reduction='mean' the loss is divided by the total weight of the "
                    "targets that are not ignored, which is 0 here (every target ignored or of weight 0): "
                    "the loss would be NaN"
                )

    def oracle(self, z: Tensor, target: Tensor) -> Oracle:
        where = self._where("oracle")
        self.check_target(z, target)
        z = z.detach()
        check_finite(z, "z", where)
        n_classes = _n_classes(z)
        rows = _class_last(z).reshape(-1, n_classes)
        if target.dtype.is_floating_point:
            target_rows = _class_last(target.detach()).reshape(-1, n_classes)
        else:
            target_rows = target.reshape(-1)
        q, denominator = cross_entropy_weights(self.module, target_rows, n_classes, z.dtype)
        grad_rows, hess_blocks = softmax_cross_entropy_derivatives(rows, q, denominator)
        grad = _class_back(grad_rows, z.shape).reshape(-1)
        hess = block_diagonal(hess_blocks)
        if z.dim() > 2:  # rows are (sample, position) pairs: reorder to z's row-major order
            position = _class_back(torch.arange(z.numel(), device=z.device).reshape(-1, n_classes), z.shape).reshape(-1)
            hess = hess[position][:, position]
        return self._loss_oracle(z, grad, Dense(hess, symmetric=True))


def cross_entropy_weights(
    module: nn.CrossEntropyLoss, target_rows: Tensor, n_classes: int, dtype: torch.dtype
) -> tuple[Tensor, float | Tensor]:
    """The target weights ``q`` (rows × C) and the divisor ``D`` of the cross-entropy (module docstring)."""
    eps = float(module.label_smoothing)
    weight = module.weight
    device = target_rows.device
    w = torch.ones(n_classes, dtype=dtype, device=device) if weight is None else weight.detach()
    if target_rows.dtype.is_floating_point:
        q = w * ((1 - eps) * target_rows + eps / n_classes)
        denominator = target_rows.shape[0]
    else:
        valid = target_rows != module.ignore_index
        labels = torch.where(valid, target_rows, torch.zeros_like(target_rows)).long()
        onehot = nn.functional.one_hot(labels, n_classes).to(dtype)
        w_label = w[labels] * valid.to(dtype)
        q = (1 - eps) * w_label[:, None] * onehot + (eps / n_classes) * valid.to(dtype)[:, None] * w
        denominator = w_label.sum()
    if module.reduction == "sum":
        denominator = 1.0
    return q, denominator


def softmax_cross_entropy_derivatives(rows: Tensor, q: Tensor, denominator) -> tuple[Tensor, Tensor]:
    """Gradient (rows × C) and Hessian blocks (rows × C × C) of ``Σ_s Σ_c q_sc (lse z_s − z_sc) / D``."""
    p = torch.softmax(rows, dim=-1)
    Q = q.sum(-1, keepdim=True)
    grad = (Q * p - q) / denominator
    # diag(p) − ppᵀ with the diagonal p_i(1 − p_i) summed as Σ_{j≠i} p_i p_j: no cancellation
    # where the softmax saturates (1 − p_i is then far below eps relative to p_i)
    outer = p[:, :, None] * p[:, None, :]
    off = outer.masked_fill(torch.eye(p.shape[-1], dtype=torch.bool, device=p.device), 0.0)
    hess = torch.diag_embed(off.sum(-1)) - off
    return grad, hess * (Q[..., None] / denominator)


def block_diagonal(blocks: Tensor) -> Tensor:
    """The dense block-diagonal matrix of ``blocks`` (R × n × n), without a loop over blocks."""
    R, n, _ = blocks.shape
    eye = torch.eye(R, dtype=blocks.dtype, device=blocks.device)
    return torch.einsum("rs,rij->risj", eye, blocks).reshape(R * n, R * n)


def _n_classes(z: Tensor) -> int:
    return z.shape[1] if z.dim() >= 2 else z.shape[0]


def _index_shape(z: Tensor) -> tuple[int, ...]:
    return tuple(z.shape[:1] + z.shape[2:]) if z.dim() >= 2 else ()


def _class_last(t: Tensor) -> Tensor:
    """Move the class dimension (1, or 0 for unbatched ``(C,)``) last."""
    return t.movedim(1, -1) if t.dim() >= 2 else t


def _class_back(rows: Tensor, shape: torch.Size) -> Tensor:
    """Inverse of ``_class_last(t).reshape(-1, C)`` for a tensor ``t`` of ``shape``."""
    if len(shape) < 2:
        return rows.reshape(shape)
    moved = (shape[0],) + tuple(shape[2:]) + (shape[1],)
    return rows.reshape(moved).movedim(-1, 1)
