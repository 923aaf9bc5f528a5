import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bnlab.cli import main
from bnlab.runs import RunDir, config_hash

ROOT = Path(__file__).resolve().parents[2]


def test_run_dir_layout_and_reuse(tmp_path):
    cfg = {"a": 1, "b": [1, 2]}
    run = RunDir.create(tmp_path, "exp", cfg)
    assert (run.path / "config.json").exists() and (run.path / "env.json").exists()
    run.append_metrics({"step": 0, "loss": float("nan")})
    run.append_metrics({"step": 1, "loss": 1.5})
    assert not run.complete and RunDir.find_complete(tmp_path, "exp", cfg) is None
    assert (run.path / "metrics.jsonl.partial").exists() and not (run.path / "metrics.jsonl").exists()
    run.finish({"ok": True})
    assert run.complete and not (run.path / "metrics.jsonl.partial").exists()
    recs = run.metrics()
    assert recs[1] == {"step": 1, "loss": 1.5} and recs[0]["loss"] != recs[0]["loss"]  # NaN survives
    assert run.read_json("summary.json") == {"ok": True}
    assert run.read_json("config.json")["config_hash"] == config_hash(cfg)
    assert RunDir.find_complete(tmp_path, "exp", cfg).path == run.path
    assert RunDir.find_complete(tmp_path, "exp", {"a": 2, "b": [1, 2]}) is None
    assert config_hash({"b": [1, 2], "a": 1}) == config_hash(cfg)  # key order does not matter
    env = run.read_json("env.json")
    assert env["torch"] == torch.__version__ and "python" in env
    assert not list(run.path.glob("*.tmp")) and not list(run.path.glob(".*tmp"))


