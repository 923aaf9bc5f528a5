"""Fuzzing the command line: every subcommand, valid and invalid tokens.

For every generated command line: the exit status is 0 or 2, no traceback reaches the user, and
nothing is written outside the ``--out`` (or ``--output``) locations the command line names.
Budgets are kept small (tiny profile, a few steps) so that the valid commands finish quickly;
complete runs are reused across examples, as a user's reruns would be. Failing examples found
by the fuzzer are kept below as ``@example`` regression cases.
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from bnlab.cli import main
from bnlab.experiments import EXPERIMENTS, field_types

NUMBERS = ["0", "1", "2", "-1", "0.5", "1e-3", "nan", "inf", "-inf", "1e308", "", "x", "1_0", "٣", "0x10"]
PATHS = ["out", "out/sub", "./out", "a/../out", "../out2", "out/../../out3", "", "ünï cødé", "out/" + "d" * 40]
SMALL_INTS = ["0", "1", "2", "-1", "", "x", "3.5", "nan"]
WIDTHS = ["1", "4", "0", "-3", "x", "1000000000"]
DEPTHS = ["1", "2", "14", "0", "-1", "1000000"]
NAMES = {
    "data": ["digits", "mnist1d", "cifar10", "nope", "", "../digits"],
    "model": ["mlp", "convnet", "preresnet", "vgg", "nope", ""],
    "norm": ["bn", "none", "gn", "ln", "bn-noisy", "nope", ""],
    "optimizer": ["sgd", "adam", "adamw", "nope", ""],
    "device": ["auto", "cpu", "cuda", "cuda:7", "nope", ""],
    "profile": ["tiny", "nope", "", "TINY"],
    "dtype": ["float32", "float64", "float16", ""],
    "experiment": sorted(EXPERIMENTS) + ["nope", "", "../x"],
}


def _flag(name, values):
    return st.tuples(st.just(name), st.sampled_from(values)).map(list)


def _set_pairs():
    """``--set key=value`` with keys of every experiment's Config and Thresholds and odd values."""
    keys = sorted({k for e in EXPERIMENTS.values() for cls in (e.Config, e.Thresholds) for k in field_types(cls)})
    values = NUMBERS + ["()", "(1,)", "('bn',)", "[0.1, 'x']", "True", "None", "bn", "'✓'"]
    pair = st.tuples(st.sampled_from(keys + ["nope", "", "a.b"]), st.sampled_from(values)).map(lambda kv: f"{kv[0]}={kv[1]}")
    return st.lists(st.tuples(st.just("--set"), pair).map(list), max_size=2)


common = [_flag("--device", NAMES["device"]), _flag("--threads", SMALL_INTS), _flag("--out", PATHS),
          _flag("--max-memory", ["16G", "1K", "x", "", "-1"]), st.just(["--quiet"])]
SUBCOMMANDS = {
    "list": [],
    "train": common + [
        _flag("--data", NAMES["data"]), _flag("--model", NAMES["model"]), _flag("--norm", NAMES["norm"]),
        _flag("--lr", NUMBERS), _flag("--epochs", ["0", "0.01", "-1", "nan", "inf", "x"]), _flag("--steps", SMALL_INTS),
        _flag("--optimizer", NAMES["optimizer"]), _flag("--momentum", NUMBERS), _flag("--wd", NUMBERS),
        _flag("--batch-size", ["1", "16", "0", "-5", "x", "100000000"]), st.just(["--full-batch"]),
        _flag("--width", WIDTHS), _flag("--depth", DEPTHS), st.just(["--no-affine"]), st.just(["--freeze-last"]),
        _flag("--seed", ["0", "7", "-1", "4294967296", "x"]), _flag("--root", PATHS + ["/dev/null"]),
        _flag("--name", ["run", "", "..", "a/b", "ü", "."]),
    ],
    "run": common + [_flag("--profile", NAMES["profile"]), st.just(["--force"])],
    "reproduce": common + [_flag("--profile", NAMES["profile"]),
                           _flag("--only", ["large-lr", "toy", "large-lr,toy", "", ",", "nope", "toy,toy"])],
    "toy": common + [_flag("--profile", NAMES["profile"]), _flag("--steps", SMALL_INTS), _flag("--lr", NUMBERS),
                     _flag("--wd", NUMBERS), _flag("--momentum", NUMBERS), _flag("--dtype", NAMES["dtype"]),
                     _flag("--tol", NUMBERS)],
    "report": [_flag("--output", ["r.html", "", "../r.html", "out", "out/r.html"])],
    "rejudge": [],
    "settings": [_flag("--profile", NAMES["profile"])],
}
POSITIONAL = {"run": NAMES["experiment"], "settings": NAMES["experiment"], "report": PATHS + ["missing"],
              "rejudge": PATHS + ["missing"]}


