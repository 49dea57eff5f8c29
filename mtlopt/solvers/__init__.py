"""The small m x m problems of the weightings, solved in torch on the Gramian's device.

One module per problem; everything works in float64 and avoids host synchronisation.
"""

from __future__ import annotations

from .linear import gramian_rtol, pinv_solve
from .simplex import project_simplex

__all__ = ["gramian_rtol", "pinv_solve", "project_simplex"]
