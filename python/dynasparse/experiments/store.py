"""The store of an experiment directory: the run index and the trained models.

    DIR/runs.sqlite                       one row per run: spec, status, metrics, timings, git commit
    DIR/models/<run id>.dsp.safetensors   the trained model (dynasparse.save: compressed, checksummed)

A run is "pending" (known, not computed), "running", "done" or "failed" (with the error).
A done run's checkpoint is written before its row says done, so a done run always has its
model; one whose checkpoint file has gone is reported missing (and recomputed by the runner).
Queries return plain `RunRecord`s; `Store.dataframe()` gives a pandas DataFrame when pandas is
installed. The database is written by one process at a time (the runner's); readers (e.g.
`dynasparse runs DIR`) may read while it runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from ..nn import load, sparsify
from . import models
from .spec import RunSpec

_OWNER = "dynasparse.experiments.Store"
STATUSES = ("pending", "running", "done", "failed")
DATABASE = "runs.sqlite"
SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    spec TEXT NOT NULL,
    status TEXT NOT NULL,
    metrics TEXT,
    error TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    wall_seconds REAL,
    added REAL NOT NULL,
    started REAL,
    finished REAL,
    host TEXT,
    git_commit TEXT,
    versions TEXT
);
"""


@dataclasses.dataclass(frozen=True)
class RunRecord:
    """One run of the index. `wall_seconds`: the whole run in its worker (data, training,
    evaluation, checkpoint); the training loop alone is `metrics["seconds"]`."""

    run_id: str
    spec: RunSpec
    status: str
    metrics: dict | None
    error: str | None
    attempts: int
    wall_seconds: float | None
    added: float
    started: float | None
    finished: float | None
    host: str | None
    git_commit: str | None
    versions: dict | None
    checkpoint: Path | None

    @property
    def complete(self) -> bool:
        """Done, with its checkpoint on disk."""
        return self.status == "done" and self.checkpoint is not None

    def to_dict(self) -> dict:
        fields = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        return {**fields, "spec": self.spec.to_dict(),
                "checkpoint": None if self.checkpoint is None else str(self.checkpoint)}


def code_version() -> str | None:
    """`git describe --always --dirty` of the checkout dynasparse runs from (None outside one)."""
    try:
        found = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"], capture_output=True,
                               text=True, timeout=10, cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    if found.returncode != 0:
        return None
    return found.stdout.strip() or None


def versions() -> dict:
    import dynasparse

    return {"dynasparse": dynasparse.__version__, "torch": torch.__version__}