@st.composite
def command_lines(draw):
    cmd = draw(st.sampled_from(sorted(SUBCOMMANDS)))
    argv = [cmd]
    if cmd in POSITIONAL:
        argv.append(draw(st.sampled_from(POSITIONAL[cmd])))
    if cmd in ("train", "toy"):
        argv += ["--steps", "2"]  # a small budget first: a generated --steps later wins
    if cmd in ("run", "reproduce", "toy"):
        argv += ["--profile", "tiny"]
    for flag in draw(st.lists(st.sampled_from(SUBCOMMANDS[cmd]), max_size=5)) if SUBCOMMANDS[cmd] else []:
        argv += draw(flag)
    if cmd in ("run", "toy", "rejudge"):
        for pair in draw(_set_pairs()):
            argv += pair
    if draw(st.booleans()) and cmd != "list":
        argv.append(draw(st.sampled_from(["--unknown", "-x", "--set", "--out"])))  # a dangling or unknown flag
    return argv


def _written_to(argv: list[str], cwd: Path) -> list[Path]:
    """Where this command line may write: its --out (default runs/) and report's --output (default in RUNS_DIR)."""
    allowed = []
    outs = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--out"]
    allowed += [cwd / o for o in outs] or [cwd / "runs"]
    if argv[0] in ("report", "rejudge") and len(argv) > 1:
        allowed.append(cwd / argv[1])
    allowed += [cwd / argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--output"]
    return [Path(os.path.normpath(p)) for p in allowed]


def _snapshot(root: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    """``<tmp>/a/b/c`` is the working directory, so that ``../..`` stays inside ``<tmp>``."""
    root = tmp_path_factory.mktemp("fuzz")
    cwd = root / "a" / "b" / "c"
    cwd.mkdir(parents=True)
    (cwd / "a-file").write_text("x")
    return root, cwd


@settings(max_examples=int(os.environ.get("BNLAB_FUZZ_EXAMPLES", "150")), deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large])
@given(argv=command_lines())
@example(argv=["train", "--steps", "0", "--out", "out"])
@example(argv=["train", "--lr", "1e308", "--out", "out"])
@example(argv=["run", "large-lr", "--profile", "tiny", "--set", "epochs=nan", "--out", "out"])
@example(argv=["rejudge", "missing", "--set", "a.b=1"])
@example(argv=["report", "a-file"])
@example(argv=["train", "--out", "a-file"])
@example(argv=["report", "out", "--output", ""])  # found by this test: a traceback (EBUSY renaming onto '.')
def test_every_command_line_exits_0_or_2_without_traceback_and_writes_only_under_out(sandbox, argv):
    root, cwd = sandbox
    before = _snapshot(root)
    threads = torch.get_num_threads()
    old = os.getcwd()
    err = io.StringIO()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                code = main(argv)
            except SystemExit as e:  # argparse's usage errors and --help
                code = e.code
    finally:
        os.chdir(old)
        torch.set_num_threads(threads)
    assert code in (0, 2), (argv, code, err.getvalue()[-2000:])
    assert "Traceback" not in err.getvalue(), (argv, err.getvalue()[-2000:])
    allowed = _written_to(argv, cwd)
    changed = [p for p, t in _snapshot(root).items() if before.get(p) != t]
    stray = [p for p in changed if not any(p == a or a in p.parents for a in allowed)]
    assert not stray, (argv, stray[:5])
