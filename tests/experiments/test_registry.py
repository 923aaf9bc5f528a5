"""Every registered experiment follows the contract: typed Config/Thresholds, measure → judge → figures.

The tiny profile of every experiment runs once per session (``tiny_reproduce``); then ``judge`` on
the stored summary must give exactly the verdicts of the run, and ``bnlab rejudge`` must reproduce
them without training, and change them when a threshold is changed.
"""

import dataclasses
import json
import shutil

import pytest

import bnlab.train
from bnlab.cli import main
from bnlab.experiments import (EXPERIMENTS, PROFILES, SOURCES, as_dict, field_types, from_dict, judge_record, rejudge,
                               resolve, resolve_config, run_experiment, verdict_rows)
from bnlab.experiments.base import field_docs
from bnlab.runs import RunDir


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_config_and_thresholds_are_typed_documented_frozen_dataclasses(name):
    exp = EXPERIMENTS[name]
    for cls in (exp.Config, exp.Thresholds):
        assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen
        fields = field_types(cls)
        undocumented = sorted(set(fields) - set(field_docs(cls)))
        assert not undocumented, f"{cls.__qualname__}: fields without a docstring: {undocumented}"
    assert set(PROFILES) <= set(exp.profiles)
    for p in PROFILES:
        cfg = exp.profiles[p]
        assert from_dict(exp.Config, as_dict(cfg)) == cfg  # survives the JSON round trip
        th = exp.registered_thresholds(p)
        assert from_dict(exp.Thresholds, as_dict(th)) == th


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_tiny_profile_and_judge_on_the_stored_summary_gives_the_runs_verdicts(name, tiny_reproduce):
    out, _, rows = tiny_reproduce
    exp = EXPERIMENTS[name]
    assert exp.claims and all(c.source in SOURCES for c in exp.claims)
    run = RunDir.find_complete(out, name, resolve_config(name, "tiny"))
    assert run is not None and run.complete
    figs = sorted((run.path / "figures").glob("*.png"))
    assert figs and all(f.stat().st_size > 5000 for f in figs)
    summary = run.read_json("summary.json")
    assert isinstance(summary, dict) and summary
    stored = run.read_json("verdicts.json")
    assert [v["id"] for v in stored["verdicts"]] == [c.id for c in exp.claims]
    for v in stored["verdicts"]:
        assert v["status"] in ("holds", "fails", "inconclusive") and v["detail"] and v["rule"]
    _, th = resolve(name, "tiny")
    assert stored["thresholds"] == as_dict(th) and stored["departures"] == {}
    # judge is a pure function of the stored summary: the same verdicts again, from JSON
    again = judge_record(exp, "tiny", json.loads(json.dumps(summary)), th)
    assert json.dumps(again, sort_keys=True, default=str) == json.dumps(stored, sort_keys=True, default=str)
    assert [r["id"] for r in rows if r["experiment"] == name] == [c.id for c in exp.claims]


@pytest.fixture()
def tiny_copy(tiny_reproduce, tmp_path):
    out, _, rows = tiny_reproduce
    copy = tmp_path / "runs"
    shutil.copytree(out, copy)
    return copy, rows


