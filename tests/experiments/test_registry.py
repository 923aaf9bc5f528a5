"""Every registered experiment, at the tiny profile: figures, summary, a verdict for each claim."""

import json

import pytest

from bnlab.experiments import EXPERIMENTS, PROFILES, resolve_config, run_experiment


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_experiment_tiny_profile_produces_figures_summary_and_verdicts(name, tmp_path):
    exp = EXPERIMENTS[name]
    assert exp.claims and set(PROFILES) <= set(exp.profiles)
    assert len({c.id for c in exp.claims}) == len(exp.claims)
    run, reused = run_experiment(name, profile="tiny", out=tmp_path, device="cpu", progress=False)
    assert not reused and run.complete
    figs = sorted((run.path / "figures").glob("*.png"))
    assert figs and all(f.stat().st_size > 5000 for f in figs)
    assert isinstance(run.read_json("summary.json"), dict) and run.read_json("summary.json")
    verdicts = run.read_json("verdicts.json")
    assert [v["id"] for v in verdicts] == [c.id for c in exp.claims]
    for v in verdicts:
        assert v["status"] in ("holds", "fails", "inconclusive") and v["detail"]
    # a second request with the same configuration reuses the complete run; --force redoes it
    again, reused = run_experiment(name, profile="tiny", out=tmp_path, device="cpu", progress=False)
    assert reused and again.path == run.path
    forced, reused = run_experiment(name, profile="tiny", out=tmp_path, device="cpu", progress=False, force=True)
    assert not reused and forced.path != run.path


def test_overrides_change_the_config_hash():
    a = resolve_config("large-lr", "tiny")
    b = resolve_config("large-lr", "tiny", ["epochs=1", "norms=['bn']"])
    assert b["epochs"] == 1.0 and b["norms"] == ["bn"] and a["epochs"] == 2.0
