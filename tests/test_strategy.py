from edgec.search.strategy import NSGA2Search, RandomSearch


def _objectives(c):
    # a deterministic fake evaluation: bigger nets more "accurate" and slower
    work = sum(b.kernel * b.expansion for b in c.subnet.blocks) + sum(c.subnet.widths) / 16
    int8 = len(c.policy.int8_layers())
    return (work / 200, work + 0.1 * int8, float(work * 1000 - int8))


def _run(spec, seed, n=30):
    s = NSGA2Search(spec, seed=seed, population_size=8)
    ids = []
    for _ in range(n):
        c = s.ask()
        spec.validate(c.subnet)
        assert set(c.policy.to_dict()) == set(spec.layers_of(c.subnet))
        ids.append(c.id)
        s.tell(c, _objectives(c))
    return ids


def test_nsga2_is_seeded_and_replayable(spec8):
    a, b = _run(spec8, 0), _run(spec8, 0)
    assert a == b
    assert a != _run(spec8, 1)


def test_initial_candidates_come_first(spec8):
    from edgec.search.space import QuantPolicy
    from edgec.search.strategy import make_candidate

    first = make_candidate(spec8, spec8.smallest(), QuantPolicy())
    s = NSGA2Search(spec8, seed=0, population_size=4, initial=[first])
    assert s.ask().id == first.id


def test_random_search_is_seeded(spec8):
    a = [RandomSearch(spec8, 5).ask().id for _ in range(1)]
    b = [RandomSearch(spec8, 5).ask().id for _ in range(1)]
    assert a == b
