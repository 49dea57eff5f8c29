"""A weighting's own random stream, seeded from torch's global RNG and checkpointed."""

from __future__ import annotations

import torch
from torch import Tensor


def new_generator(seed: int | None) -> torch.Generator:
    """A CPU generator; without a seed it draws one from torch's global RNG.

    Drawing from the global RNG makes ``torch.manual_seed`` reproduce whole runs.
    """
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed: expected a non-negative int or None, got {seed!r}")
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def derived_generator(parent: torch.Generator) -> torch.Generator:
    """A generator seeded from ``parent`` (so copies of a weighting get distinct streams)."""
    seed = int(torch.randint(0, 2**62, (1,), generator=parent).item())
    return new_generator(seed)


def generator_state(generator: torch.Generator) -> Tensor:
    return generator.get_state().clone()


def set_generator_state(generator: torch.Generator, state: object) -> None:
    if not isinstance(state, Tensor) or state.dtype != torch.uint8:
        raise TypeError(f"state_dict: rng_state should be a uint8 tensor, got {state!r:.80}")
    generator.set_state(state.detach().cpu().clone())


def random_orders(generator: torch.Generator, m: int) -> Tensor:
    """Row i: the tasks other than i in a random order (one permutation per task)."""
    keys = torch.rand(m, m, generator=generator, dtype=torch.float64)
    keys.fill_diagonal_(2.0)  # task i itself sorts last and is dropped
    return keys.argsort(dim=1)[:, : m - 1]
