"""Data sets by name: `load(name, device=..., validation=..., **options) -> Dataset`.

- "digits": the 1797 8 x 8 handwritten digits bundled with scikit-learn (no download), scaled
  to [0, 1], shape [N, 1, 8, 8]; a stratified split (`test_fraction` 0.2, `split_seed` 0).
- "mnist1d": MNIST-1D (Greydanus 2020), made by the `mnist1d` package's procedural generator
  (`mnist1d.data.make_dataset`, never its download path), shape [N, 1, 40]. The options are
  the generator's arguments (`mnist1d.data.get_dataset_args()`, `url` excepted):
  `num_samples` (5000: 4000 train / 1000 test at `train_split` 0.8; any multiple of 10,
  since it makes num_samples // 10 per class), `seed` 42, the noise and shape parameters.
  Each configuration is generated once and cached on disk (`cache_dir()`), keyed by a hash
  of the arguments and the mnist1d version.
- "teacher-student": x ~ N(0, I) of `features` dimensions, labelled by the argmax of a random
  two-layer tanh teacher network (`hidden` units, `classes` outputs) drawn from `teacher_seed`;
  `train` and `test` examples drawn from `seed`. Learnable by construction (a student of the
  teacher's shape can reach 100%), with the difficulty set by `features` and `hidden`.

Every split is deterministic. `validation` (a fraction in [0, 1)) holds out that part of the
training set, chosen by a fixed permutation (`validation_seed` 0), as `Dataset.validation`.
Tensors are float32 inputs and int64 labels on `device`. Loaded data sets are kept in memory
per process (keyed by name, options and device), so that a worker running many runs reads
them once: treat the tensors as read-only.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import random
import tempfile
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ..pruning.schedules import check_int, check_real

_OWNER = "dynasparse.experiments.data"
Split = tuple[torch.Tensor, torch.Tensor]


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A classification data set: (inputs, labels) per split, the number of classes and the
    resolved options (defaults filled in) that made it."""

    name: str
    options: dict
    train: Split
    test: Split
    classes: int
    validation: Split | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one example (without the batch dimension)."""
        return tuple(self.train[0].shape[1:])

    @property
    def device(self) -> torch.device:
        return self.train[0].device

    def to(self, device: torch.device | str) -> Dataset:
        def move(split):
            return None if split is None else (split[0].to(device), split[1].to(device))

        return dataclasses.replace(self, train=move(self.train), test=move(self.test),
                                   validation=move(self.validation))


def cache_dir() -> Path:
    """Where generated data sets are cached: $DYNASPARSE_CACHE, else ~/.cache/dynasparse."""
    root = os.environ.get("DYNASPARSE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "dynasparse")
    return Path(root) / "data"


def _check_options(name: str, options: dict, defaults: dict) -> dict:
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise TypeError(f"{_OWNER}: data set {name!r} has no option(s) {', '.join(map(repr, unknown))}; its options "
                        f"are {', '.join(sorted(defaults))}")
    return {**defaults, **options}


# -- digits --------------------------------------------------------------------------------

_DIGITS_DEFAULTS = {"test_fraction": 0.2, "split_seed": 0}


def _digits(options: dict) -> tuple[Split, Split, int]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    check_real(_OWNER, "digits option test_fraction", options["test_fraction"], "(0, 1)")
    check_int(_OWNER, "digits option split_seed", options["split_seed"], 0, 2**32 - 1)
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    train, test = train_test_split(list(range(len(labels))), test_size=options["test_fraction"],
                                   random_state=options["split_seed"], stratify=digits.target)
    train, test = torch.tensor(train), torch.tensor(test)
    return (images[train], labels[train]), (images[test], labels[test]), 10


# -- MNIST-1D ------------------------------------------------------------------------------

def _mnist1d_defaults() -> dict:
    from mnist1d.data import get_dataset_args

    defaults = get_dataset_args(as_dict=True)
    del defaults["url"]  # the download path is never taken
    return defaults


def _mnist1d_args(options: dict) -> dict:
    if "url" in options:
        raise TypeError(f"{_OWNER}: mnist1d option 'url' is not accepted: the data set is always generated "
                        "offline (mnist1d.data.make_dataset), never downloaded")
    args = _check_options("mnist1d", options, _mnist1d_defaults())
    check_int(_OWNER, "mnist1d option num_samples", args["num_samples"], 10)
    if args["num_samples"] % 10:
        raise ValueError(f"{_OWNER}: mnist1d option num_samples must be a multiple of 10 (the generator makes "
                         f"num_samples // 10 examples per class), got {args['num_samples']}")
    check_real(_OWNER, "mnist1d option train_split", args["train_split"], "(0, 1)")
    check_int(_OWNER, "mnist1d option seed", args["seed"], 0, 2**32 - 1)
    check_int(_OWNER, "mnist1d option final_seq_length", args["final_seq_length"], 1)
    train = int(args["num_samples"] * args["train_split"])
    if not 0 < train < args["num_samples"]:
        raise ValueError(f"{_OWNER}: mnist1d options num_samples={args['num_samples']}, "
                         f"train_split={args['train_split']} leave an empty split")
    # JSON form: tuples become lists, as the cache key and the run specs see them.
    return json.loads(json.dumps(args))


def _mnist1d_key(args: dict) -> str:
    from importlib.metadata import version

    text = json.dumps({"args": args, "mnist1d": version("mnist1d")}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _generate_mnist1d(args: dict) -> dict[str, np.ndarray]:
    from mnist1d.data import make_dataset
    from mnist1d.utils import ObjectView

    # The generator seeds the global numpy and random states: the caller's are restored after.
    numpy_state, python_state = np.random.get_state(), random.getstate()
    try:
        made = make_dataset(ObjectView(dict(args)))
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)
    return {"x": np.asarray(made["x"], dtype=np.float32), "y": np.asarray(made["y"], dtype=np.int64),
            "x_test": np.asarray(made["x_test"], dtype=np.float32),
            "y_test": np.asarray(made["y_test"], dtype=np.int64)}


def _read_cache(path: Path, args: dict) -> dict[str, np.ndarray] | None:
    """The cached arrays, or None when the file is missing, unreadable or for other arguments
    (then it is regenerated)."""
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as stored:
            arrays = {key: stored[key] for key in ("x", "y", "x_test", "y_test")}
            stored_args = json.loads(str(stored["args"]))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
        warnings.warn(f"{_OWNER}: the cached MNIST-1D file {path} is unreadable ({error}); generating it again",
                      stacklevel=4)
        return None
    if stored_args != args:
        warnings.warn(f"{_OWNER}: the cached MNIST-1D file {path} holds other arguments; generating it again",
                      stacklevel=4)
        return None
    return arrays


def mnist1d_path(**options) -> Path:
    """The cache file of an MNIST-1D configuration (it may not exist yet)."""
    args = _mnist1d_args(options)
    return cache_dir() / f"mnist1d-{_mnist1d_key(args)}.npz"


def _mnist1d(options: dict) -> tuple[Split, Split, int]:
    args = _mnist1d_args(options)
    path = mnist1d_path(**options)
    arrays = _read_cache(path, args)
    if arrays is None:
        arrays = _generate_mnist1d(args)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Written under a temporary name and renamed: processes generating the same
        # configuration at once never see each other's partial file.
        handle, temporary = tempfile.mkstemp(dir=path.parent, suffix=".npz.tmp")
        try:
            with os.fdopen(handle, "wb") as file:
                np.savez(file, args=np.array(json.dumps(args, sort_keys=True)), **arrays)
            os.replace(temporary, path)
        except BaseException:
            os.unlink(temporary)
            raise

    def split(x, y):
        return torch.from_numpy(x).unsqueeze(1), torch.from_numpy(y)

    return split(arrays["x"], arrays["y"]), split(arrays["x_test"], arrays["y_test"]), 10


# -- teacher-student -----------------------------------------------------------------------

_TEACHER_DEFAULTS = {"features": 16, "hidden": 32, "classes": 4, "train": 2000, "test": 1000, "teacher_seed": 0,
                     "seed": 0}


def _teacher_student(options: dict) -> tuple[Split, Split, int]:
    for key in ("features", "hidden", "train", "test"):
        check_int(_OWNER, f"teacher-student option {key}", options[key], 1)
    check_int(_OWNER, "teacher-student option classes", options["classes"], 2)
    for key in ("teacher_seed", "seed"):
        check_int(_OWNER, f"teacher-student option {key}", options[key], 0, 2**63 - 1)
    features, hidden, classes = options["features"], options["hidden"], options["classes"]
    teacher = torch.Generator().manual_seed(options["teacher_seed"])
    w1 = torch.randn(features, hidden, generator=teacher, dtype=torch.float64) / features ** 0.5
    w2 = torch.randn(hidden, classes, generator=teacher, dtype=torch.float64) / hidden ** 0.5
    draws = torch.Generator().manual_seed(options["seed"])
    x = torch.randn(options["train"] + options["test"], features, generator=draws, dtype=torch.float64)
    y = (torch.tanh(x @ w1) @ w2).argmax(1)
    x = x.float()
    return (x[:options["train"]], y[:options["train"]]), (x[options["train"]:], y[options["train"]:]), classes


# -- the registry --------------------------------------------------------------------------

_DATASETS: dict[str, tuple[Callable[[dict], tuple[Split, Split, int]], Callable[[], dict]]] = {
    "digits": (_digits, lambda: dict(_DIGITS_DEFAULTS)),
    "mnist1d": (_mnist1d, _mnist1d_defaults),
    "teacher-student": (_teacher_student, lambda: dict(_TEACHER_DEFAULTS)),
}


def available() -> list[str]:
    return sorted(_DATASETS)


def _builder(name: str):
    if name not in _DATASETS:
        raise ValueError(f"{_OWNER}: unknown data set {name!r}; available: {', '.join(available())}")
    return _DATASETS[name]


def resolve(name: str, **options) -> dict:
    """The options of data set `name` with the defaults filled in, in JSON form (validated)."""
    _, defaults = _builder(name)
    validation = options.pop("validation", 0.0)
    validation_seed = options.pop("validation_seed", 0)
    check_real(_OWNER, "validation", validation, "[0, 1)")
    check_int(_OWNER, "validation_seed", validation_seed, 0, 2**63 - 1)
    if name == "mnist1d":
        resolved = _mnist1d_args(options)
    else:
        resolved = json.loads(json.dumps(_check_options(name, options, defaults())))
    return {**resolved, "validation": float(validation), "validation_seed": validation_seed}


@functools.lru_cache(maxsize=8)
def _load_cpu(name: str, key: str) -> Dataset:
    options = json.loads(key)
    build, _ = _builder(name)
    base = {k: v for k, v in options.items() if k not in ("validation", "validation_seed")}
    train, test, classes = build(base)
    validation = None
    if options["validation"] > 0:
        order = torch.randperm(len(train[1]), generator=torch.Generator().manual_seed(options["validation_seed"]))
        held = round(options["validation"] * len(order))
        if not 0 < held < len(order):
            raise ValueError(f"{_OWNER}: validation={options['validation']} of {len(order)} training examples "
                             "leaves an empty split")
        validation = (train[0][order[:held]], train[1][order[:held]])
        train = (train[0][order[held:]], train[1][order[held:]])
    return Dataset(name, options, train, test, classes, validation)


def load(name: str, *, device: torch.device | str = "cpu", **options) -> Dataset:
    """Data set `name` with `options` (see the module docstring), its tensors on `device`."""
    if not isinstance(name, str):
        raise TypeError(f"{_OWNER}: name must be a str, got {type(name).__name__}")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"{_OWNER}: device must be a torch device, got {device!r}") from None
    resolved = resolve(name, **options)
    dataset = _load_cpu(name, json.dumps(resolved, sort_keys=True))
    return dataset if device.type == "cpu" else dataset.to(device)


def prepare(name: str, **options) -> None:
    """Make sure data set `name` is generated and cached (before starting workers that would
    each generate it)."""
    load(name, **options)
