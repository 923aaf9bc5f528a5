"""bnlab.sinks against the real packages: what each sink wrote, read back with that package's own
reader (TensorBoard's EventAccumulator, the W&B run file, MlflowClient), equals metrics.jsonl."""

import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bnlab.cli import main
from bnlab.runs import RunDir
from bnlab.sinks import JsonlSink, make_sinks, parse_sink_names, scalars
from bnlab.errors import UserError


# ----------------------------------------------------------------------------- readers


def read_tensorboard(logdir) -> tuple[dict, dict]:
    """``({(tag, step): value}, {tag: (height, width)})`` of every event file under ``logdir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    values = {(tag, e.step): e.value for tag in acc.Tags()["scalars"] for e in acc.Scalars(tag)}
    images = {tag: (acc.Images(tag)[-1].height, acc.Images(tag)[-1].width) for tag in acc.Tags()["images"]}
    return values, images


def read_wandb_file(path) -> list:
    """The records of a W&B run file (``run-*.wandb``): a LevelDB-style log of protobuf ``Record``s
    (7-byte file header ``:W&B``, 0xBEE1, version; 32 KiB blocks of chunks with a 7-byte header
    crc32, length, type 1 full / 2 first / 3 middle / 4 last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    raw = Path(path).read_bytes()
    ident, magic, _ = struct.unpack("<4sHB", raw[:7])
    assert ident == b":W&B" and magic == 0xBEE1
    block, hdr, pos, chunks, buf = 32768, 7, 7, [], b""
    while pos + hdr <= len(raw):
        left = block - pos % block
        if left < hdr:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + hdr])
        if kind == 0 and length == 0:  # zero padding to the end of the block
            pos += left
            continue
        data, pos = raw[pos + hdr:pos + hdr + length], pos + hdr + length
        if kind == 1:
            chunks.append(data)
        elif kind == 2:
            buf = data
        elif kind == 3:
            buf += data
        elif kind == 4:
            chunks.append(buf + data)
    out = []
    for c in chunks:
        r = pb.Record()
        r.ParseFromString(c)
        out.append(r)
    return out


def wandb_history(run_dir) -> list[dict]:
    files = list(Path(run_dir).rglob("run-*.wandb"))
    assert len(files) == 1, files
    rows = []
    for r in read_wandb_file(files[0]):
        if r.WhichOneof("record_type") == "history":
            rows.append({(it.key or "/".join(it.nested_key)): json.loads(it.value_json) for it in r.history.item})
    return rows


def expected_scalars(records) -> dict:
    out = {}
    for r in records:
        for tag, v in scalars(r).items():
            key = (tag, r["step"])
            assert key not in out, f"two values for {key}"
            out[key] = v
    return out


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


def wandb_core_children() -> list[str]:
    """Command lines of this process's child processes that are W&B's service."""
    found = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            stat = (p / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue
        if ppid == os.getpid() and "wandb" in cmd:
            found.append(cmd)
    return found


# ----------------------------------------------------------------------------- scalars


def test_scalars_flatten_prefix_and_skip():
    rec = {"step": 4, "arm": "bn@0.1", "seed": 2, "event": "eval", "loss": 0.5, "ok": True, "n": 3,
           "nan": float("nan"), "f32": np.float32(0.25), "t": torch.tensor([1.5]), "name": "x", "vec": [1, 2],
           "none": None, "sub": {"a": 1.0, "b": {"c": 2}}}
    got = scalars(rec)
    p = "bn@0.1/eval/seed2/"
    assert set(got) == {p + k for k in ("loss", "ok", "n", "nan", "f32", "t", "sub/a", "sub/b/c")}
    assert got[p + "loss"] == 0.5 and got[p + "ok"] == 1.0 and got[p + "n"] == 3.0 and math.isnan(got[p + "nan"])
    assert got[p + "f32"] == 0.25 and got[p + "t"] == 1.5 and got[p + "sub/b/c"] == 2.0
    assert scalars({"step": 1, "grad_norm/total": 2.0}) == {"grad_norm/total": 2.0}


def test_parse_sink_names():
    assert parse_sink_names("tensorboard, wandb,tensorboard,jsonl") == ["tensorboard", "wandb"]
    assert parse_sink_names(None) == [] and parse_sink_names("") == []
    with pytest.raises(UserError, match="accepted: jsonl, mlflow, tensorboard, wandb"):
        parse_sink_names("tensorbord")


def test_jsonl_sink_writes_what_rundir_writes(tmp_path):
    recs = [{"step": 0, "loss": 1.0, "x": float("nan")}, {"step": 1, "a": np.float32(0.5), "t": torch.tensor(2.0)},
            {"event": "eval", "step": 2, "test_acc": 0.9, "arm": "bn", "inf": float("inf")}]
    run = RunDir.create(tmp_path, "r", {"a": 1})
    with JsonlSink(tmp_path / "m.jsonl") as sink:
        for r in recs:
            run.append_metrics(r)
            sink.log(r)
    run.finish({})
    assert (tmp_path / "m.jsonl").read_bytes() == (run.path / "metrics.jsonl").read_bytes()


# ----------------------------------------------------------------------------- all sinks on one run


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory):
    """A short bnlab.train run with TensorBoard, W&B (offline) and MLflow (file store) attached to its RunDir."""
    from bnlab import data, models
    from bnlab.probes import GradNorm, LearningRate, WeightNorm
    from bnlab.train import train

    root = tmp_path_factory.mktemp("sinks")
    tr = data.load("synthetic", n=64, in_shape=(6,), num_classes=3, seed=0)
    torch.manual_seed(0)
    model = models.make("mlp", norm="bn", in_shape=(6,), num_classes=3, width=8, depth=2, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    run = RunDir.create(root, "toy-train", {"lr": 0.1})
    sinks = make_sinks(["tensorboard", "wandb", "mlflow"], run.path, name="toy-train", config={"lr": 0.1})
    run.attach_sinks(sinks)
    train(model, tr, opt, steps=12, batch_size=16, probes=[GradNorm(), WeightNorm(), LearningRate()], eval_every=6,
          device="cpu", log=run)
    run.append_metrics({"step": 99, "arm": "odd", "nan": float("nan"), "inf": float("-inf")})
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 1.5), dpi=50)
    ax.plot([0, 1], [1, 0])
    fig.savefig(run.figure_path("curve.png"))
    plt.close(fig)
    run.finish({"ok": True})
    return run, sinks


