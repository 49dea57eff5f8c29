"""mtlopt: multi-task learning as a one-line change to a PyTorch optimizer.

``MultiTaskOptimizer(base_optimizer, weighting=...)`` wraps any ``torch.optim`` optimizer;
``opt.step(losses)`` computes the per-task gradients, applies each param group's weighting
(GradVac, IMTL, ExcessMTL, ...), writes ``.grad`` and steps the base optimizer.

Start with :class:`MultiTaskOptimizer`; the methods are in :mod:`mtlopt.weighting`, the
small solvers they share in :mod:`mtlopt.solvers`, what a step reports (for logging) in
:mod:`mtlopt.aggregation`, and param-group helpers in :mod:`mtlopt.grouping`.

The examples (``examples/`` in the repository; the README tells how to run them):

* ``multidigits.py``: two digit-reading tasks on one shared CNN, eleven weightings.

  ![Per-task test accuracy of each weighting](examples/figures/multidigits.png)

* ``toy.py``: the two-task toy problem of the CAGrad, Nash-MTL and FAMO papers, each
  method's trajectories from the papers' starting points, in parameter and loss space.

  ![Trajectories in parameter space](examples/figures/toy_parameter_space.png)

  ![Trajectories in loss space](examples/figures/toy_loss_space.png)

* ``grouping.py``: GradVac with the whole model, each network, each layer or each tensor as
  one aggregation group.

  ![Per-task test accuracy at each grouping granularity](examples/figures/grouping.png)
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
