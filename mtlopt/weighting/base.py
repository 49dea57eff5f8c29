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

from ._rng import derived_generator

Need = Literal["losses", "gramian", "jacobian"]

#: Every concrete weighting class by name (filled by ``Weighting.__init_subclass__``).
REGISTRY: dict[str, type[Weighting]] = {}


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
    #: Mini-batches one step reads (SDMGrad, MoDo: 3). Above 1, ``step`` needs a closure that
    #: draws a fresh batch; the weighting then gets cross-batch Gramians.
    n_batches: ClassVar[int] = 1
    #: Jacobian weightings only: also hand the task heads' per-task gradients to
    #: :meth:`update_from_jacobian` (optimizer-level methods such as AdaTask).
    aggregates_task_heads: ClassVar[bool] = False
    #: Whether :meth:`observe` wants the closure's losses re-evaluated after the base step.
    wants_losses_after_step: ClassVar[bool] = False
    #: Gramian weightings whose weights depend on the Gramian, the loss values and their own
    #: small state only: off the CPU they run on a CPU copy of the Gramian (read together
    #: with the step's finiteness check; see :mod:`mtlopt.host_solve`). A subclass that
    #: overrides ``weights_from_gramian`` does not inherit it: it must set it itself.
    solves_on_host: ClassVar[bool] = False
    #: The weighting writes a finished step direction (AdaTask): the base optimizer should be
    #: plain SGD (no momentum), which only applies the group's lr and weight decay.
    expects_plain_sgd: ClassVar[bool] = False

    def __init_subclass__(cls, register: bool = True, **kwargs: Any) -> None:
        # Shared bases pass register=False (or start with "_"): only methods are listed.
        super().__init_subclass__(**kwargs)
        # New weighting code may read learnable or device tensors: no host copy unless said.
        if "weights_from_gramian" in cls.__dict__ and "solves_on_host" not in cls.__dict__:
            cls.solves_on_host = False
        if register and not cls.__name__.startswith("_"):
            REGISTRY[cls.__name__] = cls

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

        ``losses`` holds the detached loss values (float64, shape ``[m]``); the factors have
        the same shape (the optimizer refuses another one before anything moves). Must not
        change any state.
        """
        return None

    def weights_from_gramian(self, gramian: Tensor, losses: Tensor) -> Tensor:
        """Task weights from the group's Gramian (float64, ``m x m``)."""
        raise NotImplementedError

    def weights_from_jacobian(self, jacobian: list[Tensor], losses: Tensor) -> Tensor:
        """Task weights from the group's per-task gradients (one ``[m, *shape]`` per tensor)."""
        raise NotImplementedError

    def update_from_jacobian(
        self, jacobian: list[Tensor], losses: Tensor, masks: list[int]
    ) -> tuple[list[Tensor], Tensor | None]:
        """One update per tensor from its per-task gradients, plus the task weights if any.

        Override for methods whose update is not ``w^T J`` (per-coordinate rules, momentum
        on gradients). ``masks[k]`` has bit ``i`` set when task ``i`` reaches tensor ``k``;
        the tensors are the group's shared ones, and its task heads too when
        :attr:`aggregates_task_heads` is set. The default is ``w^T J`` with
        :meth:`weights_from_jacobian`.
        """
        weights = self.weights_from_jacobian(jacobian, losses)
        return [combine(weights, block) for block in jacobian], weights

    def check_layout(self, jacobian: list[Tensor], masks: list[int] | None = None) -> None:
        """Raise ValueError if per-tensor state does not fit the group's shared tensors.

        Called for every group before any weighting runs, so a misfit in one group cannot
        leave another group's state half-updated. ``masks`` are the tensors' task masks (bit
        i: task i reaches it), where the caller knows them. Weightings without per-tensor
        state accept anything.
        """

    def weights_from_cross_gramians(self, gramians: Tensor, losses: Tensor) -> Tensor:
        """Task weights for the first batch's Jacobian from ``gramians[p, q] = J_p J_q^T``.

        Only for ``n_batches > 1``: ``gramians`` is ``[b, b, m, m]`` float64 over the ``b``
        mini-batches of the step (batch 0 is the one passed to ``step``).
        """
        raise NotImplementedError

    def observe(self, losses: Tensor, after_step: bool) -> None:
        """See the loss values of a committed step (``after_step=False``, before the base
        step) and, if :attr:`wants_losses_after_step` and ``step`` got a closure, the
        closure's losses re-evaluated after the base step (``after_step=True``)."""

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
        """A fresh copy with its own state, used for every group that names no weighting.

        Every random generator of the copy is reseeded from the original's, so copies draw
        distinct (and reproducible) streams.
        """
        clone = copy.deepcopy(self)
        for name, value in vars(self).items():
            if isinstance(value, torch.Generator):
                setattr(clone, name, derived_generator(value))
        return clone


