"""mtlopt: multi-task learning as a one-line change to a PyTorch optimizer.

``MultiTaskOptimizer(base_optimizer, weighting=...)`` wraps any ``torch.optim`` optimizer;
``opt.step(losses)`` computes the per-task gradients, applies each param group's weighting
(GradVac, IMTL, ExcessMTL, ...), writes ``.grad`` and steps the base optimizer.
"""

from .grouping import per_layer, per_network, per_tensor, together
from .losses import NonFiniteError
from .optimizer import MultiTaskOptimizer

__all__ = [
    "MultiTaskOptimizer",
    "NonFiniteError",
    "per_layer",
    "per_network",
    "per_tensor",
    "together",
]
__version__ = "0.1.0"
