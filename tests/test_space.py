import copy
import json

import numpy as np
import pytest

from edgec.errors import ConfigError
from edgec.search.space import BlockConfig, Candidate, QuantPolicy, SubnetConfig, SupernetSpec
from edgec.search.strategy import make_candidate


def test_block_names_round_trip():
    for name in ("k3_e1", "k5_e6", "skip"):
        assert BlockConfig.from_name(name).name == name
    with pytest.raises(ConfigError, match="bad block op"):
        BlockConfig.from_name("k7_e6")


def test_candidate_json_round_trip_is_stable_and_does_not_mutate(spec8):
    rng = np.random.default_rng(1)
    for _ in range(20):
        subnet = spec8.sample(rng)
        policy = QuantPolicy(tuple((n, "int8" if rng.random() < 0.5 else "fp32") for n in spec8.layers_of(subnet)))
        c = Candidate(subnet, policy)
        d = c.to_dict()
        frozen = copy.deepcopy(d)
        back = Candidate.from_dict(json.loads(json.dumps(d)))
        assert back == c and back.id == c.id
        assert d == frozen
    assert SupernetSpec.from_dict(json.loads(json.dumps(spec8.to_dict()))) == spec8


def test_candidate_id_ignores_layers_the_subnet_lacks(spec8):
    small = spec8.smallest()
    a = make_candidate(spec8, small, QuantPolicy.uniform(spec8.quantizable_layers(), "int8"))
    b = make_candidate(spec8, small, QuantPolicy.uniform(spec8.layers_of(small), "int8"))
    assert a.id == b.id
    assert set(a.policy.to_dict()) == set(spec8.layers_of(small))
    assert a.id != make_candidate(spec8, small, QuantPolicy()).id


def test_layers_of_matches_block_choices(spec8):
    layers = spec8.layers_of(spec8.smallest())
    # three k3_e1 blocks: dw + project each (no expand), plus stem and classifier
    assert len(layers) == 2 + 3 * 2
    assert all(".expand" not in n for n in layers)
    assert len(spec8.layers_of(spec8.largest())) == len(spec8.quantizable_layers())


def test_validate_refuses_misfits(spec8):
    bad_width = SubnetConfig(spec8.largest().blocks, (16, 32, 100))
    with pytest.raises(ConfigError, match="width 100"):
        spec8.validate(bad_width)
    blocks = list(spec8.largest().blocks)
    blocks[0] = BlockConfig()
    with pytest.raises(ConfigError, match="cannot be skipped"):
        spec8.validate(SubnetConfig(tuple(blocks), spec8.largest().widths))


def test_bad_precision_is_refused():
    with pytest.raises(ConfigError, match="int4"):
        QuantPolicy((("stem", "int4"),))


def test_growth_ladder_grows_the_smallest_subnet_one_elastic_dimension_at_a_time(spec8):
    small = spec8.smallest()
    ladder = spec8.growth_ladder()
    assert len(ladder) == len(set(ladder)) and small not in ladder and spec8.largest() not in ladder
    kinds = set()
    for arch in ladder:
        spec8.validate(arch)
        changed_blocks = [(a, b) for a, b in zip(small.blocks, arch.blocks) if a != b]
        if arch.widths != small.widths:  # wider: same blocks, every stage at a larger choice
            assert not changed_blocks and all(w > v for w, v in zip(arch.widths, small.widths))
            kinds.add("width")
        elif all(a.skip for a, _ in changed_blocks):  # deeper: the skipped blocks kept, as the smallest op
            assert all(b.name == "k3_e1" for b in arch.blocks)
            kinds.add("depth")
        else:  # the kept blocks changed, one of kernel / expansion
            assert all(not a.skip and not b.skip for a, b in changed_blocks)
            assert len({(b.kernel != a.kernel, b.expansion != a.expansion) for a, b in changed_blocks}) == 1
            kinds.add("kernel" if changed_blocks[0][1].kernel != changed_blocks[0][0].kernel else "expansion")
    assert kinds == {"width", "depth", "kernel", "expansion"}
    assert sorted(b.expansion for b in (a.blocks[0] for a in ladder) if b.kernel == 3 and b.expansion > 1) == [3, 6]
