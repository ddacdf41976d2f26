"""The store and the population runner: round trip, resume after a killed worker and after an
interrupted runner, failures, the directory lock."""

import fcntl
import functools
import sqlite3

import pytest
import torch

from dynasparse import experiments
from dynasparse.experiments import InlineExecutor, RunSpec, Store, run_population, train
from dynasparse.experiments.runner import default_workers
from tests.experiments import workers

TINY = dict(data="teacher-student", data_options={"features": 6, "classes": 3, "train": 96, "test": 48},
            model="mlp", model_options={"hidden": [12, 12]}, steps=30, batch_size=16, lr=0.1)


def _specs(count=4):
    methods = ["dpf", "gradual", "dense", "random"]
    return [RunSpec(**TINY, method=methods[i % 4], sparsity=0.0 if methods[i % 4] == "dense" else 0.5, seed=i)
            for i in range(count)]


def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_killed_worker_fails_its_run_only_and_the_population_resumes(tmp_path):
    specs = _specs(4)
    victim = specs[1]
    hooks = functools.partial(workers.kill_once, str(tmp_path / "killed"), victim.run_id, 10)
    first = run_population(specs, tmp_path / "runs", workers=2, hooks=hooks, progress=False)
    assert (tmp_path / "killed").exists()
    status = {record.run_id: record.status for record in first.records}
    assert status == {spec.run_id: "failed" if spec is victim else "done" for spec in specs}
    failed = first.failed[0]
    assert failed.run_id == victim.run_id and "died during the run (exit code -9)" in failed.error
    assert not first.complete and first.computed == 4
    # One thread per worker (no oversubscription), each free to run on every core.
    seen = [record.metrics["worker"] for record in first.records if record.status == "done"]
    assert all(w["threads"] == 1 and w["interop"] == 1 and w["cores"] == default_workers() for w in seen)

    finished = {record.run_id: record.finished for record in first.records}
    second = run_population(specs, tmp_path / "runs", workers=2, hooks=hooks, progress=False)
    assert second.complete and second.computed == 1 and second.reused == 3
    for record in second.records:
        assert record.attempts == (2 if record.run_id == victim.run_id else 1)
        if record.run_id != victim.run_id:
            assert record.finished == finished[record.run_id]  # stored once, never recomputed
    # The resumed run is the run an uninterrupted process computes.
    reference = train(victim)
    store = Store(tmp_path / "runs")
    resumed = store.get(victim.run_id)
    assert resumed.metrics["accuracy"] == reference.metrics["accuracy"]
    assert resumed.metrics["flip_rates"] == reference.metrics["flip_rates"]
    assert _same_state(store.load_model(victim.run_id), reference.model)
    assert resumed.git_commit is None or isinstance(resumed.git_commit, str)


class _InterruptAfter:
    """An executor that runs inline and is interrupted (as by Ctrl-C) after `count` runs."""

    def __init__(self, count):
        self.count = count

    def run(self, tasks, sink):
        for index, task in enumerate(tasks):
            if index == self.count:
                sink.started(task.run_id, "test")  # interrupted mid-run
                raise KeyboardInterrupt
            sink.started(task.run_id, "test")
            sink.finished(experiments.execute(task))


def test_an_interrupted_population_continues_where_it_stopped(tmp_path):
    specs = _specs(3)
    with pytest.raises(KeyboardInterrupt):
        run_population(specs, tmp_path, executor=_InterruptAfter(1), progress=False)
    store = Store(tmp_path)
    assert [record.status for record in store.records(specs)] == ["done", "pending", "pending"]
    assert store.get(specs[1].run_id).error == "interrupted"
    seen = []
    result = run_population(specs, tmp_path, executor="inline", progress=False, on_record=seen.append)
    assert result.complete and result.computed == 2 and [r.run_id for r in seen] == [s.run_id for s in specs[1:]]
    assert result.records[0].attempts == 1 and result.records[1].attempts == 2
    for spec, record in zip(specs, result.records):
        assert record.spec == spec and record.metrics["accuracy"] == train(spec).metrics["accuracy"]


