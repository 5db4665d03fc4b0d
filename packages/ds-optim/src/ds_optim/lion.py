"""Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms") on flat buffers."""

from __future__ import annotations

from ._optimizer import FlatOptimizer


class FusedLion(FlatOptimizer):
    """Lion: the sign of an interpolation of momentum and grad, decoupled weight decay; one fp32 state.

    Same arguments as DeepSpeed's ``FusedLion`` (``lr=1e-4`` is the usual scale: ~3-10x below AdamW's).
    ``sign(0) = 0`` as in the paper (DeepSpeed's kernel moves a zero-update element by ``+lr``).
    """

    state_names = ("exp_avg",)

    def __init__(self, params, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0, *, maximize: bool = False, backend: str | None = None):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay, maximize=maximize), backend)

    def _update(self, kernels, group, p, g, states, step, grad_scale, found_inf, out, offsets):
        beta1, beta2 = group["betas"]
        kernels.lion(p, g, states["exp_avg"], lr=group["lr"], beta1=beta1, beta2=beta2,
                     weight_decay=group["weight_decay"], maximize=group["maximize"], grad_scale=grad_scale,
                     found_inf=found_inf, out=out)
