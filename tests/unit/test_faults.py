"""Bad places, full disks, overflowing numbers, damaged runs and two processes: one line, nothing lost.

Each fault gets one line on standard error (``bnlab: error: ...`` or a warning), exit status 2 or
0 as documented, no traceback, and no half-written run directory.
"""

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bnlab import runs as runs_mod
from bnlab.cli import main
from bnlab.data import ArrayData
from bnlab.experiments import run_experiment, verdict_rows
from bnlab.runs import COMPLETE, DAMAGED, RunDir, output_lock, unreadable_reason
from bnlab.train import make_optimizer, train

FAST = ["--set", "norms=('bn',)", "--set", "epochs=0.25"]
FAST_OVERRIDES = ["norms=('bn',)", "epochs=0.25"]


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


def _one_line_error(capsys, needle: str) -> str:
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.strip()]
    assert lines and lines[-1].startswith("bnlab: error:") and needle in lines[-1], err
    assert "Traceback" not in err
    return lines[-1]


# ----------------------------------------------------------------------------- output locations
@pytest.mark.parametrize("cmd", [["run", "large-lr", "--profile", "tiny", *FAST], ["train", "--steps", "1"],
                                 ["reproduce", "--profile", "tiny", "--only", "large-lr"]])
def test_out_that_is_a_file_or_below_one_is_refused_and_nothing_is_written(tmp_path, capsys, cmd):
    f = tmp_path / "a-file"
    f.write_text("x")
    for out, needle in ((f, "is a file"), (f / "sub", "cannot be created")):
        assert main([*cmd, "--out", str(out), "--quiet"]) == 2
        _one_line_error(capsys, needle)
    assert _files(tmp_path) == ["a-file"] and f.read_text() == "x"


def test_out_in_an_unwritable_place_is_refused(tmp_path, capsys, monkeypatch):
    # root may write anywhere, so the refusal of a read-only place is simulated at os.access
    real = os.access
    monkeypatch.setattr(runs_mod.os, "access", lambda p, mode: False if Path(p) == tmp_path else real(p, mode))
    assert main(["run", "large-lr", "--profile", "tiny", *FAST, "--out", str(tmp_path / "runs"), "--quiet"]) == 2
    _one_line_error(capsys, "is not writable")
    assert _files(tmp_path) == []


# ----------------------------------------------------------------------------- a full disk
@pytest.mark.parametrize("where", ["metrics", "summary", "figure"])
def test_a_full_disk_mid_run_is_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch, where):
    enospc = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if where == "metrics":
        calls = {"n": 0}
        real = RunDir.append_metrics

        def full(self, rec):
            calls["n"] += 1
            if calls["n"] > 3:
                raise enospc
            real(self, rec)

        monkeypatch.setattr(RunDir, "append_metrics", full)
    elif where == "summary":
        real_write = RunDir.write_json
        monkeypatch.setattr(RunDir, "write_json", lambda self, name, obj: (_ for _ in ()).throw(enospc)
                            if name == "summary.json" else real_write(self, name, obj))
    else:
        import matplotlib.figure

        monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda *a, **k: (_ for _ in ()).throw(enospc))
    out = tmp_path / "runs"
    assert main(["run", "large-lr", "--profile", "tiny", *FAST, "--out", str(out), "--quiet"]) == 2
    _one_line_error(capsys, "No space left on device")
    assert _files(tmp_path) == []  # the run, its experiment directory and --out itself are gone


def test_atomic_write_leaves_no_temp_file_when_the_disk_is_full(tmp_path, monkeypatch):
    from bnlab import _io

    monkeypatch.setattr(_io.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(OSError):
        _io.atomic_write_json(tmp_path / "x.json", {"a": 1})
    assert _files(tmp_path) == []


# ----------------------------------------------------------------------------- numbers that overflow
@pytest.mark.parametrize("flag, value", [("--lr", "1e308"), ("--wd", "1e39"), ("--lr", "3.5e38")])
def test_settings_that_overflow_float32_are_one_line(tmp_path, capsys, flag, value):
    assert main(["train", flag, value, "--steps", "2", "--out", str(tmp_path / "r"), "--quiet"]) == 2
    _one_line_error(capsys, "overflows float32")
    assert not (tmp_path / "r").exists()


def test_a_scheduled_lr_that_overflows_is_recorded_as_divergence():
    g = torch.Generator().manual_seed(0)
    data = ArrayData(torch.randn(32, 4, generator=g), torch.randint(0, 3, (32,), generator=g), 3)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    opt = make_optimizer(net.parameters(), lr=1e30)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1e10 ** t)  # 1e30, 1e40 (> float32 max), ...
    h = train(net, data, opt, steps=5, batch_size=8, scheduler=sched, device="cpu")
    assert h.diverged and h.diverged_at is not None and h.diverged_at <= 2


