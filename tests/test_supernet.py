import json

import numpy as np
import pytest
import torch

from edgec.search.supernet import extract_subnet
from edgec.search.train import TrainSettings, load_checkpoint, recalibrate_bn, save_checkpoint, train_supernet


def _configs(spec, n=8):
    rng = np.random.default_rng(3)
    return [spec.largest(), spec.smallest()] + [spec.sample(rng) for _ in range(n)]


def test_extracted_subnet_matches_elastic_forward(randomized_supernet, spec8):
    x = torch.rand(4, 1, 8, 8)
    for config in _configs(spec8):
        static = extract_subnet(randomized_supernet, config)
        with torch.no_grad():
            expected = randomized_supernet(x, config)
            assert torch.allclose(static(x), expected, atol=1e-5)
            assert torch.allclose(static.fused()(x), expected, atol=1e-4)


def test_extracted_subnet_has_no_dead_channels(randomized_supernet, spec8):
    small = extract_subnet(randomized_supernet, spec8.smallest())
    large = extract_subnet(randomized_supernet, spec8.largest())
    n_small = sum(p.numel() for p in small.parameters())
    n_large = sum(p.numel() for p in large.parameters())
    n_super = sum(p.numel() for p in randomized_supernet.parameters())
    assert n_small < n_large <= n_super
    # every conv's channel counts match the config exactly
    convs = [m for m in small.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs[-1].out_channels == spec8.smallest().widths[-1]


def test_training_reduces_loss_and_checkpoint_round_trips(spec8, tmp_path):
    rng = np.random.default_rng(0)
    x = rng.random((256, 1, 8, 8), dtype=np.float32)
    y = (x.reshape(256, -1).mean(1) > 0.5).astype(np.int64)  # a learnable rule
    losses = []
    net = train_supernet(spec8, x, y, TrainSettings(epochs=6, batch_size=64),
                         on_step=lambda s, t, loss: losses.append(loss))
    assert len(losses) == 24
    assert np.mean(losses[-4:]) < np.mean(losses[:4])
    save_checkpoint(net, TrainSettings(), tmp_path)
    back, meta = load_checkpoint(tmp_path)
    assert meta["spec"] == spec8.to_dict()
    xt = torch.from_numpy(x[:8])
    with torch.no_grad():
        assert torch.equal(back(xt, spec8.largest()), net(xt, spec8.largest()))


def test_recalibrate_bn_sets_subnet_statistics(randomized_supernet, spec8, images8):
    static = recalibrate_bn(extract_subnet(randomized_supernet, spec8.smallest()), images8, batch_size=100)
    stem_bn = static.stem.bn
    with torch.no_grad():
        h = static.stem.conv(torch.from_numpy(images8))
    assert torch.allclose(stem_bn.running_mean, h.mean((0, 2, 3)), atol=1e-4)
    assert not static.training


def test_recalibrate_bn_gives_training_its_momentum_back(images8):
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4, momentum=0.3))
    recalibrate_bn(net, images8, batch_size=100)
    assert net[1].momentum == 0.3
    calibrated = net[1].running_mean.clone()
    net.train()
    with torch.no_grad():  # one training batch moves the statistics by the momentum, not by 1 / (batches + 1)
        h = net[0](torch.from_numpy(images8[:50]))
        net(torch.from_numpy(images8[:50]))
    assert torch.allclose(net[1].running_mean, 0.7 * calibrated + 0.3 * h.mean((0, 2, 3)), atol=1e-5)


def test_corrupt_checkpoint_is_a_model_error(tmp_path):
    from edgec.errors import ModelError

    (tmp_path / "supernet.json").write_text("{not json")
    with pytest.raises(ModelError, match="cannot load supernet checkpoint"):
        load_checkpoint(tmp_path)


def test_interrupted_training_resumes_to_the_same_weights(spec8, tmp_path):
    rng = np.random.default_rng(0)
    x = rng.random((128, 1, 8, 8), dtype=np.float32)
    y = rng.integers(0, 10, 128)
    settings = TrainSettings(epochs=3, batch_size=64)
    reference = train_supernet(spec8, x, y, settings)

    def die_in_epoch_3(step, total, loss):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_supernet(spec8, x, y, settings, on_step=die_in_epoch_3, state_dir=tmp_path)
    assert json.loads((tmp_path / "state.json").read_text())["epochs_done"] == 2
    steps = []
    resumed = train_supernet(spec8, x, y, settings, on_step=lambda s, t, loss: steps.append(s), state_dir=tmp_path)
    assert steps == [5, 6]  # only the third epoch ran again
    for (k, a), b in zip(reference.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), k
