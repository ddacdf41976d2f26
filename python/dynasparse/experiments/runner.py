"""The population runner: `run_population(specs, directory)` trains every spec not yet
stored in the experiment directory, over worker processes, and returns the records.

- Staged runs: the ancestors of a spec (`spec.parent`) are runs of the population too; runs
  go in waves by depth, each given its parent's stored checkpoint; a run whose parent failed
  fails, naming it.
- Resumable: a run stored as done (with its checkpoint) is never recomputed; runs that a
  stopped runner left "running", and failed runs, are run again (`retry_failed`).
- Workers: `ProcessExecutor` (default): `workers` processes (default: the cores this process
  may use), one thread each, each taking one run at a time. A worker that dies mid-run (killed,
  out of memory) fails that run only: a new worker takes its place and the population goes on.
  `InlineExecutor` runs in this process (debugging, or one GPU); `RayExecutor` (ray, optional)
  spreads the runs over a Ray cluster. Any object with `run(tasks, sink)` is an executor: it
  calls `sink.started(run_id, host)`, `sink.progress(run_id, steps)` and `sink.finished(outcome)`
  for each task it runs (`execute(task)` computes an outcome).
- Progress: one bar over the steps of the whole population with its ETA (tqdm on stderr when
  it is a terminal), and `on_record(record)` after each stored run.
- The data sets are generated (and cached) once in this process before the workers start.
- Only this process writes the store, and one runner at a time may use a directory (a lock).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from . import data
from .spec import RunSpec
from .store import RunRecord, Store, code_version, host_name, rebuild

_OWNER = "dynasparse.experiments.run_population"
HooksFactory = Callable[[RunSpec], Sequence]


@dataclasses.dataclass(frozen=True)
class Task:
    """One run to compute: its spec as JSON, `hooks(spec) -> [Hook, ...]` (picklable by
    reference, i.e. a module-level function, to reach worker processes) or None, and for a
    staged run the bytes of its parent's checkpoint."""

    run_id: str
    spec_json: str
    hooks: HooksFactory | None = None
    parent_checkpoint: bytes | None = None


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What computing a task gave: metrics and the checkpoint's bytes, or an error."""

    run_id: str
    metrics: dict | None = None
    checkpoint: bytes | None = None
    error: str | None = None
    wall_seconds: float | None = None
    host: str | None = None


def default_workers() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def execute(task: Task, progress: Callable[[int], None] | None = None) -> Outcome:
    """Train one task and serialize its model; an exception becomes an error outcome (with
    its traceback) so that one bad run does not stop a population."""
    from .. import save
    from .trainer import train

    began = time.perf_counter()
    try:
        spec = RunSpec.from_json(task.spec_json)
        hooks = list(task.hooks(spec)) if task.hooks is not None else []
        dataset = data.load(spec.data, **spec.data_options)
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "model.dsp.safetensors"
            parent = None
            if spec.parent is not None:
                if task.parent_checkpoint is None:
                    raise ValueError(f"{_OWNER}: run {task.run_id} starts from run {spec.parent.run_id}, whose "
                                     "checkpoint the task does not carry")
                path.write_bytes(task.parent_checkpoint)
                parent = rebuild(spec.parent, dataset.input_shape, dataset.classes, path)
            result = train(spec, dataset=dataset, hooks=hooks, progress=progress, parent=parent)
            save(result.model, path)
            checkpoint = path.read_bytes()
        return Outcome(task.run_id, metrics=result.metrics, checkpoint=checkpoint,
                       wall_seconds=time.perf_counter() - began, host=host_name())
    except Exception:  # noqa: BLE001  (every error of a run is reported as that run's failure)
        return Outcome(task.run_id, error=traceback.format_exc(), wall_seconds=time.perf_counter() - began,
                       host=host_name())


# -- executors -------------------------------------------------------------------------------

class InlineExecutor:
    """Runs every task in this process, one after the other."""

    workers = 1

    def run(self, tasks: Sequence[Task], sink) -> None:
        for task in tasks:
            sink.started(task.run_id, host_name())
            sink.finished(execute(task, lambda steps, run_id=task.run_id: sink.progress(run_id, steps)))


_PROGRESS_PERIOD_S = 0.5


