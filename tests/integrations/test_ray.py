"""``bnlab reproduce`` on Ray: a real local Ray instance (2 CPUs), shared by the tests of this module.

Checked against a second implementation, the local executor: the same experiments run locally and
as Ray tasks give equal summaries, verdicts, metrics, configurations and report tables. A Ray
worker killed (SIGKILL from this test, found by its process title) while it runs an experiment
leaves nothing half-written, the run is retried (or, without retries, the command fails in one
line and the rerun completes), and the result equals the local one.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

import torch  # noqa: E402

from bnlab.errors import UserError, check_seed  # noqa: E402
from bnlab.report import claims_table, collect  # noqa: E402
from bnlab.reproduce import _run_task, reproduce  # noqa: E402
from bnlab.runs import COMPLETE, unreadable_reason  # noqa: E402
from bnlab.sweep.executors import RayExecutor  # noqa: E402

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds Ray's workers through /proc")

EXPS = ["large-lr", "toy"]
KILLED = "large-lr"  # its tiny run trains for seconds: time to find and kill its worker


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _ppid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


@pytest.fixture(scope="module")
def ray_instance():
    """One local Ray instance for the module; afterwards no raylet of it is left."""
    ex = RayExecutor(num_cpus=2, object_store_memory=200 * 1024**2, max_retries=1)
    ex.start()
    raylet = int(ray.get(ray.remote(lambda: os.getppid()).remote()))  # a worker's parent: this instance's raylet
    assert _alive(raylet)
    try:
        yield ex, raylet
    finally:
        ex.close()
        deadline = time.monotonic() + 30
        while _alive(raylet) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not ray.is_initialized()
        assert not _alive(raylet), f"raylet {raylet} still running after shutdown"


@pytest.fixture(scope="module")
def local_out(tmp_path_factory):
    """The reference: the same experiments with the local executor."""
    out = tmp_path_factory.mktemp("local")
    _, rows = reproduce(profile="tiny", only=EXPS, out=out, progress=False)
    return out, rows


def _run_dirs(out: Path, name: str) -> list[Path]:
    d = Path(out) / name
    return sorted(p for p in d.iterdir() if p.is_dir()) if d.is_dir() else []


def _no_timings(obj):
    """``obj`` without wall-clock entries (keys such as ``seconds``)."""
    if isinstance(obj, dict):
        return {k: _no_timings(v) for k, v in obj.items() if not re.search(r"(^|_)(seconds|time|elapsed)($|_)", k)}
    if isinstance(obj, list):
        return [_no_timings(v) for v in obj]
    return obj


def _contents(run: Path) -> dict:
    """What must be equal between a local and a Ray run (no paths, no times)."""
    cfg = json.loads((run / "config.json").read_text())
    return {
        "config": cfg["config"], "hash": cfg["config_hash"],
        "summary": _no_timings(json.loads((run / "summary.json").read_text())),
        "verdicts": json.loads((run / "verdicts.json").read_text()),
        "experiment": json.loads((run / "experiment.json").read_text()),
        "metrics": (run / "metrics.jsonl").read_text(),
        "files": sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file() and p.name != "env.json"),
    }


def _table(out: Path) -> list[dict]:
    return claims_table(collect(out))


def _strip(rows: list[dict]) -> list[dict]:
    return [_no_timings({k: v for k, v in r.items() if k != "run"}) for r in rows]


def _task_workers(raylet: int) -> list[int]:
    """Workers of this Ray instance that are running a task (process title ``ray::_ray_call``)."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if (d / "cmdline").read_bytes().startswith(b"ray::_ray_call") and _ppid(int(d.name)) == raylet:
                found.append(int(d.name))
        except (OSError, ValueError, IndexError):
            continue
    return found


class _Killer(threading.Thread):
    """SIGKILLs the worker running ``name`` once its run directory exists and is not complete yet."""

    def __init__(self, out: Path, name: str, raylet: int):
        super().__init__(daemon=True)
        self.out, self.name, self.raylet = Path(out), name, raylet
        self.stop = threading.Event()
        self.killed: tuple[Path, int] | None = None

    def run(self):
        while not self.stop.is_set():
            started = [p for p in _run_dirs(self.out, self.name) if (p / "config.json").exists() and not (p / COMPLETE).exists()]
            pids = _task_workers(self.raylet) if started else []
            if len(pids) == 1:
                os.kill(pids[0], signal.SIGKILL)
                self.killed = (started[0], pids[0])
                return
            time.sleep(0.01)


def test_ray_reproduce_equals_local(ray_instance, local_out, tmp_path):
    ex, _ = ray_instance
    local, local_rows = local_out
    out = tmp_path / "ray"
    report, rows = reproduce(profile="tiny", only=EXPS, out=out, progress=False, executor=ex)
    assert report == out / "report.html" and report.is_file()
    assert _strip(rows) == _strip(local_rows) and not any(r["reused"] for r in rows)
    for name in EXPS:
        (ray_run,), (local_run,) = _run_dirs(out, name), _run_dirs(local, name)
        assert (ray_run / COMPLETE).exists() and unreadable_reason(ray_run) is None
        assert _contents(ray_run) == _contents(local_run), name
        assert {r["run"] for r in rows if r["experiment"] == name} == {str(ray_run)}
    assert _strip(_table(out)) == _strip(_table(local))
    # a second reproduce reuses every run, without a Ray task
    _, again = reproduce(profile="tiny", only=EXPS, out=out, progress=False, executor=ex)
    assert all(r["reused"] for r in again) and _strip([{**r, "reused": False} for r in again]) == _strip(rows)