# ----------------------------------------------------------------------------- degenerate budgets
@pytest.mark.parametrize("budget", [["--steps", "0"], ["--epochs", "0"]])
def test_zero_budget_trains_nothing_and_evaluates_the_initial_net(tmp_path, capsys, budget):
    """Documented: a zero budget is a run of 0 steps whose evaluation is that of the initialization."""
    assert main(["train", *budget, "--out", str(tmp_path), "--quiet"]) == 0
    (run_dir,) = (tmp_path / "digits-convnet-bn").iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 0 and not summary["diverged"] and 0.0 <= summary["test_acc"] <= 0.3


# ----------------------------------------------------------------------------- damaged run directories
DAMAGE = {
    "truncated": lambda b: b[: max(1, len(b) // 2)],
    "empty": lambda b: b"",
    "not UTF-8": lambda b: b"\xff\xfe\x00garbage" + b,
    "not JSON": lambda b: b"<html>not json</html>\n",
}


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    run, _ = run_experiment("large-lr", profile="tiny", out=out, overrides=FAST_OVERRIDES, device="cpu", progress=False)
    return run


# an empty metrics.jsonl is a run that logged nothing, which is valid: not a damage case
@pytest.mark.parametrize("name, damage", [(n, d) for n in ("summary.json", "verdicts.json", "config.json", "metrics.jsonl")
                                          for d in sorted(DAMAGE) if (n, d) != ("metrics.jsonl", "empty")])
def test_unreadable_reason_names_the_damaged_file(reference_run, tmp_path, name, damage):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(reference_run.path, copy)
    assert unreadable_reason(copy) is None
    p = copy / name
    p.write_bytes(DAMAGE[damage](p.read_bytes()))
    reason = unreadable_reason(copy)
    assert reason and name in reason


@pytest.mark.parametrize("name, damage", [("summary.json", "truncated"), ("verdicts.json", "not UTF-8"),
                                          ("metrics.jsonl", "not JSON"), ("config.json", "empty")])
def test_a_damaged_run_is_moved_aside_and_only_it_is_redone(reference_run, tmp_path, capsys, name, damage):
    import shutil

    out = tmp_path / "runs"
    shutil.copytree(reference_run.path.parent.parent, out)
    (old,) = (out / "large-lr").iterdir()
    p = old / name
    p.write_bytes(DAMAGE[damage](p.read_bytes()))
    run, reused = run_experiment("large-lr", profile="tiny", out=out, overrides=FAST_OVERRIDES, device="cpu", progress=False)
    err = capsys.readouterr().err
    if name == "config.json":
        # a run whose config cannot be read is not recognised as this configuration's: a new run, the old one untouched
        assert not reused and run.path != old and old.exists()
    else:
        assert "is damaged" in err and name in err and "moved aside" in err and not reused
        (aside,) = [q for q in (out / "large-lr").iterdir() if DAMAGED in q.name]
        assert aside.name.startswith(old.name) and (aside / COMPLETE).exists()
        assert unreadable_reason(aside) and unreadable_reason(run.path) is None  # (the new run may reuse the old name)
    key = lambda r: [(v["id"], v["status"], v["value"]) for v in verdict_rows(r)]
    assert key(run) == key(reference_run)


def test_report_and_rejudge_render_readable_runs_and_list_unreadable_ones(reference_run, tmp_path, capsys):
    import shutil

    out = tmp_path / "runs"
    shutil.copytree(reference_run.path.parent.parent, out)
    run_experiment("toy", profile="tiny", out=out, device="cpu", progress=False)
    (toy_run,) = (out / "toy").iterdir()
    (toy_run / "summary.json").write_bytes(b"{trunc")
    for cmd in (["report", str(out)], ["rejudge", str(out)]):
        assert main(cmd) == 0
        err = capsys.readouterr().err
        assert "warning" in err and str(toy_run) in err and "summary.json" in err and "Traceback" not in err
        html = (out / "report.html").read_text()
        assert 'id="unreadable"' in html and "summary.json is not JSON" in html
        assert 'data-claim="large-lr/' in html and 'data-claim="toy/' not in html


# ----------------------------------------------------------------------------- two processes, one --out
def test_a_second_process_on_the_same_out_refuses_naming_the_first(tmp_path, capsys):
    out = tmp_path / "runs"
    with output_lock(out):
        for cmd in (["reproduce", "--profile", "tiny", "--only", "large-lr"], ["run", "large-lr", "--profile", "tiny", *FAST],
                    ["train", "--steps", "1"]):
            assert main([*cmd, "--out", str(out), "--quiet"]) == 2
            line = _one_line_error(capsys, "another bnlab process")
            assert f"pid {os.getpid()}" in line
        assert _files(out) == [runs_mod.LOCK]
    # released: the next one runs
    assert main(["run", "large-lr", "--profile", "tiny", *FAST, "--out", str(out), "--quiet"]) == 0


def test_the_lock_is_released_when_its_holder_is_killed(tmp_path):
    out = tmp_path / "runs"
    code = ("import sys, time; from bnlab.runs import output_lock\n"
            "with output_lock(sys.argv[1]):\n    print('locked', flush=True); time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(Exception, match=f"pid {proc.pid}"):
            with output_lock(out):
                pass
    finally:
        proc.kill()
        proc.wait(timeout=30)
    with output_lock(out):  # SIGKILL released it
        pass


# ----------------------------------------------------------------------------- absurd sizes
@pytest.mark.parametrize("name, shape, opts", [("mlp", (1, 8, 8), dict(width=32, depth=3)),
                                                ("convnet", (1, 40), dict(width=8, depth=2)),
                                                ("preresnet", (1, 8, 8), dict(width=4, depth=14)),
                                                ("vgg", (3, 32, 32), dict(width=8, depth=11))])
def test_memory_estimate_counts_the_real_models_parameters_and_activations(name, shape, opts):
    from bnlab.models import make
    from bnlab.models.memory import estimate

    net = make(name, in_shape=shape, num_classes=10, **opts)
    acts = []
    hooks = [m.register_forward_hook(lambda m, i, o: acts.append(o.numel())) for m in net.modules() if not list(m.children())]
    net(torch.randn(3, *shape))
    for h in hooks:
        h.remove()
    e = estimate(name, in_shape=shape, num_classes=10, batch_size=3, **opts)
    assert e.parameters == sum(p.numel() for p in net.parameters())
    assert e.activations_per_example * 3 == sum(acts)


@pytest.mark.parametrize("name, depth", [("mlp", 90), ("convnet", 70), ("preresnet", 6 * 12 + 2)])
def test_deep_models_are_extrapolated_exactly_from_two_shallow_builds(name, depth):
    from bnlab.models import memory

    direct = memory._count(name, (1, 8, 8), 10, "bn", 2, dict(width=4, depth=depth))
    e = memory.estimate(name, in_shape=(1, 8, 8), num_classes=10, width=4, depth=depth)  # depth > DIRECT_DEPTH
    assert depth > memory.DIRECT_DEPTH and (e.parameters, e.activations_per_example) == direct


@pytest.mark.parametrize("argv", [["train", "--model", "mlp", "--depth", "1000000"],
                                  ["train", "--model", "convnet", "--width", "100000000"],
                                  ["run", "large-lr", "--profile", "tiny", "--set", "depth=1000000000"],
                                  ["train", "--model", "mlp", "--depth", "50", "--max-memory", "1K"]])
def test_a_model_that_cannot_fit_is_refused_in_one_line_before_it_is_built(tmp_path, capsys, argv):
    assert main([*argv, "--out", str(tmp_path / "r"), "--quiet"]) == 2  # returns at once: nothing is built
    _one_line_error(capsys, "would need about")
    assert not (tmp_path / "r").exists()


def test_the_memory_limit_can_be_overridden(monkeypatch):
    from bnlab.models.memory import check_fits, memory_limit

    monkeypatch.setenv("BNLAB_MAX_MEMORY", "2K")
    assert memory_limit() == 2048
    with pytest.raises(Exception, match="more than the 2 KiB available"):
        check_fits("mlp", in_shape=(1, 8, 8), num_classes=10, width=8, depth=2)
    assert check_fits("mlp", in_shape=(1, 8, 8), num_classes=10, width=8, depth=2, max_memory="1G").parameters > 0


def test_cleanup_removes_only_unfinished_runs_bnlab_started(tmp_path):
    from bnlab.runs import remove_unfinished

    out = tmp_path / "runs"
    ours = out / "large-lr" / "20240101-120000-abcdef012345"
    ours.mkdir(parents=True)
    (ours / "config.json").write_text(json.dumps({"name": "large-lr", "config_hash": "abcdef012345", "config": {}}))
    empty = out / "large-lr" / "20240101-120001-abcdef012345"
    empty.mkdir()
    user = out / "photos" / "20240101-120000-abcdef012345"  # looks like a run id, but is not bnlab's
    user.mkdir(parents=True)
    (user / "img.txt").write_text("keep me")
    with output_lock(out):
        pass
    assert not ours.exists() and not empty.exists()
    assert (user / "img.txt").read_text() == "keep me"
    assert remove_unfinished(out) == []


def test_a_damaged_array_file_makes_the_run_unreadable(reference_run, tmp_path):
    import shutil

    import numpy as np

    copy = tmp_path / "run"
    shutil.copytree(reference_run.path, copy)
    np.savez_compressed(copy / "extra.npz", a=np.arange(1000))
    assert unreadable_reason(copy) is None
    (copy / "extra.npz").write_bytes((copy / "extra.npz").read_bytes()[:100])
    assert "extra.npz" in unreadable_reason(copy)


def test_a_bad_max_memory_is_one_line_even_where_no_model_is_checked(tmp_path, capsys):
    assert main(["run", "toy", "--profile", "tiny", "--max-memory", "abc", "--out", str(tmp_path / "r")]) == 2
    _one_line_error(capsys, "is not a size")
    assert not (tmp_path / "r").exists()