def test_store_round_trip(tmp_path):
    spec = _specs(1)[0]
    store = Store(tmp_path)
    assert store.add([spec, spec]) == 1 and store.add([spec]) == 0
    assert store.get(spec.run_id).status == "pending" and store.missing() == store.records()
    outcome = experiments.execute(experiments.Task(spec.run_id, spec.to_json()))
    store.mark_running(spec.run_id, host="here")
    assert store.counts() == {"pending": 0, "running": 1, "done": 0, "failed": 0}
    store.finish(spec.run_id, outcome.metrics, outcome.checkpoint, wall_seconds=1.5, git_commit="abc")
    record = Store(tmp_path).get(spec.run_id)
    assert record.complete and record.spec == spec and record.metrics == outcome.metrics
    assert (record.wall_seconds, record.git_commit, record.host, record.attempts) == (1.5, "abc", "here", 1)
    assert record.versions["torch"] == torch.__version__
    assert record.to_dict()["spec"] == spec.to_dict()
    model = store.load_model(spec.run_id)
    reference = train(spec).model
    x = torch.randn(5, 6)
    assert torch.equal(model(x), reference(x)) and _same_state(model, reference)
    record.checkpoint.unlink()
    assert [r.run_id for r in store.missing()] == [spec.run_id] and not store.get(spec.run_id).complete
    with pytest.raises(ValueError, match="checkpoint is missing"):
        store.load_model(spec.run_id)
    with pytest.raises(KeyError, match="no run 'beef'"):
        store.finish("beef", {}, b"x")
    with pytest.raises(ValueError, match="status must be one of"):
        store.records(status="lost")


def test_store_dataframe(tmp_path):
    pandas = pytest.importorskip("pandas")
    spec = _specs(1)[0]
    run_population([spec], tmp_path, executor="inline", progress=False)
    frame = Store(tmp_path).dataframe()
    assert isinstance(frame, pandas.DataFrame) and frame.loc[0, "run_id"] == spec.run_id
    assert frame.loc[0, "metrics.accuracy"] == Store(tmp_path).get(spec.run_id).metrics["accuracy"]


def test_store_refuses_what_is_not_a_run_index(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError):
        Store(tmp_path / "file")
    with pytest.raises(FileNotFoundError, match="holds no run index"):
        Store(tmp_path / "empty", create=False)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "runs.sqlite").write_bytes(b"not a database" * 100)
    with pytest.raises(ValueError, match="not a readable run index"):
        Store(tmp_path / "junk")
    with sqlite3.connect(tmp_path / "runs.sqlite") as connection:
        connection.executescript("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
                                 "INSERT INTO meta VALUES ('schema', '99');")
    with pytest.raises(ValueError, match="schema version 99"):
        Store(tmp_path)


def test_a_failing_run_is_recorded_with_its_error(tmp_path):
    bad = RunSpec(**{**TINY, "batch_size": 500})
    good = _specs(1)[0]
    result = run_population([bad, good], tmp_path, executor="inline", progress=False)
    assert [record.status for record in result.records] == ["failed", "done"]
    assert "batch_size 500 is larger than the 96 training examples" in result.failed[0].error
    again = run_population([bad, good], tmp_path, executor="inline", progress=False, retry_failed=False)
    assert again.computed == 0 and again.records[0].attempts == 1


def test_one_runner_per_directory_and_argument_checks(tmp_path):
    Store(tmp_path)
    with open(tmp_path / ".runner.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        with pytest.raises(RuntimeError, match="another runner is using"):
            run_population(_specs(1), tmp_path, executor="inline", progress=False)
    with pytest.raises(TypeError, match="specs must be RunSpecs"):
        run_population([RunSpec(**TINY), {"steps": 1}], tmp_path, progress=False)
    with pytest.raises(ValueError, match="executor must be one of process, inline, ray"):
        run_population(_specs(1), tmp_path, executor="threads", progress=False)
    with pytest.raises(TypeError, match="executor must have a run"):
        run_population(_specs(1), tmp_path, executor=object(), progress=False)
    with pytest.raises(ValueError, match="workers must be an int >= 1"):
        experiments.ProcessExecutor(0)
    assert isinstance(InlineExecutor().workers, int)


def test_ray_executor_on_a_local_instance(tmp_path):
    ray = pytest.importorskip("ray")
    specs = _specs(2)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        result = run_population(specs, tmp_path, executor=experiments.RayExecutor(), progress=False)
    finally:
        ray.shutdown()
    assert result.complete and result.computed == 2
    for spec, record in zip(specs, result.records):
        assert record.metrics["accuracy"] == train(spec).metrics["accuracy"]
        assert _same_state(Store(tmp_path).load_model(spec.run_id), train(spec).model)


def test_runs_trained_by_other_code_are_named(tmp_path, monkeypatch):
    from dynasparse.experiments import runner

    specs = _specs(2)
    monkeypatch.setattr(runner, "code_version", lambda: "v1")
    first = run_population(specs, tmp_path, executor="inline", progress=False)
    assert first.stale == [] and first.stale_note() is None
    assert {record.git_commit for record in first.records} == {"v1"}
    monkeypatch.setattr(runner, "code_version", lambda: "v2")
    again = run_population(specs, tmp_path, executor="inline", progress=False)
    assert again.computed == 0 and [r.run_id for r in again.stale] == [s.run_id for s in specs]
    assert "2 of the stored runs were trained by code version v1, not the current v2" in again.stale_note()
    monkeypatch.setattr(runner, "code_version", lambda: None)  # not a git checkout: nothing to compare
    assert run_population(specs, tmp_path, executor="inline", progress=False).stale == []
