"""The real datasets edgec runs on, read locally (no download at run time).

- ``digits``: scikit-learn's bundled 8×8 handwritten digits (1,797 images, values
  0..16). Test split: ``train_test_split(test_size=0.2, random_state=0, stratify=y)``;
  the validation split is carved from the training part the same way (20%,
  ``random_state=1``). Pixels scaled by 1/16 to [0, 1].
- ``fashion-mnist``: Fashion-MNIST (Xiao et al. 2017) from its four IDX ``.gz``
  files (Debian package ``dataset-fashion-mnist``, default directory
  ``/usr/share/datasets/fashion-mnist``). The official 10k test set is the test
  split; the validation split is 5,000 images carved from the 60k training set
  (stratified, ``random_state=1``). Pixels scaled by 1/255 to [0, 1].

Every split is ``x: (N, 1, H, W) float32 in [0, 1]`` and ``y: (N,) int64``.
"""

from __future__ import annotations

import gzip
import hashlib
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgec.errors import ConfigError, DataError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {
    "train_x": "train-images-idx3-ubyte.gz", "train_y": "train-labels-idx1-ubyte.gz",
    "test_x": "t10k-images-idx3-ubyte.gz", "test_y": "t10k-labels-idx1-ubyte.gz",
}
DATASETS = ("digits", "fashion-mnist")
FASHION_MNIST_VAL = 5000   # validation images carved from the training set
MIN_TRAIN_IMAGES = 256     # at least one calibration set must remain for training


@dataclass(frozen=True)
class Dataset:
    """Train / validation / test splits plus how they were made (for the report)."""

    name: str
    train_x: np.ndarray
    train_y: np.ndarray
    val_x: np.ndarray
    val_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    num_classes: int
    provenance: dict = field(default_factory=dict)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return tuple(self.train_x.shape[1:])  # type: ignore[return-value]

    def fingerprint(self) -> str:
        """SHA-256 (16 hex digits) of every split's bytes."""
        h = hashlib.sha256()
        for a in (self.train_x, self.train_y, self.val_x, self.val_y, self.test_x, self.test_y):
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()[:16]


def load_dataset(name: str, data_dir: str | Path | None = None) -> Dataset:
    """Load ``digits`` or ``fashion-mnist``. Raises :class:`ConfigError` / :class:`DataError`."""
    if name == "digits":
        return load_digits()
    if name == "fashion-mnist":
        return load_fashion_mnist(Path(data_dir) if data_dir else FASHION_MNIST_DIR)
    raise ConfigError(f"unknown dataset {name!r}", f"known datasets: {', '.join(DATASETS)}",
                      "pass --dataset digits or --dataset fashion-mnist")


def load_digits() -> Dataset:
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    bunch = sk_load_digits()
    x = (bunch.data.reshape(-1, 1, 8, 8) / 16.0).astype(np.float32)
    y = bunch.target.astype(np.int64)
    trx, tex, try_, tey = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    trx, vax, try_, vay = train_test_split(trx, try_, test_size=0.2, random_state=1, stratify=try_)
    return Dataset("digits", trx, try_, vax, vay, tex, tey, 10, {
        "source": "sklearn.datasets.load_digits (bundled with scikit-learn)",
        "preprocessing": "pixels / 16 → float32 in [0, 1], shape (N, 1, 8, 8)",
        "test_split": "train_test_split(test_size=0.2, random_state=0, stratify=y)",
        "val_split": "20% of the training part: train_test_split(test_size=0.2, random_state=1, stratify=y)",
        "sizes": {"train": len(trx), "val": len(vax), "test": len(tex)},
    })


