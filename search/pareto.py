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
