"""`dynasparse reproduce` and `dynasparse runs`, and the experiment registry behind them."""

import json

import pytest

from dynasparse.cli import main as cli_main
from dynasparse.experiments import RunSpec, Store, registry, reports

TINY = dict(data="teacher-student", data_options={"features": 6, "classes": 3, "train": 96, "test": 48},
            model="mlp", model_options={"hidden": [12]}, steps=20, batch_size=16, lr=0.1)


def _specs(quick):
    seeds = 2 if quick else 3
    return [RunSpec(**TINY, method=method, sparsity=0.5, seed=seed) for method in ("dpf", "random")
            for seed in range(seeds)]


def _analyze(records, store, quick):
    report = reports.Report("tiny")
    accuracy = {m: [r.metrics["accuracy"] for r in records if r.spec.method == m] for m in ("dpf", "random")}
    report.claim(reports.claim_greater("DPF beats random pruning", accuracy["dpf"], accuracy["random"]))
    report.numbers["runs"] = len(records)
    return report


@pytest.fixture
def tiny(monkeypatch):
    registry.available()  # the catalog first, so that it does not overwrite the test's entry
    experiment = registry.Experiment("tiny-test", "a tiny experiment of the tests", _specs, _analyze)
    monkeypatch.setitem(registry._REGISTRY, "tiny-test", experiment)
    return experiment


def test_list_shows_the_registered_experiments(tiny, capsys):
    assert cli_main(["reproduce", "--list"]) == 0
    printed = capsys.readouterr().out
    assert "demo " in printed and "tiny-test" in printed and "a tiny experiment of the tests" in printed


def test_reproduce_trains_what_is_missing_and_writes_the_report(tiny, tmp_path, capsys):
    out = tmp_path / "tiny"
    assert cli_main(["reproduce", "tiny-test", "--quick", "--out", str(out), "--workers", "0"]) == 0
    printed = capsys.readouterr().out
    assert "4 runs, 4 trained now, 0 already stored" in printed and "DPF beats random pruning" in printed
    saved = json.loads((out / "tiny-test.json").read_text())
    assert saved["numbers"]["runs"] == 4 and saved["claims"][0]["claim"] == "DPF beats random pruning"
    assert "## Claims" in (out / "tiny-test.md").read_text()
    assert cli_main(["reproduce", "tiny-test", "--quick", "--out", str(out), "--workers", "0"]) == 0
    assert "4 runs, 0 trained now, 4 already stored" in capsys.readouterr().out
    # The full version adds a seed: only its runs are trained.
    assert cli_main(["reproduce", "tiny-test", "--out", str(out), "--workers", "0"]) == 0
    assert "6 runs, 2 trained now, 4 already stored" in capsys.readouterr().out


def test_runs_lists_what_is_stored_and_what_is_missing(tiny, tmp_path, capsys):
    specs = _specs(True)
    store = Store(tmp_path)
    store.add(specs)
    assert cli_main(["reproduce", "tiny-test", "--quick", "--out", str(tmp_path), "--workers", "0"]) == 0
    capsys.readouterr()
    store.add([RunSpec(**TINY, seed=7)])
    store.fail(specs[0].run_id, "Traceback ...\nValueError: it broke")
    store.checkpoint_path(specs[1].run_id).unlink()
    assert cli_main(["runs", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "5 runs: 1 pending, 0 running, 3 done, 1 failed" in printed
    assert f"{specs[0].run_id} dpf 50% seed 0: ValueError: it broke" in printed
    assert f"{specs[1].run_id} dpf 50% seed 1: its checkpoint file is gone" in printed
    assert "dense seed 7: pending" in printed
    assert "missing (3)" in printed


def test_reproduce_reports_failed_runs_and_writes_no_report(tiny, tmp_path, monkeypatch, capsys):
    broken = registry.Experiment("tiny-test", "broken", lambda quick: [RunSpec(**{**TINY, "batch_size": 500})],
                                 _analyze)
    monkeypatch.setitem(registry._REGISTRY, "tiny-test", broken)
    assert cli_main(["reproduce", "tiny-test", "--out", str(tmp_path), "--workers", "0"]) == 1
    printed = capsys.readouterr().out
    assert "1 run(s) failed; no report written" in printed and "batch_size 500 is larger" in printed
    assert not (tmp_path / "tiny-test.md").exists()


@pytest.mark.parametrize("argv,message", [
    (["reproduce"], "give an experiment NAME or --list"),
    (["reproduce", "nothing"], "unknown experiment 'nothing'; registered: demo"),
    (["reproduce", "demo", "--workers", "-1"], "--workers must be >= 0"),
    (["runs"], "the following arguments are required: directory"),
])
def test_command_line_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("argv,expected", [
    (["reproduce", "minified", "--data", "digits"], "minified-digits"),
    (["reproduce", "zoo-twins", "--data", "digits"], "zoo-twins-digits"),
    (["reproduce", "zoo-twins", "--data", "mnist1d"], "zoo-twins"),  # its own data set
    (["reproduce", "minified-digits", "--data", "digits"], "minified-digits"),
    (["reproduce", "minified"], "minified"),
])
def test_data_picks_the_experiment_registered_for_that_data_set(argv, expected, tmp_path, monkeypatch):
    called = {}

    def reproduce(name, **options):
        called.update(name=name, **options)
        raise KeyboardInterrupt  # stop before printing a result this fake does not have

    monkeypatch.setattr(registry, "reproduce", reproduce)
    with pytest.raises(KeyboardInterrupt):
        cli_main([*argv, "--quick", "--out", str(tmp_path)])
    assert called["name"] == expected and called["quick"] and called["out"] == str(tmp_path)


def test_data_without_a_variant_is_refused_naming_what_exists(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(registry, "reproduce", lambda *a, **k: pytest.fail("training started"))
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["reproduce", "zoo-twins", "--data", "cifar", "--out", str(tmp_path)])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert "--data cifar: experiment 'zoo-twins' runs on mnist1d, and no 'zoo-twins-cifar' is registered" in error
    assert "(its variants: digits)" in error
    with pytest.raises(SystemExit):
        cli_main(["reproduce", "demo", "--data", "digits", "--out", str(tmp_path)])
    assert "experiment 'demo' runs on mnist1d, and no 'demo-digits' is registered" in capsys.readouterr().err


def test_unwritable_out_and_missing_directory_are_refused_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(registry, "reproduce", lambda *a, **k: pytest.fail("training started"))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SystemExit):
        cli_main(["reproduce", "demo", "--out", str(blocker / "below")])
    assert "cannot write the experiment directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["runs", str(tmp_path / "none")])
    assert "holds no run index" in capsys.readouterr().err


def test_registry_checks():
    with pytest.raises(ValueError, match="lowercase letters, digits and '-'"):
        registry.Experiment("Bad Name", "", _specs, _analyze)
    with pytest.raises(TypeError, match="analyze of experiment 'x' must be callable"):
        registry.Experiment("x", "", _specs, None)
    with pytest.raises(ValueError, match="unknown experiment 'nope'"):
        registry.get("nope")
    with pytest.raises(ValueError, match="already registered by"):
        registry.register(registry.Experiment("demo", "another", _specs, _analyze))