def read_idx(path: Path) -> np.ndarray:
    """Read one (optionally gzipped) IDX file of unsigned bytes. Raises :class:`DataError`."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
        zero, dtype, ndim = struct.unpack(">HBB", data[:4])
        if zero != 0 or dtype != 0x08:
            raise ValueError("not an IDX file of unsigned bytes")
        if not 1 <= ndim <= 4:
            raise ValueError(f"{ndim} dimensions in the header (IDX data has 1 to 4)")
        dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
        count = int(np.prod(dims, dtype=np.int64))
        if count != len(data) - 4 - 4 * ndim:
            raise ValueError(f"header says {count} bytes of data, file has {len(data) - 4 - 4 * ndim}")
        body = np.frombuffer(data, dtype=np.uint8, count=count, offset=4 + 4 * ndim)
    except (OSError, ValueError, struct.error, EOFError, zlib.error) as e:
        raise DataError(f"cannot read IDX file {path}", str(e), "reinstall the dataset package") from None
    return body.reshape(dims)


def check_split(name: str, x: np.ndarray, y: np.ndarray, num_classes: int, where: str) -> None:
    """Raise :class:`DataError` unless ``x`` is (N ≥ 1, C, H, W) finite float32 and ``y`` (N,) ints in range."""
    fix = f"check {where}"
    if x.ndim != 4 or x.dtype != np.float32 or len(x) == 0:
        raise DataError(f"{name} images from {where} are unusable",
                        f"expected (N ≥ 1, C, H, W) float32, got {x.shape} {x.dtype}", fix)
    if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{name} labels from {where} are unusable",
                        f"expected ({len(x)},) integers, got {y.shape} {y.dtype}", fix)
    if not np.isfinite(x).all():
        raise DataError(f"{name} images from {where} contain NaN or Inf", "", fix)
    if y.min() < 0 or y.max() >= num_classes:
        raise DataError(f"{name} labels from {where} are out of range",
                        f"expected 0..{num_classes - 1}, got {y.min()}..{y.max()}", fix)


def load_fashion_mnist(directory: Path = FASHION_MNIST_DIR) -> Dataset:
    from sklearn.model_selection import train_test_split

    missing = [n for n in FASHION_MNIST_FILES.values() if not (directory / n).is_file()]
    if missing:
        raise DataError(f"Fashion-MNIST not found in {directory}", f"missing {', '.join(missing)}",
                        "install it with 'apt-get install dataset-fashion-mnist' or pass --data-dir DIR")
    arrays = {k: read_idx(directory / n) for k, n in FASHION_MNIST_FILES.items()}
    shapes = {k: a.shape for k, a in arrays.items()}
    if (len(shapes["train_x"]) != 3 or len(shapes["test_x"]) != 3 or len(shapes["train_y"]) != 1
            or len(shapes["test_y"]) != 1 or shapes["train_x"][1:] != (28, 28) or shapes["test_x"][1:] != (28, 28)
            or shapes["train_x"][0] != shapes["train_y"][0] or shapes["test_x"][0] != shapes["test_y"][0]):
        raise DataError(f"Fashion-MNIST in {directory} is malformed",
                        f"expected (N, 28, 28) images with (N,) labels, got {shapes}", "reinstall the dataset package")
    if shapes["train_x"][0] < FASHION_MNIST_VAL + MIN_TRAIN_IMAGES:
        raise DataError(f"Fashion-MNIST in {directory} has too few training images",
                        f"{shapes['train_x'][0]} < {FASHION_MNIST_VAL} validation + {MIN_TRAIN_IMAGES} training",
                        "reinstall the dataset package")
    trx = (arrays["train_x"][:, None] / 255.0).astype(np.float32)
    tex = (arrays["test_x"][:, None] / 255.0).astype(np.float32)
    try_, tey = arrays["train_y"].astype(np.int64), arrays["test_y"].astype(np.int64)
    for split, x, y in (("training", trx, try_), ("test", tex, tey)):
        check_split(split, x, y, 10, str(directory))
    try:
        trx, vax, try_, vay = train_test_split(trx, try_, test_size=FASHION_MNIST_VAL, random_state=1, stratify=try_)
    except ValueError as e:
        raise DataError(f"cannot split Fashion-MNIST in {directory}", str(e), "reinstall the dataset package") from None
    return Dataset("fashion-mnist", trx, try_, vax, vay, tex, tey, 10, {
        "source": f"Fashion-MNIST IDX files in {directory}",
        "preprocessing": "pixels / 255 → float32 in [0, 1], shape (N, 1, 28, 28)",
        "test_split": "the official 10,000-image test set",
        "val_split": "5,000 images of the 60k training set: train_test_split(test_size=5000, random_state=1, stratify=y)",
        "sizes": {"train": len(trx), "val": len(vax), "test": len(tex)},
    })