def _no_training(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("rejudge trained a model")

    monkeypatch.setattr(bnlab.train, "train", boom)


def test_rejudge_without_changes_gives_the_verdicts_of_the_run(tiny_copy, monkeypatch):
    copy, rows = tiny_copy
    _no_training(monkeypatch)
    before = {p: p.stat().st_mtime_ns for p in copy.glob("*/*/metrics.jsonl")}
    report, again = rejudge(copy)
    key = lambda rs: sorted((r["experiment"], r["id"], r["status"], json.dumps(r["value"])) for r in rs)
    assert key(again) == key(rows)
    assert report.exists()
    assert {p: p.stat().st_mtime_ns for p in copy.glob("*/*/metrics.jsonl")} == before  # nothing re-measured


def test_rejudge_with_a_changed_threshold_changes_that_verdict_and_shows_the_departure(tiny_copy, monkeypatch, capsys):
    copy, _ = tiny_copy
    _no_training(monkeypatch)
    runs_before = sorted(p.name for p in copy.glob("*/*"))
    status = lambda: {(r["experiment"], r["id"]): r["status"] for r in rejudge(copy, overrides)[1]}
    overrides = ["large-lr.bn_min_acc=1.01"]
    assert status()[("large-lr", "bn-trains-at-large-lr")] == "fails"  # no accuracy reaches 101%
    overrides = ["large-lr.bn_min_acc=0.0"]
    assert status()[("large-lr", "bn-trains-at-large-lr")] == "holds"  # tiny BN run does not diverge
    html = (copy / "report.html").read_text()
    assert 'id="departures"' in html and "large-lr.bn_min_acc" in html
    assert sorted(p.name for p in copy.glob("*/*")) == runs_before  # no new run
    # back to the registered thresholds: no departure shown
    assert main(["rejudge", str(copy)]) == 0
    assert 'id="departures"' not in (copy / "report.html").read_text()
    assert "rejudged" in capsys.readouterr().out


@pytest.mark.parametrize("bad, msg", [
    (["large-lr.epochs=3"], "configuration setting of large-lr"),
    (["no_such_threshold=1"], "unknown threshold 'no_such_threshold'"),
    (["large-lr.bn_min_acc=high"], "takes a float"),
    (["bn_min_acc"], "takes"),
])
def test_rejudge_bad_settings_are_one_line_errors(tiny_copy, bad, msg, capsys):
    copy, _ = tiny_copy
    before = (copy / "large-lr").glob("*/verdicts.json")
    snapshot = {p: p.read_bytes() for p in before}
    assert main(["rejudge", str(copy), *sum((["--set", b] for b in bad), [])]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bnlab: error:") and msg in err and err.count("\n") == 1
    assert {p: p.read_bytes() for p in snapshot} == snapshot  # nothing rewritten


def test_complete_runs_are_reused_and_force_redoes_them(tmp_path):
    kw = dict(profile="tiny", out=tmp_path, device="cpu", progress=False, overrides=["norms=('bn',)", "epochs=1.0"])
    run, reused = run_experiment("large-lr", **kw)
    assert not reused and run.complete
    again, reused = run_experiment("large-lr", **kw)
    assert reused and again.path == run.path
    forced, reused = run_experiment("large-lr", **kw, force=True)
    assert not reused and forced.path != run.path
    key = lambda r: [(v["id"], v["status"], v["value"]) for v in verdict_rows(r)]
    assert key(forced) == key(run)  # deterministic on CPU: the same numbers again
    # a threshold given to `run` is applied to the reused run without training it again
    th, reused = run_experiment("large-lr", **{**kw, "overrides": kw["overrides"] + ["bn_min_acc=1.01"]})
    assert reused and th.path == forced.path  # the newest complete run with that configuration
    assert th.read_json("verdicts.json")["departures"] == {"bn_min_acc": {"registered": 0.9, "applied": 1.01}}


def test_overrides_are_parsed_from_the_dataclass_types():
    assert resolve_config("large-lr", "tiny", ["norms=bn,none", "batch_size=1e2"])["norms"] == ["bn", "none"]
    assert resolve_config("large-lr", "tiny", ["norms=bn", "batch_size=1e2"])["batch_size"] == 100
    a = resolve_config("large-lr", "tiny")
    b = resolve_config("large-lr", "tiny", ["epochs=1", "norms=['bn']"])
    assert b["epochs"] == 1.0 and isinstance(b["epochs"], float) and b["norms"] == ["bn"] and a["epochs"] == 2.0
    cfg, th = resolve("large-lr", "tiny", ["bn_min_acc=0.5"])
    assert th.bn_min_acc == 0.5 and resolve_config("large-lr", "tiny", ["bn_min_acc=0.5"]) == a  # not hashed


@pytest.mark.parametrize("bad, msg", [
    ("nope=1", "unknown setting 'nope'; accepted: "),
    ("epochs=ten", "setting 'epochs' takes a float"),
    ("width=2.5", "setting 'width' takes an int"),
    ("norms=(1, 2)", "setting 'norms' takes a tuple of str"),
    ("epochs", "--set takes key=value"),
])
def test_bad_overrides_are_one_line_errors(bad, msg, tmp_path, capsys):
    assert main(["run", "large-lr", "--profile", "tiny", "--out", str(tmp_path), "--set", bad]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bnlab: error:") and msg in err and err.count("\n") == 1
    assert not any(tmp_path.iterdir())


def test_settings_command_lists_fields_with_their_docs(capsys):
    assert main(["settings", "large-lr", "--profile", "paper"]) == 0
    out = capsys.readouterr().out
    assert "data = 'cifar10'" in out and "bn_min_acc = 0.8" in out and "Dataset" in out
