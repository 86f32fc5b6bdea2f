import gzip
import struct

import numpy as np
import pytest

from edgec.data import load_dataset, load_fashion_mnist
from edgec.errors import DataError


def test_digits_splits_and_scaling():
    ds = load_dataset("digits")
    assert ds.test_x.shape == (360, 1, 8, 8) and ds.test_x.dtype == np.float32
    assert len(ds.train_x) + len(ds.val_x) + len(ds.test_x) == 1797
    assert 0.0 <= ds.train_x.min() and ds.train_x.max() <= 1.0 and ds.train_x.max() == 1.0
    assert ds.train_y.dtype == np.int64 and set(ds.test_y) == set(range(10))
    assert "random_state=0" in ds.provenance["test_split"]
    assert load_dataset("digits").fingerprint() == ds.fingerprint()


def _write_idx(path, array):
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_reads_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (6000, 28, 28)))
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.arange(6000) % 10)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.full((100, 28, 28), 255))
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.arange(100) % 10)
    ds = load_fashion_mnist(tmp_path)
    assert ds.train_x.shape == (1000, 1, 28, 28) and ds.val_x.shape == (5000, 1, 28, 28)
    assert ds.test_x.shape == (100, 1, 28, 28) and float(ds.test_x.max()) == 1.0


def test_missing_fashion_mnist_says_how_to_install(tmp_path):
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist", tmp_path / "nowhere")


def test_corrupt_idx_is_a_data_error(tmp_path):
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                 "t10k-labels-idx1-ubyte.gz"):
        (tmp_path / name).write_bytes(b"not gzip")
    with pytest.raises(DataError, match="cannot read IDX file"):
        load_fashion_mnist(tmp_path)