def test_tensorboard_sink_equals_metrics_jsonl(logged_run):
    run, _ = logged_run
    expected = expected_scalars(run.metrics())
    assert ("grad_norm/total", 0) in expected and ("eval/test_acc", 6) not in expected
    assert ("eval/train_acc", 6) in expected and ("odd/nan", 99) in expected
    got, images = read_tensorboard(run.path / "tensorboard")
    assert set(got) == set(expected)
    for key, v in expected.items():  # TensorBoard stores float32
        assert same(float(np.float32(v)), got[key]), (key, v, got[key])
    import matplotlib.image

    h, w = matplotlib.image.imread(run.path / "figures" / "curve.png").shape[:2]
    assert images == {"curve": (h, w)}


def test_wandb_offline_equals_metrics_jsonl_and_leaves_no_process(logged_run):
    run, sinks = logged_run
    assert wandb_core_children() == []
    wb = next(s for s in sinks if type(s).__name__ == "WandbSink")
    assert wb.run_dir.is_relative_to(run.path)
    rows = wandb_history(run.path / "wandb")
    images = [row for row in rows if any(k.startswith("curve/") for k in row)]
    got = {}
    for row in rows:
        if row in images:
            continue
        for k, v in row.items():
            if not k.startswith("_") and k != "step" and isinstance(v, (int, float)):
                got[(k, row["step"])] = float(v)
    expected = expected_scalars(run.metrics())
    assert set(got) == set(expected)
    assert all(same(v, got[k]) for k, v in expected.items())
    assert len(images) == 1 and images[0]["curve/_type"] == "image-file", images
    # nothing written outside the run directory: W&B's service log went under it too
    assert list((run.path / "wandb" / "cache").rglob("*.log"))


def test_mlflow_file_store_equals_metrics_jsonl(logged_run):
    from mlflow.tracking import MlflowClient

    run, sinks = logged_run
    ml = next(s for s in sinks if type(s).__name__ == "MLflowSink")
    client = MlflowClient(tracking_uri=ml.tracking_uri)
    assert ml.tracking_uri == f"file:{(run.path / 'mlruns').resolve()}"
    info = client.get_run(ml.run_id)
    assert info.info.status == "FINISHED" and info.data.params["lr"] == "0.1"
    expected = expected_scalars(run.metrics())
    got = {}
    for name in info.data.metrics:
        for m in client.get_metric_history(ml.run_id, name):
            got[(name, m.step)] = m.value
    assert set(got) == {(ml.metric_name(t), s) for t, s in expected}
    assert all(same(v, got[(ml.metric_name(t), s)]) for (t, s), v in expected.items())
    assert [a.path for a in client.list_artifacts(ml.run_id, "figures")] == ["figures/curve.png"]


# ----------------------------------------------------------------------------- the command line


def test_cli_run_log_tensorboard_writes_the_event_file(tmp_path, capsys):
    out = tmp_path / "runs"
    assert main(["run", "toy", "--profile", "tiny", "--out", str(out), "--quiet", "--log", "tensorboard"]) == 0
    (run_path,) = list((out / "toy").iterdir())
    got, images = read_tensorboard(run_path / "tensorboard")
    expected = expected_scalars(RunDir(run_path).metrics())
    assert expected and set(got) == set(expected)
    assert all(same(float(np.float32(v)), got[k]) for k, v in expected.items())
    pngs = sorted(p.stem for p in (run_path / "figures").glob("*.png"))
    assert pngs and sorted(images) == pngs
    # a reused run: logged already, nothing more is written; its sink folder removed, the stored run is replayed
    argv = ["run", "toy", "--profile", "tiny", "--out", str(out), "--quiet", "--log", "tensorboard"]
    assert main(argv) == 0 and len(list((run_path / "tensorboard").iterdir())) == 1
    import shutil

    shutil.rmtree(run_path / "tensorboard")
    assert main(argv) == 0 and "reused" in capsys.readouterr().out
    assert read_tensorboard(run_path / "tensorboard") == (got, images)


