from edgec.search.pareto import dominates, pareto_front


def test_dominates():
    assert dominates((1, 1), (1, 2)) and not dominates((1, 2), (1, 2)) and not dominates((0, 3), (1, 2))


def test_pareto_front_mixed_directions():
    # (accuracy ↑, latency ↓)
    points = [(0.9, 10.0), (0.95, 20.0), (0.85, 5.0), (0.8, 30.0), (0.9, 12.0), (0.95, 20.0)]
    assert pareto_front(points, [True, False]) == [0, 1, 2, 5]
