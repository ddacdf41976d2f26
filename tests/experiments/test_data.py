"""Data sets: deterministic, cached, generated offline (the network blocked), validated options."""

import random
import socket

import numpy as np
import pytest
import torch

from dynasparse.experiments import data

SMALL = {"num_samples": 200, "seed": 3}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DYNASPARSE_CACHE", str(tmp_path))
    data._load_cpu.cache_clear()  # the in-memory copies would hide the disk cache
    yield tmp_path / "data"
    data._load_cpu.cache_clear()


def _reference_mnist1d(**changes):
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    for key, value in changes.items():
        setattr(args, key, value)
    return make_dataset(args)


def test_mnist1d_is_generated_with_the_network_blocked(cache, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a network connection was attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    dataset = data.load("mnist1d", **SMALL)
    assert dataset.train[0].shape == (160, 1, 40) and dataset.test[0].shape == (40, 1, 40)
    assert dataset.train[0].dtype == torch.float32 and dataset.train[1].dtype == torch.int64
    assert dataset.classes == 10 and dataset.input_shape == (1, 40)
    assert data.mnist1d_path(**SMALL).exists()


def test_mnist1d_equals_the_generator_and_leaves_global_rngs_alone(cache):
    np.random.seed(5)
    random.seed(5)
    before_np, before_py = np.random.get_state()[1].copy(), random.getstate()
    dataset = data.load("mnist1d", **SMALL)
    assert (np.random.get_state()[1] == before_np).all() and random.getstate() == before_py
    reference = _reference_mnist1d(**SMALL)
    assert torch.equal(dataset.train[0][:, 0], torch.from_numpy(reference["x"]).float())
    assert torch.equal(dataset.test[1], torch.from_numpy(reference["y_test"]))


def test_mnist1d_is_cached_on_disk_per_configuration(cache, monkeypatch):
    first = data.load("mnist1d", **SMALL)
    other = data.load("mnist1d", num_samples=200, seed=4)
    assert data.mnist1d_path(**SMALL) != data.mnist1d_path(num_samples=200, seed=4)
    assert not torch.equal(first.train[0], other.train[0])
    data._load_cpu.cache_clear()
    monkeypatch.setattr(data, "_generate_mnist1d", lambda args: pytest.fail("generated again"))
    again = data.load("mnist1d", **SMALL)
    assert torch.equal(again.train[0], first.train[0]) and torch.equal(again.test[1], first.test[1])


def test_a_damaged_cache_file_is_generated_again(cache):
    first = data.load("mnist1d", **SMALL)
    path = data.mnist1d_path(**SMALL)
    path.write_bytes(path.read_bytes()[:100])
    data._load_cpu.cache_clear()
    with pytest.warns(UserWarning, match="unreadable"):
        again = data.load("mnist1d", **SMALL)
    assert torch.equal(again.train[0], first.train[0])


def test_larger_mnist1d_and_its_option_checks(cache):
    dataset = data.load("mnist1d", num_samples=600, train_split=0.5)
    assert len(dataset.train[1]) == 300 and len(dataset.test[1]) == 300
    with pytest.raises(TypeError, match="'url' is not accepted"):
        data.load("mnist1d", url="http://example.com")
    with pytest.raises(ValueError, match="multiple of 10"):
        data.load("mnist1d", num_samples=205)
    with pytest.raises(TypeError, match="no option.*'samples'"):
        data.load("mnist1d", samples=100)


def test_digits_split_is_stratified_and_deterministic():
    dataset = data.load("digits")
    (train_x, train_y), (test_x, test_y) = dataset.train, dataset.test
    assert len(train_y) == 1437 and len(test_y) == 360 and dataset.input_shape == (1, 8, 8)
    assert float(train_x.max()) == 1.0 and float(train_x.min()) == 0.0
    assert torch.bincount(test_y).min() >= 35
    other = data.load("digits", split_seed=1)
    assert not torch.equal(other.test[1], test_y)
    assert torch.equal(data.load("digits").test[0], test_x)


def test_teacher_student_labels_follow_the_documented_teacher():
    options = {"features": 5, "hidden": 7, "classes": 3, "train": 50, "test": 20, "teacher_seed": 2, "seed": 9}
    dataset = data.load("teacher-student", **options)
    teacher = torch.Generator().manual_seed(2)
    w1 = torch.randn(5, 7, generator=teacher, dtype=torch.float64) / 5 ** 0.5
    w2 = torch.randn(7, 3, generator=teacher, dtype=torch.float64) / 7 ** 0.5
    x = torch.randn(70, 5, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    labels = (torch.tanh(x @ w1) @ w2).argmax(1)
    assert torch.equal(dataset.train[1], labels[:50]) and torch.equal(dataset.test[1], labels[50:])
    assert torch.equal(dataset.test[0], x[50:].float())
    with pytest.raises(ValueError, match="classes must be >= 2"):
        data.load("teacher-student", classes=1)


def test_validation_split_is_a_deterministic_part_of_the_training_set():
    full = data.load("teacher-student", train=101)
    held = data.load("teacher-student", train=101, validation=0.2)
    assert len(held.validation[1]) == 20 and len(held.train[1]) == 81
    rows = torch.cat([held.train[0], held.validation[0]])
    assert sorted(map(tuple, rows.tolist())) == sorted(map(tuple, full.train[0].tolist()))
    assert torch.equal(data.load("teacher-student", train=101, validation=0.2).validation[0], held.validation[0])
    assert not torch.equal(data.load("teacher-student", train=101, validation=0.2,
                                     validation_seed=1).validation[0], held.validation[0])
    with pytest.raises(ValueError, match="validation must be a number in"):
        data.load("teacher-student", validation=1.0)


def test_unknown_data_set_and_device():
    with pytest.raises(ValueError, match="unknown data set 'cifar'.*digits, mnist1d, teacher-student"):
        data.load("cifar")
    with pytest.raises(ValueError, match="device must be a torch device"):
        data.load("digits", device="gpu7")