def test_sweep_on_ray_equals_local_and_errors(ray_instance):
    """The Executor protocol: a bnlab.sweep grid on Ray gives the local executor's numbers, in order;
    an exception of the task comes back as itself (not retried), a UserError as one line."""
    from functools import partial

    from bnlab import data, models
    from bnlab.sweep import sweep

    ex, _ = ray_instance
    tr = data.load("synthetic", split="train", n=128, in_shape=(1, 8, 8), seed=1)
    net = partial(models.make, "convnet", norm="bn", in_shape=(1, 8, 8), num_classes=10, width=4)
    kw = dict(lrs=[0.05, 0.2, 0.5], seeds=[0], steps=4, batch_size=32, momentum=0.9, device="cpu", vectorize=False)
    local, on_ray = sweep(net, tr, **kw), sweep(net, tr, executor=ex, **kw)
    assert on_ray.losses.shape == (3, 4) and torch.equal(local.losses, on_ray.losses)
    assert ex.map(abs, [-3, 1, -2]) == [3, 1, 2]
    with pytest.raises(ValueError, match="invalid literal") as info:
        ex.map(int, ["7", "x"])
    assert not isinstance(info.value, UserError)
    with pytest.raises(UserError, match=r"^seed must be an integer in \[0, 2\*\*32 - 1\], got -1$"):
        ex.map(check_seed, [1, -1])


def test_killed_worker_leaves_nothing_half_written(ray_instance, local_out, tmp_path, capfd):
    ex, raylet = ray_instance
    local, _ = local_out
    out = tmp_path / "ray"
    (local_run,) = _run_dirs(local, KILLED)

    # no retries: the command fails in one line; the killed task's run directory is removed
    killer = _Killer(out, KILLED, raylet)
    killer.start()
    try:
        with pytest.raises(UserError, match=r"the Ray worker running .*large-lr.* died \(no retries\)"):
            reproduce(profile="tiny", only=[KILLED], out=out, progress=False, executor=RayExecutor(max_retries=0))
    finally:
        killer.stop.set()
        killer.join()
    assert killer.killed is not None
    killed_dir, pid = killer.killed
    assert not _alive(pid)
    assert _run_dirs(out, KILLED) == []  # nothing half-written is left
    assert f"removed {killed_dir.resolve()}" in capfd.readouterr().err
    with pytest.raises(UserError, match="no complete experiment runs"):
        collect(out)  # nothing for a report to list

    # with a retry: killed again mid-run, the retry completes within the same command
    killer = _Killer(out, KILLED, raylet)
    killer.start()
    try:
        _, rows = reproduce(profile="tiny", only=[KILLED], out=out, progress=False, executor=ex)
    finally:
        killer.stop.set()
        killer.join()
    assert killer.killed is not None
    killed_dir, pid = killer.killed
    assert not killed_dir.exists() and not _alive(pid)
    (run,) = _run_dirs(out, KILLED)
    assert run != killed_dir and (run / COMPLETE).exists() and unreadable_reason(run) is None
    assert _contents(run) == _contents(local_run)
    (shown,) = collect(out)
    assert shown.path == run and [r["status"] for r in rows] == [v["status"] for v in shown.verdicts]


def test_worker_that_does_not_see_out_refuses(tmp_path):
    """A worker whose --out is not the driver's (another file system): one line, nothing written."""
    task = {"name": "toy", "profile": "tiny", "out": str(tmp_path), "force": False, "device": "cpu", "single_thread": True,
            "max_memory": None, "log": None, "lock": "pid 1, bnlab reproduce", "host": "driver-host"}
    with pytest.raises(UserError, match="does not see --out .* lock file is missing.*shares, at the same path"):
        _run_task(task)
    assert list(tmp_path.iterdir()) == []


def test_missing_ray_and_bad_arguments(monkeypatch, capsys):
    from bnlab.cli import main

    with pytest.raises(UserError, match="max_retries must be an integer >= 0"):
        RayExecutor(max_retries=-1)
    with pytest.raises(UserError, match="num_cpus_per_task must be a number > 0"):
        RayExecutor(num_cpus_per_task=0)
    assert main(["reproduce", "--profile", "tiny", "--address", "auto"]) == 2
    assert capsys.readouterr().err.strip() == "bnlab: error: --address auto needs --executor ray"
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    with pytest.raises(UserError, match=r"install it with: pip install 'bnlab\[ray\]'"):
        RayExecutor().map(abs, [1])


_REMOTE_DRIVER = r"""
import sys
import bnlab.sweep.executors as E
from bnlab.errors import UserError
with E.RayExecutor(address=sys.argv[1]) as ex:  # an address: the package is shipped with the tasks (ship_code)
    assert ex.ship_code
    (where,) = ex.map(lambda _: str(E._package_dir()), [0])
    print("WHERE", where)
    ex._driver["digest"] = "0" * 16  # as if the driver's code differed
    try:
        ex.map(abs, [1])
    except UserError as e:
        print("REFUSED", e)
"""


@pytest.mark.slow
def test_second_driver_joins_by_address_and_ships_its_code(ray_instance, tmp_path):
    """Another process joins this Ray instance by address (as a cluster user would): its tasks run
    this checkout's code shipped as a py_module (not the installed package), checked by digest."""
    import subprocess

    script = tmp_path / "driver.py"
    script.write_text(_REMOTE_DRIVER)
    address = ray.get_runtime_context().gcs_address
    res = subprocess.run([sys.executable, str(script), address], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    where = next(line.split(" ", 1)[1] for line in res.stdout.splitlines() if line.startswith("WHERE "))
    import bnlab

    assert Path(where).name == "bnlab" and Path(where) != Path(bnlab.__file__).resolve().parent
    refused = next(line for line in res.stdout.splitlines() if line.startswith("REFUSED "))
    assert "whose code differs from the driver's" in refused