def test_cli_train_writes_a_complete_run(tmp_path, capsys):
    rc = main(["train", "--data", "synthetic", "--model", "mlp", "--norm", "bn", "--lr", "0.1", "--steps", "5",
               "--batch-size", "32", "--out", str(tmp_path), "--quiet", "--width", "8", "--depth", "1"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "run directory:" in out and "test loss" in out
    (run_path,) = (tmp_path / "synthetic-mlp-bn").iterdir()
    run = RunDir(run_path)
    assert run.complete
    assert sorted(p.name for p in run_path.iterdir()) == ["complete", "config.json", "env.json", "metrics.jsonl", "summary.json"]
    steps = [r for r in run.metrics() if r.get("event") != "eval"]
    assert [r["step"] for r in steps] == [0, 1, 2, 3, 4]
    summary = run.read_json("summary.json")
    assert summary["steps"] == 5 and summary["diverged"] is False
    assert run.read_json("config.json")["config"]["width"] == 8


@pytest.mark.parametrize("argv, message", [
    (["train", "--lr", "0"], "bnlab: error: learning rate must be a finite number > 0, got 0.0"),
    (["train", "--lr", "-3"], "bnlab: error: learning rate must be a finite number > 0, got -3.0"),
    (["train", "--batch-size", "0"], "bnlab: error: batch size must be a finite number > 0, got 0"),
    (["train", "--epochs", "-1"], "bnlab: error: epochs must be >= 0, got -1.0"),
    (["train", "--lr", "inf"], "bnlab: error: learning rate must be a finite number > 0, got inf"),
    (["train", "--seed", "-1"], "bnlab: error: seed must be an integer in [0, 2**32 - 1], got -1"),
    (["train", "--name", "../../escape"], "bnlab: error: run name must be a single directory name"),
    (["run", "large-lr", "--profile", "tiny", "--set", "seed=-1"], "bnlab: error: seed must be an integer in [0, 2**32 - 1], got -1"),
    (["run", "large-lr", "--profile", "tiny", "--set", "norms=['xx']"], "bnlab: error: unknown norm 'xx'; accepted: "),
    (["run", "large-lr", "--profile", "tiny", "--set", "epochs=-1"], "bnlab: error: epochs must be a finite number >= 0, got -1.0"),
    (["reproduce", "--only", "", "--profile", "tiny"], "bnlab: error: --only names no experiment; accepted: "),
    (["reproduce", "--only", ",", "--profile", "tiny"], "bnlab: error: --only names no experiment; accepted: "),
    (["train", "--data", "imagenet"], "bnlab: error: unknown dataset 'imagenet'; accepted: cifar10, cifar10-synthetic, digits, mnist1d, synthetic"),
    (["train", "--model", "resnet"], "bnlab: error: unknown model 'resnet'; accepted: convnet, dln, mlp, preresnet, resnet18, vgg"),
    (["train", "--norm", "wn"], "bnlab: error: unknown norm 'wn'; accepted: bn, bn-noisy, gn, l1, l2, linf, ln, none"),
    (["train", "--optimizer", "lbfgs"], "bnlab: error: unknown optimizer 'lbfgs'; accepted: adam, adamw, sgd"),
    (["train", "--device", "tpu"], "bnlab: error: unknown device 'tpu'; accepted: auto, cpu, cuda, cuda:N"),
    (["train", "--lr", "abc"], "bnlab train: error: argument --lr: invalid float value: 'abc'"),
    (["run", "nope"], "bnlab: error: unknown experiment 'nope'; accepted: "),
    (["run", "large-lr", "--profile", "huge"], "bnlab: error: unknown profile 'huge'; accepted: paper, quick, tiny"),
    (["run", "large-lr", "--set", "colour=3"], "bnlab: error: unknown setting 'colour'; accepted: "),
    (["run", "large-lr", "--set", "epochs=fast"], "bnlab: error: setting 'epochs' takes a float, got 'fast'"),
])
def test_cli_user_errors_exit_2_with_one_line_and_write_nothing(tmp_path, capsys, argv, message):
    assert _exit_code(argv + ["--out", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(message), err
    assert not (tmp_path / "runs").exists()


def _exit_code(argv):
    """main() returns 2 for bnlab's own checks; argparse's checks exit with SystemExit(2)."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def test_missing_cifar_directory_exits_2(tmp_path, capsys):
    rc = main(["train", "--data", "cifar10", "--root", str(tmp_path / "none"), "--out", str(tmp_path / "runs")])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bnlab: error: CIFAR-10 not found in") and "--download" in err and "\n" not in err
    assert not (tmp_path / "runs").exists()


def test_console_script_error_has_no_traceback(tmp_path):
    exe = Path(sys.executable).with_name("bnlab")
    proc = subprocess.run([str(exe), "train", "--norm", "wn", "--out", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "bnlab: error: unknown norm 'wn'; accepted: bn, bn-noisy, gn, l1, l2, linf, ln, none"
    assert "Traceback" not in proc.stderr
    help_ = subprocess.run([str(exe), "--help"], capture_output=True, text=True)
    assert help_.returncode == 0 and "train" in help_.stdout and "list" in help_.stdout


def test_list_names_everything(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for word in ("digits", "mnist1d", "cifar10", "synthetic", "convnet", "preresnet", "vgg", "mlp", "bn", "ln", "gn", "none", "large-lr"):
        assert word in out


def test_custom_loop_example_runs_and_probes_do_not_change_it():
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import custom_loop
    finally:
        sys.path.pop(0)
    records = custom_loop.main(steps=12)
    assert [r["step"] for r in records] == list(range(12))
    assert all(r["grad_norm/total"] > 0 and "loss" in r for r in records)
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "custom_loop.py"), "--steps", "5"], capture_output=True, text=True)
    assert proc.returncode == 0 and "grad_norm/total" in proc.stdout


def test_cli_toy_is_the_registered_toy_experiment(tmp_path, capsys):
    out = tmp_path / "runs"
    assert main(["toy", "--profile", "tiny", "--steps", "60", "--tol", "1e-7", "--out", str(out)]) == 0
    (run_dir,) = (out / "toy").iterdir()
    assert sorted(p.name for p in (run_dir / "figures").iterdir()) == ["toy_deviation.png", "toy_surface.png", "toy_trajectories.png", "toy_zoom.gif"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 60 and summary["alpha"] == pytest.approx(1 - 1.0 * 0.02)  # alpha = 1 - eta*lambda
    assert json.loads((run_dir / "verdicts.json").read_text())["thresholds"]["deviation_tol"] == 1e-7
    assert max(summary["deviation"]["float64"]) <= 1e-9  # float64 runs agree to round-off
    assert main(["toy", "--dtype", "float16", "--out", str(tmp_path / "bad")]) == 2
    assert "unknown dtype 'float16'; accepted: float32, float64" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
