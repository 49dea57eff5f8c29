"""The contract every weighting follows.

A weighting turns the statistic it declares in :attr:`Weighting.needs` into task weights ``w``
(the update of its group's shared parameters is ``d = w^T J``). Loss-balancing weightings
instead (or in addition) scale the losses with :meth:`Weighting.loss_weights`.

All state lives in plain tensors and Python scalars returned by :meth:`Weighting.state_dict`,
so a checkpoint loads with ``torch.load(weights_only=True)`` and resumes bit-identically.
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

Need = Literal["losses", "gramian", "jacobian"]


class Weighting:
    """Base class of all weightings.

    Subclasses set :attr:`needs` and implement :meth:`loss_weights` (``needs == "losses"``),
    :meth:`weights_from_gramian` (``"gramian"``) or :meth:`weights_from_jacobian`
    (``"jacobian"``). Stateful subclasses fix the number of tasks on their first call and
    refuse another one afterwards.
    """

    #: What the weighting reads: the loss values only, the group's Gramian ``J J^T``, or the
    #: group's per-task gradients themselves.
    needs: ClassVar[Need] = "losses"
    #: Whether the weighting keeps state between steps (then the number of tasks is fixed).
    stateful: ClassVar[bool] = False

    def __init__(self) -> None:
        self.n_tasks: int | None = None

    # ----------------------------------------------------------------- hyperparameters
    def hyperparameters(self) -> dict[str, Any]:
        """The constructor arguments, as plain Python values (saved in checkpoints)."""
        return {}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hyperparameters().items())
        return f"{type(self).__name__}({args})"

    # ----------------------------------------------------------------- task count
    def check_n_tasks(self, n_tasks: int) -> None:
        """Raise if a stateful weighting built for another number of tasks is called."""
        if self.stateful and self.n_tasks is not None and n_tasks != self.n_tasks:
            raise ValueError(
                f"losses: {self!r} keeps state for {self.n_tasks} tasks, got {n_tasks} losses; "
                "a stateful weighting needs the same number of losses at every step"
            )

    # ----------------------------------------------------------------- the statistic -> weights
    def loss_weights(self, losses: Tensor) -> Tensor | None:
        """Factors ``c`` that scale each task's loss (and so its gradient), or None for none.

        ``losses`` holds the detached loss values (float64). Must not change any state.
        """
        return None

    def weights_from_gramian(self, gramian: Tensor, losses: Tensor) -> Tensor:
        """Task weights from the group's Gramian (float64, ``m x m``)."""
        raise NotImplementedError

    def weights_from_jacobian(self, jacobian: list[Tensor], losses: Tensor) -> Tensor:
        """Task weights from the group's per-task gradients (one ``[m, *shape]`` per tensor)."""
        raise NotImplementedError

    # ----------------------------------------------------------------- learnable loss scales
    def learnable_parameters(self) -> list[Tensor]:
        """Tensors the base optimizer must train (e.g. IMTL-L's log-scales); empty if none."""
        return []

    def ensure_parameters(self, n_tasks: int) -> list[Tensor]:
        """Create the learnable tensors for ``n_tasks`` tasks if missing; return the new ones."""
        return []

    def accumulate_parameter_grads(self, losses: Tensor) -> None:
        """Add the gradient of the weighting's own objective to its learnable tensors."""

    def parameter_group_options(self) -> dict[str, Any]:
        """Options (e.g. ``lr``) for the param group that holds :meth:`learnable_parameters`."""
        return {}

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """All state as tensors and Python scalars (``n_tasks`` included)."""
        return {"n_tasks": self.n_tasks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (tensors are copied, never aliased)."""
        self.check_state_dict(state)
        self.n_tasks = state["n_tasks"]

    def check_state_dict(self, state: dict[str, Any]) -> None:
        """Raise ValueError if ``state`` cannot be loaded into this weighting."""
        expected = set(self.state_dict())
        missing = expected - set(state)
        if missing:
            raise ValueError(
                f"state_dict: the state of {self!r} lacks {sorted(missing)}; "
                f"got keys {sorted(state)}"
            )

    def spawn(self) -> Weighting:
        """A fresh copy with its own state, used for every group that names no weighting."""
        return copy.deepcopy(self)


def check_positive(name: str, value: float) -> float:
    """Validate a strictly positive finite hyperparameter and return it as float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a positive number, got {type(value).__name__}")
    if not (value > 0 and value < float("inf")):
        raise ValueError(f"{name}: expected a positive finite number, got {value!r}")
    return float(value)


def check_unit_interval(name: str, value: float) -> float:
    """Validate a hyperparameter in [0, 1] and return it as float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a number in [0, 1], got {type(value).__name__}")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name}: expected a number in [0, 1], got {value!r}")
    return float(value)


def copy_tensor_state(target: Tensor | None, source: Any, name: str) -> Tensor:
    """A private copy of a saved tensor, checked against the shape of ``target`` if any."""
    if not isinstance(source, Tensor):
        raise TypeError(f"state_dict: {name} should be a tensor, got {type(source).__name__}")
    if target is not None and target.shape != source.shape:
        raise ValueError(
            f"state_dict: {name} has shape {tuple(source.shape)}, "
            f"expected {tuple(target.shape)}"
        )
    return source.detach().clone()


def to_float64(values: Tensor) -> Tensor:
    """Cast to float64 on the same device (the small m x m problems are solved in float64)."""
    return values.detach().to(torch.float64)
