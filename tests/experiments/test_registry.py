"""Every registered experiment, at the tiny profile: figures, summary, a verdict for each claim."""

import pytest

from bnlab.experiments import EXPERIMENTS, PROFILES, SOURCES, resolve_config, run_experiment
from bnlab.runs import RunDir


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_experiment_tiny_profile_produces_figures_summary_and_verdicts(name, tiny_reproduce):
    out, _, rows = tiny_reproduce
    exp = EXPERIMENTS[name]
    assert exp.claims and set(PROFILES) <= set(exp.profiles)
    assert len({c.id for c in exp.claims}) == len(exp.claims)
    assert all(c.source in SOURCES for c in exp.claims)
    run = RunDir.find_complete(out, name, resolve_config(name, "tiny"))
    assert run is not None and run.complete
    figs = sorted((run.path / "figures").glob("*.png"))
    assert figs and all(f.stat().st_size > 5000 for f in figs)
    assert isinstance(run.read_json("summary.json"), dict) and run.read_json("summary.json")
    verdicts = run.read_json("verdicts.json")
    assert [v["id"] for v in verdicts] == [c.id for c in exp.claims]
    for v in verdicts:
        assert v["status"] in ("holds", "fails", "inconclusive") and v["detail"]
    assert [r["id"] for r in rows if r["experiment"] == name] == [c.id for c in exp.claims]


def test_complete_runs_are_reused_and_force_redoes_them(tmp_path):
    run, reused = run_experiment("large-lr", profile="tiny", out=tmp_path, device="cpu", progress=False, overrides=["norms=['bn']", "epochs=1.0"])
    assert not reused and run.complete
    again, reused = run_experiment("large-lr", profile="tiny", out=tmp_path, device="cpu", progress=False, overrides=["norms=['bn']", "epochs=1.0"])
    assert reused and again.path == run.path
    forced, reused = run_experiment("large-lr", profile="tiny", out=tmp_path, device="cpu", progress=False, overrides=["norms=['bn']", "epochs=1.0"], force=True)
    assert not reused and forced.path != run.path
    key = lambda r: [(v["id"], v["status"], v["value"]) for v in r.read_json("verdicts.json")]
    assert key(forced) == key(run)  # deterministic on CPU: the same numbers again


def test_overrides_change_the_config():
    a = resolve_config("large-lr", "tiny")
    b = resolve_config("large-lr", "tiny", ["epochs=1", "norms=['bn']"])
    assert b["epochs"] == 1.0 and b["norms"] == ["bn"] and a["epochs"] == 2.0
