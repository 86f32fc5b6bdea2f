"""Pareto fronts over evaluated candidates (Deb et al. 2002, NSGA-II §III-A: non-domination)."""

from __future__ import annotations

from typing import Sequence


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """``a`` dominates ``b`` when it is no worse in every objective and better in one (all minimized)."""
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def pareto_front(points: Sequence[Sequence[float]], maximize: Sequence[bool]) -> list[int]:
    """Indices of the non-dominated ``points`` (each a tuple of objective values).

    ``maximize[i]`` says whether objective ``i`` is maximized. Duplicates of a
    non-dominated point are all kept. O(n² · m), fine for the hundreds of
    candidates a search evaluates.
    """
    signed = [tuple(-v if up else v for v, up in zip(p, maximize)) for p in points]
    return [i for i, p in enumerate(signed) if not any(dominates(q, p) for j, q in enumerate(signed) if j != i)]


def hypervolume(points: Sequence[Sequence[float]], maximize: Sequence[bool], reference: Sequence[float]) -> float:
    """Hypervolume dominated by ``points`` up to ``reference`` (Zitzler & Thiele 1998), in the
    objectives' own units multiplied together; points not better than ``reference`` in every
    objective add nothing. ``maximize[i]`` as in :func:`pareto_front`. Computed with pymoo's exact
    ``HV`` indicator."""
    import numpy as np
    from pymoo.indicators.hv import HV

    sign = np.array([-1.0 if up else 1.0 for up in maximize])
    ref = np.asarray(reference, dtype=np.float64) * sign
    f = np.asarray(points, dtype=np.float64).reshape(-1, len(maximize)) * sign
    f = f[np.all(f < ref, axis=1)]
    return float(HV(ref_point=ref)(f)) if len(f) else 0.0