def snapshot(state: Any) -> Any:
    """A copy of a state dict that later in-place changes cannot reach.

    For what the :meth:`Weighting.state_dict` contract allows (plain tensors, Python
    scalars and strings, in plain dicts, lists and tuples) it copies the containers, clones
    the tensors and shares the immutable values: ``copy.deepcopy`` gives the same for about
    ten times the time (its memo and reduce protocol cost about 0.1 ms a step on a GradVac
    state). Anything else (dict subclasses, parameters, tensors that require grad, other
    objects) goes through ``copy.deepcopy``. Aliases inside the state are not kept.
    """
    kind = type(state)
    if kind is Tensor and not state.requires_grad:
        return state.clone()
    if kind is dict:
        return {key: snapshot(value) for key, value in state.items()}
    if kind is list or kind is tuple:
        return kind(snapshot(value) for value in state)
    if state is None or kind in (bool, int, float, str):
        return state
    return copy.deepcopy(state)


def combine(weights: Tensor, block: Tensor) -> Tensor:
    """``sum_i weights_i block_i``: one tensor's update from its per-task gradients."""
    return torch.tensordot(weights.to(block.dtype), block, dims=1)


def check_positive(name: str, value: float) -> float:
    """Validate a strictly positive finite hyperparameter and return it as float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a positive number, got {type(value).__name__}")
    if not (value > 0 and value < float("inf")):
        raise ValueError(f"{name}: expected a positive finite number, got {value!r}")
    return float(value)


def check_non_negative(name: str, value: float) -> float:
    """Validate a non-negative finite hyperparameter and return it as float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a non-negative number, got {type(value).__name__}")
    if not 0.0 <= value < float("inf"):
        raise ValueError(f"{name}: expected a non-negative finite number, got {value!r}")
    return float(value)


def check_positive_int(name: str, value: object) -> int:
    """Validate a positive integer hyperparameter."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected a positive int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value}")
    return value


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
            f"state_dict: {name} has shape {tuple(source.shape)}, expected {tuple(target.shape)}"
        )
    return source.detach().clone()


def check_state_layout(
    holder: str, state: list[Tensor] | None, jacobian: list[Tensor], per_row: bool = True
) -> None:
    """Raise ValueError if per-tensor state no longer fits the group's tensors.

    ``holder`` says who keeps what (``"ExcessMTL keeps squared-gradient sums"``). With
    ``per_row=False`` only the tensors' own shapes are compared, not the number of rows.
    """
    if state is None:
        return
    cut = 0 if per_row else 1
    expected = [tuple(s.shape[cut:]) for s in state]
    got = [tuple(b.shape[cut:]) for b in jacobian]
    if got != expected:
        raise ValueError(
            f"{holder} for shared tensors of shapes {expected}, got per-task gradients of "
            f"shapes {got}; the group's shared parameters must stay the same across steps"
        )


def follow_blocks(states: list[Tensor], blocks: list[Tensor]) -> list[Tensor]:
    """Per-tensor state moved to its block's device and dtype where they differ (after the
    model moved, or a checkpoint was loaded into a model of another dtype)."""
    return [
        state
        if state.device == block.device and state.dtype == block.dtype
        else state.to(device=block.device, dtype=block.dtype)
        for state, block in zip(states, blocks)
    ]


def to_float64(values: Tensor) -> Tensor:
    """Cast to float64 on the same device (the small m x m problems are solved in float64)."""
    return values.detach().to(torch.float64)