def test_cli_unknown_sink_is_one_line_exit_2(tmp_path, capsys):
    out = tmp_path / "runs"
    assert main(["train", "--data", "synthetic", "--model", "mlp", "--steps", "1", "--out", str(out), "--log", "tb"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("bnlab: error: unknown sink 'tb' in --log; accepted: jsonl, mlflow, tensorboard, wandb "
                   "(comma-separated; jsonl is always written)")
    assert not out.exists()


_MISSING = r"""
import sys
import bnlab, bnlab.cli, bnlab.sinks, bnlab.runs, bnlab.integrations, bnlab.monitor, bnlab.train
print("loaded by import bnlab:", [m for m in ("tensorboard", "wandb", "mlflow", "lightning", "transformers", "ray")
                                  if m in sys.modules])
for name in ("tensorboard", "wandb", "mlflow", "lightning", "pytorch_lightning", "transformers"):
    sys.modules[name] = None            # as if the package were not installed
from bnlab.cli import main
from bnlab.errors import UserError
out = sys.argv[1]
for sink, argv in (("tensorboard", ["train", "--data", "synthetic", "--model", "mlp", "--steps", "1"]),
                   ("wandb", ["run", "toy", "--profile", "tiny"]),
                   ("mlflow", ["reproduce", "--profile", "tiny", "--only", "toy"])):
    print("rc", main(argv + ["--out", out, "--log", sink]), flush=True)
    print("---", file=sys.stderr, flush=True)
for mod in ("bnlab.integrations.lightning", "bnlab.integrations.hf"):
    try:
        __import__(mod)
    except UserError as e:
        print(e)
"""


def test_missing_package_is_one_line_naming_the_extra(tmp_path):
    """Each --log sink (train, run, reproduce) and each integration module, with its package absent;
    and ``import bnlab`` imports none of the optional packages."""
    out = tmp_path / "runs"
    p = subprocess.run([sys.executable, "-c", _MISSING, str(out)], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "MPLBACKEND": "agg"})
    errs = [e.strip().splitlines() for e in p.stderr.split("---")[:3]]
    assert errs == [[f"bnlab: error: --log {sink} needs the {sink} package, which is not installed; "
                     f"install it with: pip install 'bnlab[{sink}]'"] for sink in ("tensorboard", "wandb", "mlflow")], p.stderr
    assert p.stdout.splitlines() == ["loaded by import bnlab: []"] + ["rc 2"] * 3 + [
        "bnlab.integrations.lightning needs the lightning package, which is not installed; "
        "install it with: pip install 'bnlab[lightning]'",
        "bnlab.integrations.hf needs the transformers package, which is not installed; "
        "install it with: pip install 'bnlab[hf]'"], p.stdout + p.stderr
    assert not out.exists()


def test_wandb_service_stays_while_another_run_is_active(tmp_path):
    from bnlab.sinks import WandbSink

    a, b = WandbSink(dir=tmp_path / "a"), WandbSink(dir=tmp_path / "b")
    a.log({"step": 0, "x": 1.0})
    a.close()
    assert wandb_core_children()  # b still needs the service
    b.log({"step": 0, "x": 2.0})
    b.close()
    assert wandb_core_children() == []
    assert [r["x"] for r in wandb_history(tmp_path / "a") if "x" in r] == [1.0]
    assert [r["x"] for r in wandb_history(tmp_path / "b") if "x" in r] == [2.0]


def test_images_from_arrays(tmp_path):
    """A figure given as an array (gray H x W, RGBA uint8) reaches TensorBoard and MLflow with its size."""
    from mlflow.tracking import MlflowClient

    from bnlab.sinks import MLflowSink, TensorBoardSink

    gray = np.linspace(0, 1, 5 * 7).reshape(5, 7)
    rgba = np.zeros((4, 6, 4), dtype=np.uint8)
    tb, ml = TensorBoardSink(tmp_path / "tb"), MLflowSink(f"file:{tmp_path / 'mlruns'}")
    for s in (tb, ml):
        s.log_image("gray", gray, step=3)
        s.log_image("rgba", rgba)
        s.close()
    assert read_tensorboard(tmp_path / "tb")[1] == {"gray": (5, 7), "rgba": (4, 6)}
    import matplotlib.image

    client = MlflowClient(tracking_uri=ml.tracking_uri)
    paths = sorted(a.path for a in client.list_artifacts(ml.run_id, "figures"))
    assert paths == ["figures/gray.png", "figures/rgba.png"]
    local = client.download_artifacts(ml.run_id, "figures/gray.png", str(tmp_path))
    assert matplotlib.image.imread(local).shape[:2] == (5, 7)
