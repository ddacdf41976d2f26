"""Sparse or dense, per call shape: the measured cost model behind `backend="auto"`.

A sparse layer's kernels lose to dense on small layers, small batches, dtypes without a
vectorized kernel, and wherever the mask keeps too much. A layer with backend "auto" (the
default) runs each call as the faster of its sparse kernels and the dense computation on
`w * m`, which gives the same values and the same gradients (the grad mode's). What is faster
is measured, not guessed: the first call with a new key times both ways on that call's own
input (forward, plus backward for a training call; the kernels must win by SPARSE_MARGIN),
and the result is kept, for this process and in a file shared by later ones on this machine.

The key: the layer's kind and geometry, its layout and grad mode, the density (to 0.01), the
call's rows bucketed to a power of two (convolutions: the batch bucketed, the image size
exact), dtype (autocast's when it is on), device type, CPU threads, training (grad enabled and
something requiring grad) or inference, and the weight-gradient override.

    layer = SparseLinear(128, 128, sparsity=0.9)                  # backend="auto"
    layer(x); print(layer.backend_report())                       # what each shape ran, and why
    layer.backend = "sparse"                                       # pinned: always the kernels
    dynasparse.nn.set_default_backend("sparse")                    # for layers built from now on

The default backend starts as $DYNASPARSE_BACKEND ("auto" when unset).

The file: $DYNASPARSE_COST_CACHE if set ("" keeps the model in memory only), else
~/.cache/dynasparse/costs.json; one section per machine (CPU model, core count, torch
version) and build of the native kernels, so a home directory shared between machines keeps
each machine's own choices, and a rebuilt or upgraded library measures again (the section of
the old build is dropped at the next write).
Delete it (or call `COSTS.clear()`) to measure again. Each entry keeps the machine's load
(runnable processes per core over the last minute) when it was measured: a process finding an
entry that was measured on a busy machine (load above 1) while the machine is now at most half
as busy measures again and replaces it, so timings distorted by other work do not decide for
good. Under torch.compile and torch.func a layer measures nothing: it runs the choice its last
eager call made (sparse before any).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

BACKENDS = ("auto", "sparse", "dense")
FORMAT = "dynasparse.costs/1"
# Each way is timed over about this long (at least 3, at most 25 calls after a warm-up), the
# two interleaved so that a change in the machine's load hits both alike.
_BUDGET_S = 0.004
_MIN_REPEATS, _MAX_REPEATS = 3, 25
# Above this many runnable processes per core the timings of both ways include waiting.
_BUSY_LOAD = 1.0
# The kernels run only when measured at least this much faster: a median of a few calls
# varies by about this much, and a wrong "sparse" makes the layer slower than dense, which a
# wrong "dense" (losing at most this margin) never does.
SPARSE_MARGIN = 0.05


def _initial_default() -> str:
    configured = os.environ.get("DYNASPARSE_BACKEND", "auto")
    if configured not in BACKENDS:
        raise ValueError(f"dynasparse: the environment variable DYNASPARSE_BACKEND must be one of "
                         f"{', '.join(BACKENDS)}, got {configured!r}")
    return configured


_default_backend = _initial_default()


def check_backend(backend: str, what: str = "backend") -> str:
    if backend not in BACKENDS:
        raise ValueError(f"dynasparse: {what} must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
    return backend


def set_default_backend(backend: str) -> None:
    """The backend of sparse layers built from now on ("auto", "sparse" or "dense")."""
    global _default_backend
    _default_backend = check_backend(backend)


def default_backend() -> str:
    return _default_backend


@contextlib.contextmanager
def backend_default(backend: str) -> Iterator[None]:
    """`set_default_backend(backend)` within the block (layers built in it keep it)."""
    previous = default_backend()
    set_default_backend(backend)
    try:
        yield
    finally:
        set_default_backend(previous)


def _kernels_build() -> str:
    """The native library's identity (its file's size and modification time): the choices
    measured the kernels of one build, and a rebuild or an upgrade changes their speed."""
    from .. import _C

    try:
        status = os.stat(_C.__file__)
    except (OSError, AttributeError, TypeError):
        return "unknown"
    return f"{status.st_size:x}-{int(status.st_mtime)}"


def _machine_only() -> str:
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model} | {os.cpu_count()} cores | torch {torch.__version__}"


def machine() -> str:
    """This machine as the cost file names it: CPU model, cores, torch version, and the build
    of the native kernels."""
    return f"{_machine_only()} | kernels {_kernels_build()}"


def machine_load() -> float | None:
    """Runnable processes per core over the last minute (None where the OS does not tell)."""
    try:
        return os.getloadavg()[0] / (os.cpu_count() or 1)
    except (OSError, AttributeError):
        return None


def _default_path() -> Path | None:
    configured = os.environ.get("DYNASPARSE_COST_CACHE")
    if configured is not None:
        return Path(configured) if configured else None
    return Path.home() / ".cache" / "dynasparse" / "costs.json"


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_both(sparse: Callable[[], object], dense: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """Median seconds of one call of each, interleaved, after a warm-up call of each."""
    def once(fn) -> float:
        _synchronize(device)
        began = time.perf_counter()
        fn()
        _synchronize(device)
        return time.perf_counter() - began

    once(sparse), once(dense)
    first = once(sparse) + once(dense)
    repeats = int(min(_MAX_REPEATS, max(_MIN_REPEATS, 2 * _BUDGET_S / max(first, 1e-9))))
    sparse_times, dense_times = [], []
    for _ in range(repeats):
        sparse_times.append(once(sparse))
        dense_times.append(once(dense))
    return statistics.median(sparse_times), statistics.median(dense_times)


class CostModel:
    """Measured (sparse seconds, dense seconds) per key, for this process and the file at
    `path` (None: memory only). Only the machine's own section of the file is read and
    written; a file that cannot be read or written is left alone (the model then lives in
    memory, and says so once as a warning)."""

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = None if path is None else Path(path)
        self._entries: dict[str, dict] | None = None
        self._machine = machine()

    def _load(self) -> dict[str, dict]:
        if self._entries is None:
            self._entries = {}
            if self.path is not None and self.path.exists():
                try:
                    content = json.loads(self.path.read_text())
                    if content.get("format") == FORMAT:
                        self._entries = dict(content.get("machines", {}).get(self._machine, {}))
                except (OSError, ValueError, AttributeError) as error:
                    self._unusable(error)
        return self._entries

    def _unusable(self, error: Exception) -> None:
        import warnings

        warnings.warn(f"dynasparse: the cost file {self.path} cannot be used ({error}); sparse-or-dense choices "
                      "are measured again and kept in memory only", RuntimeWarning, stacklevel=4)
        self.path = None

    def choice(self, key: str) -> str | None:
        """The kept choice for `key`, or None: never measured, or measured on a busy machine
        that is now at most half as busy (or by a version that did not record the load)."""
        entry = self._load().get(key)
        if entry is None:
            return None
        measured_at, now = entry.get("load"), machine_load()
        if now is not None and (measured_at is None or (measured_at > _BUSY_LOAD and now <= measured_at / 2)):
            return None
        return entry["choice"]

    def entry(self, key: str) -> dict | None:
        return self._load().get(key)

    def record(self, key: str, sparse_s: float, dense_s: float) -> str:
        """Store a measurement; the choice is sparse where it measured at least SPARSE_MARGIN
        faster than dense, else dense."""
        choice = "sparse" if sparse_s <= dense_s * (1.0 - SPARSE_MARGIN) else "dense"
        self._load()[key] = {"sparse_s": sparse_s, "dense_s": dense_s, "choice": choice, "load": machine_load()}
        self._save()
        return choice

    def _save(self) -> None:
        if self.path is None:
            return
        try:
            content = {"format": FORMAT, "machines": {}}
            if self.path.exists():
                with contextlib.suppress(ValueError):
                    previous = json.loads(self.path.read_text())
                    if previous.get("format") == FORMAT:
                        content = previous
            # Entries other processes wrote meanwhile are kept; ours win on the same key. Sections
            # of this machine measured with another build of the kernels are stale: dropped.
            machines = content["machines"]
            stale_prefix = self._machine.rsplit(" | kernels ", 1)[0] + " | "
            for name in [name for name in machines if name.startswith(stale_prefix) and name != self._machine]:
                del machines[name]
            machines[self._machine] = {**machines.get(self._machine, {}), **self._entries}
            self.path.parent.mkdir(parents=True, exist_ok=True)
            handle, temporary = tempfile.mkstemp(dir=self.path.parent, prefix=".costs-", suffix=".json")
            with os.fdopen(handle, "w") as file:
                json.dump(content, file, indent=0, sort_keys=True)
            os.replace(temporary, self.path)
        except (OSError, AttributeError, TypeError) as error:
            self._unusable(error)

    def entries(self) -> dict[str, dict]:
        """key -> {"sparse_s", "dense_s", "choice", "load"} for this machine."""
        return dict(self._load())

    def clear(self) -> None:
        """Forget this machine's measurements (in memory and in the file)."""
        self._entries = {}
        if self.path is not None and self.path.exists():
            with contextlib.suppress(OSError, ValueError):
                content = json.loads(self.path.read_text())
                content.get("machines", {}).pop(self._machine, None)
                self.path.write_text(json.dumps(content, indent=0, sort_keys=True))


COSTS = CostModel(_default_path())


def use_cost_file(path: str | os.PathLike | None) -> CostModel:
    """Point the shared cost model at another file (None: memory only); returns it."""
    global COSTS
    COSTS = CostModel(path)
    return COSTS


def key_name(key: tuple) -> str:
    """A call key as the cost file names it: its parts joined by '|', dtypes without 'torch.'."""
    return "|".join(str(part).removeprefix("torch.") if isinstance(part, torch.dtype) else str(part) for part in key)


def rows_bucket(rows: int) -> int:
    """The power of two at or above `rows` (0 stays 0): calls of similar sizes share a choice."""
    return 0 if rows <= 0 else 1 << (rows - 1).bit_length()
