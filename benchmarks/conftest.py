"""Options for the pytest-benchmark suite over the cases registered for `dynasparse bench`."""


def pytest_addoption(parser):
    parser.addoption("--bench-device", default="auto", choices=("auto", "cpu", "cuda"),
                     help="device for the benchmark cases (default: cuda when available, else cpu)")
