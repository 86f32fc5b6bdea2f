from edgec.search.pareto import dominates, pareto_front


def test_dominates():
    assert dominates((1, 1), (1, 2)) and not dominates((1, 2), (1, 2)) and not dominates((0, 3), (1, 2))


def test_pareto_front_mixed_directions():
    # (accuracy ↑, latency ↓)
    points = [(0.9, 10.0), (0.95, 20.0), (0.85, 5.0), (0.8, 30.0), (0.9, 12.0), (0.95, 20.0)]
    assert pareto_front(points, [True, False]) == [0, 1, 2, 5]


def test_hypervolume_of_known_fronts():
    from edgec.search.pareto import hypervolume

    # two points of a 2-D minimization front under reference (2, 2): 2×1 + 1×2 − 1×1 overlap = 3
    assert hypervolume([(0, 1), (1, 0)], [False, False], (2, 2)) == 3.0
    # maximizing the first objective flips it: accuracy 0.9 vs reference 0.8, latency 1 vs 2 → 0.1 × 1
    assert abs(hypervolume([(0.9, 1.0)], [True, False], (0.8, 2.0)) - 0.1) < 1e-12
    # dominated points and points outside the reference box add nothing
    assert hypervolume([(0, 1), (1, 0), (1, 1), (3, 0)], [False, False], (2, 2)) == 3.0
    assert hypervolume([(3, 3)], [False, False], (2, 2)) == 0.0