def _worker_main(connection, threads: int) -> None:
    """A worker process: take a task, report its start, progress (at most every 0.5 s) and
    outcome, until told to stop (None) or the runner is gone (EOF; checked during a run too,
    so that a killed runner leaves no worker behind)."""
    import torch

    from . import trainer  # noqa: F401  (imported while starting, not in the first run's time)

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the runner's to handle: it stops the workers

    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):  # only settable before any inter-op work
        torch.set_num_interop_threads(1)
    while True:
        try:
            task = connection.recv()
        except (EOFError, OSError):
            return
        if task is None:
            return
        connection.send(("started", task.run_id, host_name()))
        pending, last = 0, time.monotonic()

        def progress(steps: int) -> None:
            nonlocal pending, last
            pending += steps
            if time.monotonic() - last >= _PROGRESS_PERIOD_S:
                if connection.poll():  # mid-run, only the runner's end closing or a stop can arrive
                    raise SystemExit(0)
                connection.send(("progress", task.run_id, pending))
                pending, last = 0, time.monotonic()

        outcome = execute(task, progress)
        if pending:
            connection.send(("progress", task.run_id, pending))
        connection.send(("finished", outcome))


class ProcessExecutor:
    """`workers` worker processes (default: the cores at hand) with `threads` CPU threads
    each (1: several small runs in parallel gain more than threads within one), started with
    `start_method`: "forkserver" (the default where there is one: a server process imports
    torch and dynasparse once, then forks each worker from it, before any thread runs) or
    "spawn" (each worker a fresh interpreter: seconds each). Both are safe with the threads
    torch runs in this process, which "fork" is not."""

    def __init__(self, workers: int | None = None, *, threads: int = 1, start_method: str | None = None):
        if start_method is None:
            start_method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
        workers = default_workers() if workers is None else workers
        for name, value in (("workers", workers), ("threads", threads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"dynasparse.experiments.ProcessExecutor: {name} must be an int >= 1, got {value!r}")
        if start_method not in ("spawn", "forkserver"):
            raise ValueError("dynasparse.experiments.ProcessExecutor: start_method must be 'spawn' or 'forkserver', "
                             f"got {start_method!r}")
        self.workers, self.threads, self.start_method = workers, threads, start_method

    def _start(self, context):
        ours, theirs = context.Pipe()
        process = context.Process(target=_worker_main, args=(theirs, self.threads), daemon=True,
                                  name="dynasparse-worker")
        process.start()
        theirs.close()
        return process, ours

    def run(self, tasks: Sequence[Task], sink) -> None:
        context = multiprocessing.get_context(self.start_method)
        if self.start_method == "forkserver":
            # Takes effect when this process starts its fork server (the first time only).
            # torch._dynamo: the first optimizer a process builds imports it (seconds).
            context.set_forkserver_preload(["__main__", __name__, "torch._dynamo"])
        queue = collections.deque(tasks)
        workers = [self._start(context) for _ in range(min(self.workers, len(queue)))]
        busy: dict = {}  # connection -> its task
        started: dict = {}  # connection -> the run id its worker last reported started

        def dispatch(connection) -> None:
            if connection not in busy and queue:
                busy[connection] = queue.popleft()
                with contextlib.suppress(OSError):  # a worker that just died: its sentinel says so
                    connection.send(busy[connection])

        def drain(connection) -> bool:
            """Handle the worker's messages; False once its end is closed (it exited)."""
            try:
                while connection.poll():
                    message = connection.recv()
                    if message[0] == "started":
                        started[connection] = message[1]
                        sink.started(message[1], message[2])
                    elif message[0] == "progress":
                        sink.progress(message[1], message[2])
                    else:
                        del busy[connection]
                        dispatch(connection)  # the worker goes on while the outcome is stored
                        sink.finished(message[1])
            except (EOFError, OSError):
                return False
            return True

        try:
            while queue or busy:
                for _, connection in workers:
                    dispatch(connection)
                ready = multiprocessing.connection.wait([connection for _, connection in workers]
                                                        + [process.sentinel for process, _ in workers])
                dead = [worker for worker in workers
                        if (worker[1] in ready and not drain(worker[1])) or worker[0].sentinel in ready]
                for process, connection in dead:
                    drain(connection)  # what it sent before it died
                    process.join()
                    connection.close()
                    workers.remove((process, connection))
                    task, last = busy.pop(connection, None), started.pop(connection, None)
                    if task is not None and last == task.run_id:
                        sink.finished(Outcome(task.run_id, error=f"the worker process (pid {process.pid}) died "
                                              f"during the run (exit code {process.exitcode})"))
                    elif task is not None and last is not None:
                        queue.appendleft(task)  # it died between two runs: this one never started
                    elif task is not None:
                        sink.finished(Outcome(task.run_id, error=(
                            f"the worker process (pid {process.pid}) died while starting (exit code "
                            f"{process.exitcode}); a script that runs a population must start it under "
                            "`if __name__ == '__main__':`, since worker processes import the main module")))
                    if len(workers) < min(self.workers, len(queue) + len(busy)):
                        workers.append(self._start(context))
        finally:
            for _, connection in workers:
                with contextlib.suppress(OSError):
                    connection.send(None)
            deadline = time.monotonic() + 5
            for process, connection in workers:
                # Busy workers (an interruption) are stopped at once, idle ones exit on None.
                process.join(timeout=0 if busy else max(0.0, deadline - time.monotonic()))
                if process.is_alive():
                    process.kill()
                    process.join()
                connection.close()


class RayExecutor:
    """Each task a Ray task of `cpus` CPUs (default 1) on the cluster at `address` (None:
    ray.init()'s default: a running local cluster or a new local instance). Progress is
    reported per run, not per step. Needs the `ray` package (an optional extra)."""

    def __init__(self, address: str | None = None, *, cpus: float = 1.0, **init_options):
        try:
            import ray  # noqa: F401
        except ImportError:
            raise ImportError("dynasparse.experiments.RayExecutor needs ray: pip install 'ray[default]'") from None
        self.address, self.cpus, self.init_options = address, cpus, init_options
        self.workers = None

    def run(self, tasks: Sequence[Task], sink) -> None:
        import ray

        if not ray.is_initialized():
            ray.init(address=self.address, **self.init_options)
        self.workers = int(ray.cluster_resources().get("CPU", 1) // self.cpus)
        remote = ray.remote(num_cpus=self.cpus)(execute)
        pending = {}
        for task in tasks:
            pending[remote.remote(task)] = task
            sink.started(task.run_id, "ray")
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for reference in done:
                task = pending.pop(reference)
                try:
                    outcome = ray.get(reference)
                except Exception as error:  # noqa: BLE001  (a lost worker or node fails the run only)
                    outcome = Outcome(task.run_id, error=f"the Ray task failed: {error}")
                sink.finished(outcome)


EXECUTORS = {"process": ProcessExecutor, "inline": InlineExecutor, "ray": RayExecutor}


# -- the runner ------------------------------------------------------------------------------

@dataclasses.dataclass
class PopulationResult:
    """The records of the population's specs (in their order), with what this call did."""

    records: list[RunRecord]
    computed: int
    reused: int
    failed: list[RunRecord]
    seconds: float
    code_version: str | None = None

    @property
    def complete(self) -> bool:
        return all(record.complete for record in self.records)

    @property
    def stale(self) -> list[RunRecord]:
        """Stored runs trained by another version of the code than this one (`git describe`;
        a run id covers the spec, not the code): delete them, or the directory, to retrain."""
        return [record for record in self.records if record.complete and record.git_commit and self.code_version
                and record.git_commit != self.code_version]

    def stale_note(self) -> str | None:
        """A line saying which stored runs come from other code, or None."""
        stale = self.stale
        if not stale:
            return None
        versions = sorted({record.git_commit for record in stale})
        return (f"note: {len(stale)} of the stored runs were trained by code version {', '.join(versions)}, not the "
                f"current {self.code_version}; delete the directory (or pass another) to train them again")


class _Sink:
    """Receives the executor's events: stores outcomes, moves the progress bar."""

    def __init__(self, store: Store, steps: dict[str, int], bar, on_record, commit):
        self.store, self.steps, self.bar, self.on_record, self.commit = store, steps, bar, on_record, commit
        self.done_steps = collections.Counter()
        self.finished_count = self.failed_count = 0

    def started(self, run_id: str, host: str | None) -> None:
        self.store.mark_running(run_id, host=host)

    def progress(self, run_id: str, steps: int) -> None:
        self.done_steps[run_id] += steps
        self.bar.update(steps)

    def finished(self, outcome: Outcome) -> None:
        # A failed or early-stopped run's remaining steps are counted as done: the bar ends at 100%.
        remaining = self.steps[outcome.run_id] - self.done_steps[outcome.run_id]
        if remaining > 0:
            self.bar.update(remaining)
            self.done_steps[outcome.run_id] += remaining
        if outcome.error is None:
            self.store.finish(outcome.run_id, outcome.metrics, outcome.checkpoint, wall_seconds=outcome.wall_seconds,
                              host=outcome.host, git_commit=self.commit)
            self.finished_count += 1
        else:
            self.store.fail(outcome.run_id, outcome.error, wall_seconds=outcome.wall_seconds)
            self.failed_count += 1
        self.bar.set_postfix_str(f"{self.finished_count} done, {self.failed_count} failed", refresh=False)
        if self.on_record is not None:
            self.on_record(self.store.get(outcome.run_id))


def _waves(specs: Sequence[RunSpec]) -> list[list[RunSpec]]:
    """`specs` grouped by their depth in the staging tree: the runs of a wave start from
    models of earlier waves (or from stored ones) only."""
    waves: dict[int, list[RunSpec]] = collections.defaultdict(list)
    for spec in specs:
        waves[len(spec.lineage())].append(spec)
    return [waves[depth] for depth in sorted(waves)]


@contextlib.contextmanager
def _directory_lock(directory: Path):
    """One runner per experiment directory: a second one would take the first one's runs for
    interrupted ones and compute them again."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    with open(directory / ".runner.lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"{_OWNER}: another runner is using {directory}; wait for it to finish or use "
                               "another directory") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def run_population(specs: Iterable[RunSpec], directory: str | os.PathLike, *, workers: int | None = None,
                   executor=None, hooks: HooksFactory | None = None, retry_failed: bool = True,
                   progress: bool | None = None, on_record: Callable[[RunRecord], None] | None = None,
                   description: str = "runs") -> PopulationResult:
    """Compute every run of `specs` that `directory` does not hold yet (see the module
    docstring). `workers`: processes of the default executor (default: the cores at hand);
    `executor`: another executor object (or "process", "inline", "ray"); `hooks`: a
    module-level function spec -> [Hook, ...] called in the worker for each run; `progress`:
    show the bar (default: when stderr is a terminal)."""
    from tqdm import tqdm

    began = time.perf_counter()
    specs = list(specs)
    for spec in specs:
        if not isinstance(spec, RunSpec):
            raise TypeError(f"{_OWNER}: specs must be RunSpecs, got {type(spec).__name__}")
    specs = list(dict.fromkeys(specs))  # a spec given twice is one run
    # Staged runs: every ancestor is a run of the population too, trained before its children.
    lineage = list(dict.fromkeys(ancestor for spec in specs for ancestor in spec.lineage()))
    if hooks is not None and not callable(hooks):
        raise TypeError(f"{_OWNER}: hooks must be a function spec -> [Hook, ...], got {type(hooks).__name__}")
    if isinstance(executor, str):
        if executor not in EXECUTORS:
            raise ValueError(f"{_OWNER}: executor must be one of {', '.join(EXECUTORS)} or an executor object, got "
                             f"{executor!r}")
        executor = EXECUTORS[executor](workers) if executor == "process" else EXECUTORS[executor]()
    elif executor is None:
        executor = ProcessExecutor(workers)
    elif not callable(getattr(executor, "run", None)):
        raise TypeError(f"{_OWNER}: executor must have a run(tasks, sink) method, got {type(executor).__name__}")
    store = Store(directory)
    with _directory_lock(store.directory):
        store.add(lineage)
        store.reset_running()
        records = {record.run_id: record for record in store.records(lineage)}
        todo = [spec for spec in lineage
                if not records[spec.run_id].complete and (retry_failed or records[spec.run_id].status != "failed")]
        configurations = {(spec.data, json.dumps(spec.data_options, sort_keys=True)) for spec in todo}
        for name, options in sorted(configurations):
            data.prepare(name, **json.loads(options))
        steps = {spec.run_id: spec.steps for spec in todo}
        show = sys.stderr.isatty() if progress is None else progress
        with tqdm(total=sum(steps.values()), desc=description, unit="step", file=sys.stderr, disable=not show,
                  dynamic_ncols=True) as bar:
            version = code_version()
            sink = _Sink(store, steps, bar, on_record, version)
            try:
                for wave in _waves(todo):
                    tasks = []
                    for spec in wave:
                        parent = None if spec.parent is None else store.get(spec.parent.run_id)
                        if parent is not None and not parent.complete:
                            sink.finished(Outcome(spec.run_id, error=(
                                f"its parent run {parent.run_id} ({spec.parent.label}) is {parent.status}, not "
                                "trained" + (f": {parent.error.strip().splitlines()[-1]}" if parent.error else ""))))
                            continue
                        checkpoint = None if parent is None else parent.checkpoint.read_bytes()
                        tasks.append(Task(spec.run_id, spec.to_json(), hooks, checkpoint))
                    if tasks:
                        executor.run(tasks, sink)
            finally:
                store.reset_running()
    final = store.records(specs)
    return PopulationResult(final, computed=len(todo), reused=len(lineage) - len(todo),
                            failed=[record for record in final if record.status == "failed"],
                            seconds=time.perf_counter() - began, code_version=version)