class Store:
    """The run index and models of experiment directory `directory` (created if missing)."""

    def __init__(self, directory: str | os.PathLike, *, create: bool = True):
        try:
            self.directory = Path(os.fspath(directory))
        except TypeError:
            raise TypeError(f"{_OWNER}: directory must be a str or os.PathLike, got "
                            f"{type(directory).__name__}") from None
        self.database = self.directory / DATABASE
        if not create and not self.database.exists():
            raise FileNotFoundError(f"{_OWNER}: {self.directory} holds no run index ({DATABASE}); it is not an "
                                    "experiment directory")
        if self.directory.exists() and not self.directory.is_dir():
            raise NotADirectoryError(f"{_OWNER}: {self.directory} is not a directory")
        try:
            (self.directory / "models").mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=self.directory):
                pass
        except OSError as error:
            raise ValueError(f"{_OWNER}: cannot write the experiment directory {self.directory} "
                             f"({error.strerror or error})") from None
        try:
            with self._connect() as connection:
                connection.executescript(_SCHEMA)
                found = connection.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
                if found is None:
                    connection.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
                elif found[0] != str(SCHEMA_VERSION):
                    raise ValueError(f"{_OWNER}: {self.database} has schema version {found[0]}, this dynasparse "
                                     f"reads version {SCHEMA_VERSION}")
        except sqlite3.DatabaseError as error:
            raise ValueError(f"{_OWNER}: {self.database} is not a readable run index ({error})") from None

    @contextlib.contextmanager
    def _connect(self):
        connection = sqlite3.connect(self.database, timeout=60)
        # Write-ahead log: readers (dynasparse runs) never block the runner, and a commit
        # costs no fsync of the database; a row lost in a power cut is recomputed.
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")
        try:
            with connection:  # one transaction: committed on success, rolled back on an error
                yield connection
        finally:
            connection.close()

    # -- writing -----------------------------------------------------------------------------

    def add(self, specs: Iterable[RunSpec]) -> int:
        """Index the runs of `specs` as pending (those already known are left as they are);
        returns how many were new."""
        specs = list(specs)
        for spec in specs:
            if not isinstance(spec, RunSpec):
                raise TypeError(f"{_OWNER}.add: specs must be RunSpecs, got {type(spec).__name__}")
        now = time.time()
        with self._connect() as connection:
            before = connection.total_changes
            connection.executemany("INSERT OR IGNORE INTO runs (id, spec, status, added) VALUES (?, ?, 'pending', ?)",
                                   [(spec.run_id, spec.to_json(), now) for spec in specs])
            return connection.total_changes - before

    def mark_running(self, run_id: str, *, host: str | None = None) -> None:
        with self._connect() as connection:
            self._require(connection, run_id)
            connection.execute("UPDATE runs SET status = 'running', started = ?, host = ?, attempts = attempts + 1, "
                               "error = NULL WHERE id = ?", (time.time(), host, run_id))

    def finish(self, run_id: str, metrics: dict, checkpoint: bytes, *, wall_seconds: float | None = None,
               host: str | None = None, git_commit: str | None = None) -> None:
        """Store a finished run: its checkpoint file first, then its row as done."""
        text = json.dumps(metrics, sort_keys=True)
        if not isinstance(checkpoint, (bytes, bytearray)) or not checkpoint:
            raise ValueError(f"{_OWNER}.finish: checkpoint must be the non-empty bytes of a dynasparse checkpoint")
        path = self.checkpoint_path(run_id)
        handle, temporary = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        try:
            with os.fdopen(handle, "wb") as file:
                file.write(checkpoint)
            os.replace(temporary, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
            raise
        with self._connect() as connection:
            self._require(connection, run_id)
            connection.execute("UPDATE runs SET status = 'done', metrics = ?, error = NULL, wall_seconds = ?, "
                               "finished = ?, host = COALESCE(?, host), git_commit = ?, versions = ? WHERE id = ?",
                               (text, wall_seconds, time.time(), host, git_commit, json.dumps(versions()), run_id))

    def fail(self, run_id: str, error: str, *, wall_seconds: float | None = None) -> None:
        with self._connect() as connection:
            self._require(connection, run_id)
            connection.execute("UPDATE runs SET status = 'failed', error = ?, wall_seconds = ?, finished = ? "
                               "WHERE id = ?", (str(error), wall_seconds, time.time(), run_id))

    def reset_running(self) -> int:
        """Runs left "running" by a runner that stopped (killed, interrupted) become pending
        again; returns how many."""
        with self._connect() as connection:
            return connection.execute("UPDATE runs SET status = 'pending', error = 'interrupted' "
                                      "WHERE status = 'running'").rowcount

    def _require(self, connection, run_id: str) -> None:
        if connection.execute("SELECT 1 FROM runs WHERE id = ?", (run_id,)).fetchone() is None:
            raise KeyError(f"{_OWNER}: no run {run_id!r} in {self.database}")

    # -- reading -----------------------------------------------------------------------------

    def checkpoint_path(self, run_id: str) -> Path:
        if not (isinstance(run_id, str) and run_id.isalnum()):
            raise ValueError(f"{_OWNER}: run_id must be a run id (hex digits), got {run_id!r}")
        return self.directory / "models" / f"{run_id}.dsp.safetensors"

    def _record(self, row) -> RunRecord:
        run_id, spec, status, metrics, error, attempts, wall, added, started, finished, host, commit, found = row
        path = self.checkpoint_path(run_id)
        return RunRecord(run_id, RunSpec.from_json(spec), status, None if metrics is None else json.loads(metrics),
                         error, attempts, wall, added, started, finished, host, commit,
                         None if found is None else json.loads(found), path if path.exists() else None)

    def get(self, run_id: str) -> RunRecord | None:
        with self._connect() as connection:
            row = connection.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
        return None if row is None else self._record(row)

    def records(self, specs: Iterable[RunSpec] | None = None, *, status: str | None = None) -> list[RunRecord]:
        """The runs of `specs` (in their order, unknown ones left out), or all runs in the
        order they were added; only those of `status` when given."""
        if status is not None and status not in STATUSES:
            raise ValueError(f"{_OWNER}: status must be one of {', '.join(STATUSES)}, got {status!r}")
        with self._connect() as connection:
            rows = connection.execute("SELECT * FROM runs ORDER BY added, rowid").fetchall()
        found = [self._record(row) for row in rows]
        if specs is not None:
            by_id = {record.run_id: record for record in found}
            found = [by_id[spec.run_id] for spec in dict.fromkeys(specs) if spec.run_id in by_id]
        return [record for record in found if status is None or record.status == status]

    def missing(self, specs: Iterable[RunSpec] | None = None) -> list[RunRecord]:
        """The runs (of `specs`, or all indexed) that are not complete."""
        return [record for record in self.records(specs) if not record.complete]

    def counts(self) -> dict[str, int]:
        with self._connect() as connection:
            rows = dict(connection.execute("SELECT status, COUNT(*) FROM runs GROUP BY status").fetchall())
        return {status: rows.get(status, 0) for status in STATUSES}

    def dataframe(self):
        """The index as a pandas DataFrame, one row per run: the spec's fields, the status,
        timings and the scalar metrics."""
        try:
            import pandas
        except ImportError:
            raise ImportError(f"{_OWNER}.dataframe needs pandas (pip install pandas); records() returns the same "
                              "runs as plain records") from None
        rows = []
        for record in self.records():
            scalars = {f"metrics.{key}": value for key, value in (record.metrics or {}).items()
                       if isinstance(value, (int, float, str, bool)) or value is None}
            rows.append({"run_id": record.run_id, **record.spec.to_dict(), "status": record.status,
                         "wall_seconds": record.wall_seconds, "attempts": record.attempts, **scalars})
        return pandas.DataFrame(rows)

    def load_model(self, run_id: str, *, device: torch.device | str = "cpu") -> nn.Module:
        """The trained model of a done run, rebuilt from its spec and loaded from its checkpoint."""
        record = self.get(run_id)
        if record is None:
            raise KeyError(f"{_OWNER}: no run {run_id!r} in {self.database}")
        if not record.complete:
            raise ValueError(f"{_OWNER}: run {run_id} is {record.status}"
                             + ("" if record.status != "done" else " but its checkpoint is missing"))
        return rebuild(record.spec, record.metrics["input_shape"], record.metrics["classes"], record.checkpoint,
                       device=device)


def rebuild(spec: RunSpec, input_shape, classes: int, checkpoint: str | os.PathLike, *,
            device: torch.device | str = "cpu") -> nn.Module:
    """The model of run `spec` from its checkpoint file: built from the spec, the layers the
    checkpoint holds sparse sparsified, then loaded (every entry checked)."""
    model = models.build(spec.model, input_shape=input_shape, classes=classes, **spec.model_options)
    state = load(None, checkpoint)
    sparse = {key[:-len(".mask")] for key in state if key.endswith(".mask") and state[key].dtype == torch.bool}
    if sparse:
        sparsify(model, 0.0, include=lambda name, module: name in sparse, backend="sparse")
    return load(model, checkpoint).to(device)


def host_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"
