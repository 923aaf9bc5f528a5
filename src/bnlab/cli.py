"""The ``bnlab`` command line: the only place that parses arguments.

A user's mistake (unknown name, bad value, missing data) prints one line
``bnlab: error: ...`` and exits with status 2; nothing is written.
"""

from __future__ import annotations

import argparse
import errno
import math
import sys
from pathlib import Path

from .errors import UserError


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (no usage dump) and exit status 2."""

    def error(self, message: str):  # noqa: D401
        self.exit(2, f"{self.prog}: error: {message}\n")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (CUDA when present) | cpu | cuda | cuda:N (default: auto)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 1 for experiments, whose small nets run faster and steadier on one "
                        "thread; torch's default for train)")
    p.add_argument("--out", default="runs", help="root of the run directories (default: runs/)")
    p.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="refuse models whose estimated training memory exceeds SIZE (e.g. 16G; default: the device's "
                        "memory, or BNLAB_MAX_MEMORY)")


def _add_log(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log", default=None, metavar="SINK,...",
                   help="also send the metrics (and figures) to these sinks, written inside the run directory: "
                        "tensorboard, wandb (offline), mlflow (file store); metrics.jsonl is always written")


def _add_paper(p: argparse.ArgumentParser) -> None:
    """Options of the paper profile (bnlab.paper)."""
    p.add_argument("--smoke", action="store_true",
                   help="paper profile only: the real architectures, optimizers, schedules, probes and figures with every "
                        "training run capped at a few steps, on CIFAR-10 from --root or a synthetic stand-in; verdicts read "
                        "'inconclusive (smoke run)'")
    p.add_argument("--root", default=None, help="directory holding CIFAR-10's python-version files (default: the data dir)")
    p.add_argument("--download", action="store_true", help="fetch CIFAR-10's official archive into --root if it is missing")
    p.add_argument("--checkpoint-every", type=int, default=None, metavar="N",
                   help="paper profile: checkpoint every training run every N steps and resume from them after a crash "
                        "(default: 500; 0: never)")
    p.add_argument("--bf16", action="store_true", help="CUDA only: bf16 autocast for plain training arms (probes stay float32)")
    p.add_argument("--no-compile", action="store_true", help="CUDA only: no torch.compile of plain training arms")


def _paper_settings(args):
    from .paper import Settings

    every = getattr(args, "checkpoint_every", None)
    if every is not None and every < 0:
        raise UserError(f"--checkpoint-every must be >= 0, got {every}")
    root = getattr(args, "root", None)
    return Settings(smoke=getattr(args, "smoke", False), root=root, download=getattr(args, "download", False),
                    bf16=getattr(args, "bf16", False), compile=not getattr(args, "no_compile", False), checkpoint_every=every)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="bnlab", description="Measure and use the optimization effects of normalization (BatchNorm above all).")
    parser.add_argument("--version", action="version", version=f"bnlab {__import__('bnlab').__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    sub.add_parser("list", help="list datasets, models, norms, optimizers and experiments")

    t = sub.add_parser("train", help="train one model and write a run directory", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    t.add_argument("--data", default="digits", help="dataset (see `bnlab list`)")
    t.add_argument("--model", default="convnet", help="model (see `bnlab list`)")
    t.add_argument("--norm", default="bn", help="normalization (see `bnlab list`)")
    t.add_argument("--lr", type=float, default=0.1, help="learning rate")
    t.add_argument("--epochs", type=float, default=10, help="passes over the training set")
    t.add_argument("--steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    t.add_argument("--optimizer", default="sgd", help="sgd | adam | adamw")
    t.add_argument("--momentum", type=float, default=0.0, help="SGD momentum")
    t.add_argument("--wd", type=float, default=0.0, help="weight decay")
    t.add_argument("--batch-size", type=int, default=128, help="examples per step")
    t.add_argument("--full-batch", action="store_true", help="gradient descent on the whole training set")
    t.add_argument("--width", type=int, default=None, help="model width (model default when omitted)")
    t.add_argument("--depth", type=int, default=None, help="model depth (model default when omitted)")
    t.add_argument("--no-affine", action="store_true", help="norm layers without learnable gamma/beta")
    t.add_argument("--freeze-last", action="store_true", help="fixed classifier (no bias, not trained)")
    t.add_argument("--seed", type=int, default=0, help="seed of the initialization, the split and the batch order")
    t.add_argument("--root", default=None, help="data directory for datasets read from disk (cifar10)")
    t.add_argument("--download", action="store_true", help="fetch cifar10's official archive if it is missing")
    t.add_argument("--name", default=None, help="run name (default: <data>-<model>-<norm>)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_common(t)
    _add_log(t)

    r = sub.add_parser("run", help="run one registered experiment (figures, summary, verdicts)")
    r.add_argument("experiment", help="experiment name (see `bnlab list`)")
    r.add_argument("--profile", default="quick", help="tiny | quick | paper (default: quick)")
    r.add_argument("--set", dest="overrides", action="append", metavar="KEY=VALUE",
                   help="override a setting (a Config field: a new run) or a threshold (a Thresholds field: only the verdicts); "
                        "`bnlab settings NAME` lists them")
    r.add_argument("--force", action="store_true", help="rerun even if a complete run with the same config exists")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_common(r)
    _add_log(r)
    _add_paper(r)

    for cmd, helptext in (("reproduce", "run every registered experiment (reusing complete runs) and build the report"),
                          ("demo", "the main job: `reproduce --profile quick`")):
        d = sub.add_parser(cmd, help=helptext)
        d.add_argument("--profile", default="quick", help="tiny | quick | paper (default: quick)")
        d.add_argument("--only", default=None, metavar="NAME,...", help="run only these experiments")
        d.add_argument("--force", action="store_true", help="rerun even complete runs with the same config")
        d.add_argument("--quiet", action="store_true", help="no progress bars")
        d.add_argument("--executor", default="local", choices=("local", "ray"),
                       help="local: one experiment after the other here; ray: each experiment a Ray task "
                            "(pip install 'bnlab[ray]'; --out must be visible to every worker)")
        d.add_argument("--address", default=None, metavar="ADDR",
                       help="with --executor ray: a running Ray cluster ('auto', 'ray://host:10001'); "
                            "default: start a local Ray instance for this command")
        _add_common(d)
        _add_log(d)
        _add_paper(d)

    ty = sub.add_parser("toy", help="the 2-D scale-invariant toy: weight decay vs exponential LR (= `bnlab run toy`; "
                        "the flags are shorthands for --set)")
    ty.add_argument("--profile", default="quick", help="tiny | quick | paper (default: quick)")
    ty.add_argument("--steps", type=int, default=None, help="GD steps (= --set steps=N; profile quick: 400)")
    ty.add_argument("--lr", type=float, default=None, help="learning rate eta (= --set lr=X; quick: 1.0)")
    ty.add_argument("--wd", type=float, default=None, help="weight decay lambda (= --set weight_decay=X; quick: 0.02)")
    ty.add_argument("--momentum", type=float, default=None, help="momentum gamma (= --set momentum=X; quick: 0)")
    ty.add_argument("--dtype", default=None, help="float64 | float32, trajectory figures (= --set dtype=NAME; quick: float64)")
    ty.add_argument("--tol", type=float, default=None,
                    help="angle (rad) above which the runs count as deviating (= --set deviation_tol=X, a threshold; default 1e-6)")
    ty.add_argument("--set", dest="overrides", action="append", metavar="KEY=VALUE", help="override a setting of the profile")
    ty.add_argument("--force", action="store_true", help="rerun even if a complete run with the same config exists")
    ty.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_common(ty)
    _add_log(ty)

    rj = sub.add_parser("rejudge", help="judge stored runs again from their summaries (no training), then rebuild report.html")
    rj.add_argument("runs_dir", help="the directory given as --out to reproduce/run")
    rj.add_argument("--set", dest="overrides", action="append", metavar="[EXPERIMENT.]KEY=VALUE",
                    help="change a threshold (shown in the report as a departure from its registered value)")

    st = sub.add_parser("settings", help="an experiment's settings and thresholds, with their types, profile values and meaning")
    st.add_argument("experiment", help="experiment name (see `bnlab list`)")
    st.add_argument("--profile", default="quick", help="tiny | quick | paper (default: quick)")

    rp = sub.add_parser("report", help="rebuild report.html from run directories (no training)")
    rp.add_argument("runs_dir", help="the directory given as --out to reproduce/run")
    rp.add_argument("--output", default=None, help="where to write the HTML (default: RUNS_DIR/report.html)")
    return parser


def _cmd_list(args) -> int:
    from .data import DATASETS
    from .experiments import EXPERIMENTS
    from .models import MODELS, NORMS
    from .train import OPTIMIZERS

    print("datasets:    " + ", ".join(sorted(DATASETS)))
    print("models:      " + ", ".join(sorted(MODELS)))
    print("norms:       " + ", ".join(sorted(NORMS)))
    print("optimizers:  " + ", ".join(OPTIMIZERS))
    print("experiments:")
    for name, exp in sorted(EXPERIMENTS.items()):
        print(f"  {name:<14} {exp.title}  [{exp.source}]")
    return 0


def _cmd_train(args) -> int:
    import torch

    from . import data as data_mod
    from . import models
    from .errors import check_positive
    from .runs import RunDir, check_output_root, env_info, output_lock
    from .train import check_train_hyperparameters, make_optimizer, resolve_device, train

    # Validate everything before anything is written.
    from .errors import check_run_name, check_seed

    from .sinks import check_sinks, make_sinks, parse_sink_names

    check_positive("learning rate", args.lr)
    check_seed(args.seed)
    sink_names = parse_sink_names(args.log)
    check_sinks(sink_names)  # a missing package: one line naming the extra, before anything is written
    check_output_root(args.out)
    if args.name is not None:
        check_run_name(args.name)
    if not math.isfinite(args.epochs) or args.epochs < 0:
        raise UserError(f"epochs must be >= 0, got {args.epochs!r}")
    if args.steps is not None:
        check_positive("steps", args.steps, allow_zero=True)
    check_positive("batch size", args.batch_size)
    device = resolve_device(args.device)
    opts = {k: v for k, v in (("width", args.width), ("depth", args.depth)) if v is not None}
    data_opts = {"download": True} if args.download else {}
    if args.download and args.data != "cifar10":
        raise UserError("--download applies to cifar10 only; digits, mnist1d and synthetic are embedded")
    if args.data not in data_mod.DATASETS:
        raise UserError(f"unknown dataset {args.data!r}; accepted: {', '.join(sorted(data_mod.DATASETS))}")
    models.check_norm(args.norm)
    if args.model not in models.MODELS:
        raise UserError(f"unknown model {args.model!r}; accepted: {', '.join(sorted(models.MODELS))}")
    tr, te = data_mod.load_pair(args.data, root=args.root, seed=args.seed, **data_opts)
    from .models.memory import check_fits

    check_fits(args.model, in_shape=tr.in_shape, num_classes=tr.num_classes, norm=args.norm,
               batch_size=len(tr) if args.full_batch else args.batch_size, device=device, max_memory=args.max_memory,
               **opts)
    torch.manual_seed(args.seed)
    model = models.make(args.model, norm=args.norm, in_shape=tr.in_shape, num_classes=tr.num_classes,
                        affine=not args.no_affine, freeze_last=args.freeze_last, seed=args.seed, **opts)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, name=args.optimizer, lr=args.lr, momentum=args.momentum, weight_decay=args.wd)
    config = {
        "data": args.data, "model": args.model, "norm": args.norm, "lr": args.lr, "epochs": args.epochs, "steps": args.steps,
        "optimizer": args.optimizer, "momentum": args.momentum, "weight_decay": args.wd, "batch_size": args.batch_size,
        "full_batch": args.full_batch, "affine": not args.no_affine, "freeze_last": args.freeze_last, "seed": args.seed, **opts,
    }
    name = args.name or f"{args.data}-{args.model}-{args.norm}"
    n_params = sum(p.numel() for p in params)
    check_train_hyperparameters(opt)
    with output_lock(args.out), RunDir.new(args.out, name, config, env=env_info(device=device, seed=args.seed)) as run:
        print(f"bnlab train: {args.model} ({args.norm}, {n_params:,} trained parameters) on {args.data} "
              f"({len(tr)} train / {len(te)} test), {args.optimizer} lr {args.lr}, device {device}", file=sys.stderr)
        if sink_names:
            run.attach_sinks(make_sinks(sink_names, run.path, name=f"{name}-{run.path.name}", config=config))
        h = train(model, tr, opt, epochs=args.epochs, steps=args.steps, batch_size=args.batch_size,
                  full_batch=args.full_batch, eval_data=te, device=device, seed=args.seed, log=run.append_metrics,
                  progress=False if args.quiet else "train")
        run.finish(h.summary())
    if h.diverged:
        print(f"diverged: {h.reason}")
    f = h.final
    print(f"final  train loss {f.get('train_loss', float('nan')):.4f}  acc {f.get('train_acc', float('nan')):.2%}   "
          f"test loss {f.get('test_loss', float('nan')):.4f}  acc {f.get('test_acc', float('nan')):.2%}   ({h.steps} steps, {h.seconds:.1f} s)")
    print(f"run directory: {run.path}")
    return 0


def _print_verdicts(run) -> None:
    from .experiments import verdict_rows

    mark = {"holds": "holds", "fails": "FAILS", "inconclusive": "inconclusive"}
    for v in verdict_rows(run):
        print(f"  [{v.get('label') or mark[v['status']]:>12}] {v['statement']}  ({v['source']})")
        print(f"                 {v['detail']}")
        if v.get("rule"):
            print(f"                 rule: {v['rule']}")


def _cmd_run(args, experiment: str | None = None) -> int:
    from .experiments import resolve, run_experiment
    from .runs import output_lock

    name = experiment or args.experiment
    paper_settings = _paper_settings(args)
    cfg, _ = resolve(name, args.profile, getattr(args, "overrides", None),  # bad settings: one line, before anything is written
                     smoke=paper_settings.smoke)
    if args.profile == "paper" and not paper_settings.smoke:
        from .paper import require_cifar10, uses_cifar10

        if uses_cifar10(cfg):
            require_cifar10(paper_settings.root, paper_settings.download)  # where to put CIFAR-10: one line, exit 2
    from .sinks import check_sinks, parse_sink_names

    check_sinks(parse_sink_names(getattr(args, "log", None)))  # unknown sink / missing package: one line, exit 2
    with output_lock(args.out):
        run, reused = run_experiment(name, profile=args.profile, out=args.out, overrides=getattr(args, "overrides", None),
                                     force=args.force, device=args.device, progress=not getattr(args, "quiet", False),
                                     single_thread=args.threads is None, max_memory=args.max_memory,
                                     log=getattr(args, "log", None), paper_settings=paper_settings)
    print(f"{name} ({args.profile}){' — reused a complete run with the same configuration' if reused else ''}:")
    _print_verdicts(run)
    figs = sorted((run.path / "figures").glob("*")) if (run.path / "figures").exists() else []
    for f in figs:
        print(f"figure: {f}")
    print(f"run directory: {run.path}")
    return 0


def _cmd_reproduce(args) -> int:
    import time

    from .reproduce import format_table, reproduce

    t0 = time.perf_counter()
    executor = None
    if args.executor == "ray":
        from .sweep.executors import RayExecutor

        executor = RayExecutor(address=args.address, progress=not args.quiet, desc="reproduce (ray)")
    elif args.address is not None:
        raise UserError(f"--address {args.address} needs --executor ray")
    try:
        report, rows = reproduce(profile=args.profile, only=args.only, out=args.out, force=args.force,
                                 device=args.device, progress=not args.quiet, single_thread=args.threads is None,
                                 max_memory=args.max_memory, log=getattr(args, "log", None),
                                 paper_settings=_paper_settings(args), executor=executor)
    finally:
        if executor is not None:
            executor.close()
    print(format_table(rows))
    counts = {s: sum(r["status"] == s for r in rows) for s in ("holds", "fails", "inconclusive")}
    print(f"\n{counts['holds']} hold, {counts['fails']} fail, {counts['inconclusive']} inconclusive "
          f"({time.perf_counter() - t0:.0f} s)")
    print(f"report: {report.resolve()}")
    return 0


def _cmd_toy(args) -> int:
    """`bnlab toy`: `bnlab run toy` with the old flags mapped onto --set (explicit --set pairs win)."""
    flags = {"steps": args.steps, "lr": args.lr, "weight_decay": args.wd, "momentum": args.momentum,
             "dtype": args.dtype, "deviation_tol": args.tol}
    args.overrides = [f"{k}={v}" for k, v in flags.items() if v is not None] + list(args.overrides or [])
    return _cmd_run(args, experiment="toy")


def _cmd_rejudge(args) -> int:
    import time

    from .experiments import rejudge
    from .reproduce import format_table
    from .runs import output_lock

    t0 = time.perf_counter()
    if not Path(args.runs_dir).is_dir():
        raise UserError(f"no such runs directory: {args.runs_dir}")
    with output_lock(args.runs_dir, cleanup=False):
        report, rows = rejudge(args.runs_dir, args.overrides)
    print(format_table(rows))
    counts = {s: sum(r["status"] == s for r in rows) for s in ("holds", "fails", "inconclusive")}
    print(f"\n{counts['holds']} hold, {counts['fails']} fail, {counts['inconclusive']} inconclusive "
          f"(rejudged {len({r['run'] for r in rows})} runs in {time.perf_counter() - t0:.1f} s, no training)")
    print(f"report: {report.resolve()}")
    return 0


def _cmd_settings(args) -> int:
    import dataclasses

    from .experiments import PROFILES, field_types, get_experiment
    from .experiments.base import field_docs, type_name

    exp = get_experiment(args.experiment)
    if args.profile not in PROFILES:
        raise UserError(f"unknown profile {args.profile!r}; accepted: {', '.join(PROFILES)}")
    for title, cls, obj in (("settings (Config: hashed, a change means a new run)", exp.Config, exp.profiles[args.profile]),
                            ("thresholds (Thresholds: not hashed, `bnlab rejudge --set` applies them to stored runs)",
                             exp.Thresholds, exp.registered_thresholds(args.profile))):
        print(f"{exp.name} {title}, profile {args.profile}:")
        docs, types_ = field_docs(cls), field_types(cls)
        for f in dataclasses.fields(cls):
            print(f"  {f.name} = {getattr(obj, f.name)!r}  ({type_name(types_[f.name])})")
            if docs.get(f.name):
                print(f"      {docs[f.name]}")
    return 0


def _cmd_report(args) -> int:
    from .report import build

    if args.output is not None:  # a file to write, in a directory that exists
        out = Path(args.output)
        if not args.output.strip() or out.is_dir():
            raise UserError(f"--output must name a file to write (e.g. report.html), got {args.output!r}")
        if not out.parent.is_dir():
            raise UserError(f"--output {args.output}: the directory {out.parent} does not exist")

    path = build(args.runs_dir, args.output)
    print(f"report: {path.resolve()}")
    return 0


def _set_threads(args) -> None:
    threads = getattr(args, "threads", None)  # experiments default to one thread inside run_experiment
    if threads is not None:
        if threads < 1:
            print(f"bnlab: error: --threads must be >= 1, got {threads}", file=sys.stderr)
            raise SystemExit(2)
        import torch

        torch.set_num_threads(threads)


#: faults of the machine rather than of bnlab: reported in one line (every run directory is written
#: atomically or removed on failure, so nothing half-written is left behind)
_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO, errno.ENAMETOOLONG,
                       errno.ENOTDIR, errno.EISDIR, errno.ELOOP, errno.EMFILE, errno.ENFILE}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    _set_threads(args)
    try:
        if getattr(args, "max_memory", None) is not None:
            from .models.memory import parse_size

            parse_size(args.max_memory)  # a bad size: one line before anything runs
    except UserError as e:
        print(f"bnlab: error: {e}", file=sys.stderr)
        return 2
    handler = {"list": _cmd_list, "train": _cmd_train, "run": _cmd_run, "reproduce": _cmd_reproduce, "demo": _cmd_reproduce,
               "report": _cmd_report, "rejudge": _cmd_rejudge, "settings": _cmd_settings, "toy": _cmd_toy}[args.command]
    try:
        return handler(args)
    except UserError as e:
        print(f"bnlab: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in _ENVIRONMENT_ERRNOS:
            raise
        where = f" ({e.filename})" if e.filename else ""
        print(f"bnlab: error: {e.strerror or e}{where}; nothing half-written was kept", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bnlab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
