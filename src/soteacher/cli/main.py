"""The ``soteacher`` command line: demo, train-teacher, distill, evaluate, experiment, tune,
list."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
import warnings
from pathlib import Path

# Measured by benchmarks/shared_machine.py (BENCHMARKS.md, "Training on a shared machine").
DEMO_DURATION = "10 min on 2 mostly idle CPU cores, 18 on 2 busy ones"
QUICK_DURATION = "2 min on 2 mostly idle CPU cores, 5 on 2 busy ones"

QUICK_OVERRIDES = [
    "data.options.num_train=1000", "data.options.num_test=1000",
    "teacher.train.epochs=30", "teacher.train.milestones=[20,26]",
    "student.train.epochs=20", "student.train.milestones=[14,18]",
]


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=None,
                   help="YAML config (default: the embedded demo config)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set teacher.train.epochs=10 (repeatable)")
    p.add_argument("--device", default=None, help="cpu (default), cuda, cuda:1, auto, ...")
    _threads(p)
    p.add_argument("--quiet", action="store_true", help="no progress output")


def _threads(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads for torch (default: the config's 'threads', else "
                        "OMP_NUM_THREADS, else one per CPU); idle OpenMP threads sleep instead "
                        "of spinning, see README, 'Threads on a shared machine'")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="soteacher",
        description="Student-oriented teacher training (SoTeacher) and knowledge distillation.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("demo", help="standard vs SoTeacher teacher on data with known p*, "
                                    f"students from each, and a results table ({DEMO_DURATION})")
    _common(d)
    d.add_argument("--out", type=Path, default=Path("runs/demo"), help="output directory")
    d.add_argument("--quick", action="store_true",
                   help=f"a smoke run ({QUICK_DURATION}): " + " ".join(QUICK_OVERRIDES))
    d.add_argument("--seeds", type=int, default=1, help="repeat with N seeds, report mean and std")
    d.add_argument("--resume", action="store_true",
                   help="continue an interrupted demo in --out (finished runs are kept)")
    d.add_argument("--overwrite", action="store_true", help="replace a run already in --out")

    t = sub.add_parser("train-teacher", help="train a teacher with the configured method")
    _common(t)
    t.add_argument("--out", type=Path, required=True, help="run directory")
    t.add_argument("--resume", action="store_true", help="continue the run in --out")
    t.add_argument("--overwrite", action="store_true", help="replace a run already in --out")

    s = sub.add_parser("distill", help="distil a trained teacher into the configured student")
    _common(s)
    s.add_argument("--teacher", type=Path, required=True,
                   help="teacher run directory (or its model.pt)")
    s.add_argument("--out", type=Path, required=True, help="run directory")
    s.add_argument("--resume", action="store_true", help="continue the run in --out")
    s.add_argument("--overwrite", action="store_true", help="replace a run already in --out")

    e = sub.add_parser("evaluate", help="evaluate a trained model on its dataset")
    e.add_argument("model", type=Path, help="run directory (or model.pt)")
    e.add_argument("--config", type=Path, default=None,
                   help="config naming the dataset (default: the run directory's config.yaml)")
    e.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    e.add_argument("--device", default=None)
    _threads(e)
    e.add_argument("--json", action="store_true", help="print one JSON object")

    x = sub.add_parser("experiment", help="a grid of teacher methods x distillers x seeds "
                                          "(x pairs): results.csv, summary.md, premise.md and "
                                          "plots")
    x.add_argument("config", type=Path, nargs="?", default=None,
                   help="experiment YAML: run config keys plus an 'experiment:' section")
    x.add_argument("--out", type=Path, required=True, help="experiment directory")
    x.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set experiment.seeds=[0,1] (repeatable)")
    x.add_argument("--device", default=None, help="cpu (default), cuda, cuda:1, auto, ...")
    _threads(x)
    x.add_argument("--quiet", action="store_true", help="no progress output")
    x.add_argument("--report-only", action="store_true",
                   help="train nothing; remake the report of the runs in --out")
    x.add_argument("--no-plots", action="store_true", help="skip the figures")
    x.add_argument("--plots", type=Path, default=None,
                   help="folder for the figures (default: OUT/plots)")
    x.add_argument("--backend", choices=["local", "ray"], default=None,
                   help="local: one run after another here (default); ray: every run a Ray "
                        "task, as many at once as the machine or cluster has room for "
                        "(experiment.resources per run; pip install 'soteacher[ray]')")
    x.add_argument("--address", default=None, metavar="ADDR",
                   help="with --backend ray: the Ray cluster to use, e.g. HEAD:6379 (default: "
                        "a local Ray instance sized to this machine)")

    tn = sub.add_parser("tune", help="choose the teacher's settings (method, SoTeacher's "
                                     "weights, schedule, epochs) by a measure on the validation "
                                     "split, with Optuna (pip install 'soteacher[tune]')")
    tn.add_argument("config", type=Path,
                    help="YAML config (with data.val_fraction > 0), optionally with a 'tune:' "
                         "section (space, trials, proxy, ...)")
    tn.add_argument("--out", type=Path, required=True,
                    help="study directory; a study of the same config there is continued")
    tn.add_argument("--trials", "--n-trials", dest="trials", type=int, default=None,
                    metavar="N", help="completed trials wanted in total (default: tune.trials, 20)")
    tn.add_argument("--proxy", default=None, metavar="NAME",
                    help="what selects the teacher: student_val_acc (a KD student's validation "
                         "accuracy, the default), val_nll, val_ece, val_acc, conf_gap, nll_gap, "
                         "train_nll")
    tn.add_argument("--seed", type=int, default=None, help="the sampler's seed (default: the "
                                                           "config's seed)")
    tn.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key, e.g. --set data.val_fraction=0.1 (repeatable)")
    tn.add_argument("--device", default=None, help="cpu (default), cuda, cuda:1, auto, ...")
    _threads(tn)
    tn.add_argument("--quiet", action="store_true", help="no progress output")
    tn.add_argument("--backend", choices=["local", "ray"], default=None,
                    help="local: one trial after another (default); ray: several trials at once "
                         "as Ray tasks (tune.parallel, tune.resources; pip install "
                         "'soteacher[ray]')")
    tn.add_argument("--address", default=None, metavar="ADDR",
                    help="with --backend ray: the Ray cluster to use (default: a local instance)")
    tn.add_argument("--parallel", type=int, default=None, metavar="K",
                    help="with --backend ray: trials at once (default: as many as fit)")

    ls = sub.add_parser("list", help="list registered names, one per line")
    ls.add_argument("what", choices=["distillers", "models", "datasets", "teachers"])

    data = sub.add_parser("data", help="fetch data sets")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    dl = data_sub.add_parser("download", help="download and verify cifar10 / cifar100")
    dl.add_argument("name", choices=["cifar10", "cifar100"])
    dl.add_argument("--root", type=Path, default=Path("data"), help="where the data goes")
    dl.add_argument("--url", default=None, help="another source (a mirror, a file:// URL)")
    dl.add_argument("--md5", default=None, help="checksum of the archive at --url")

    bench = sub.add_parser("bench", help="measure speed")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True, metavar="WHAT")
    tp = bench_sub.add_parser("throughput", help="images/s of the full training step against "
                                                 "pure compute, and SoTeacher's overhead")
    tp.add_argument("--model", required=True)
    tp.add_argument("--batch-size", type=int, default=64)
    tp.add_argument("--steps", type=int, default=20, help="steps per timed loop")
    tp.add_argument("--repeats", type=int, default=3, help="interleaved rounds (median kept)")
    tp.add_argument("--num-classes", type=int, default=100)
    tp.add_argument("--device", default="cpu")
    tp.add_argument("--amp", choices=["off", "bf16", "fp16"], default="off")
    tp.add_argument("--channels-last", action="store_true")
    _threads(tp)
    tp.add_argument("--json", action="store_true", help="print only one JSON line")
    # the GPU grid (soteacher.bench.cuda_grid; issue 15)
    gr = bench_sub.add_parser("grid", help="on a GPU: loop efficiency and SoTeacher's overhead "
                                           "with bf16 and channels-last, per model, batch size "
                                           "and torch.compile mode")
    gr.add_argument("--device", default="cuda")
    gr.add_argument("--models", nargs="+", default=["resnet8x4", "wrn_40_2"])
    gr.add_argument("--batch-sizes", nargs="+", type=int, default=[64, 128])
    gr.add_argument("--compile", choices=["both", "off", "on"], default="both")
    gr.add_argument("--steps", type=int, default=50, help="steps per timed loop")
    gr.add_argument("--repeats", type=int, default=3, help="interleaved rounds (median kept)")
    gr.add_argument("--json", action="store_true", help="print only one JSON line")
    return p


def _note(msg: str) -> None:
    print(f"note: {msg}", file=sys.stderr)


def _load(args, phases: tuple[str, ...]):
    from ..config import apply_overrides, load_config, validate
    notes: list[str] = []
    cfg = load_config(args.config, args.overrides, notes=notes)
    if getattr(args, "device", None):
        cfg = apply_overrides(cfg, [f"device={args.device}"])
    if getattr(args, "threads", None) is not None:
        cfg = apply_overrides(cfg, [f"threads={args.threads}"])
    validate(cfg, phases)
    _apply_threads(cfg.threads)
    from ..engine.distributed import is_main
    if is_main():
        for n in notes:
            _note(n)
    return cfg


def _apply_threads(threads: int | None) -> None:
    from ..engine.threads import set_threads
    set_threads(threads)


def cmd_demo(args) -> int:
    from ..pipeline import format_results, run_demo
    if args.quick:
        args.overrides = QUICK_OVERRIDES + args.overrides
    cfg = _load(args, ("teacher", "student", "distill"))
    log = (lambda *a: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr))
    results = run_demo(cfg, args.out, seeds=args.seeds, progress=not args.quiet, log=log,
                       overwrite=args.overwrite, resume=args.resume)
    print(format_results(results))
    print(f"\nresults: {args.out / 'results.json'} ({results['wall_time_s']:.0f}s)")
    return 0


def _note_soteacher_terms(cfg) -> None:
    """A method other than SoTeacher's that still gets SoTeacher's terms from the config's
    options (say ``--set teacher.method=early_stop`` on a SoTeacher config) trains the two
    combined: legitimate, but say so."""
    method, options = cfg.teacher.method, cfg.teacher.options
    on = [f"{k}={options[k]}" for k in ("lipschitz_weight", "consistency_weight") if options.get(k)]
    if on and method not in ("soteacher", "lipschitz", "consistency"):
        print(f"note: teacher method {method!r} trains with SoTeacher's {', '.join(on)} from the "
              f"config's teacher.options as well; --set 'teacher.options={{}}' gives the method "
              f"alone", file=sys.stderr)


def cmd_train_teacher(args) -> int:
    from ..pipeline import build_data, model_report, prepare_run_dir, run_teacher
    from ..engine.distributed import is_main, run_on_main
    from ..engine.io import atomic_write_json
    cfg = _load(args, ("teacher",))
    if is_main():
        _note_soteacher_terms(cfg)
    data = build_data(cfg)          # before the run directory: a data error leaves nothing behind
    out = run_on_main(prepare_run_dir, args.out, resume=args.resume, overwrite=args.overwrite)
    model = run_teacher(cfg, data, out, resume=args.resume, progress=not args.quiet)
    if not is_main():
        return 0                    # under torchrun, rank 0 reports
    report = model_report(model, data, cfg.device)
    atomic_write_json(out / "summary.json", report)
    _print_metrics(report)
    print(f"teacher weights: {out / 'model.pt'}")
    return 0


def cmd_distill(args) -> int:
    from ..engine.distributed import is_main, run_on_main
    from ..engine.evaluate import resolve_device
    from ..engine.io import atomic_write_json
    from ..pipeline import (build_data, check_teacher_fits, load_model, model_report,
                            prepare_run_dir, run_student)
    cfg = _load(args, ("student", "distill"))
    teacher = load_model(args.teacher).to(resolve_device(cfg.device))
    data = build_data(cfg)
    check_teacher_fits(teacher, data)
    out = run_on_main(prepare_run_dir, args.out, resume=args.resume, overwrite=args.overwrite)
    student = run_student(cfg, data, teacher, out, resume=args.resume, progress=not args.quiet,
                          name=f"student[{cfg.distill.method}]")
    if not is_main():
        return 0                    # under torchrun, rank 0 reports
    report = model_report(student, data, cfg.device, teacher)
    atomic_write_json(out / "summary.json", report)
    _print_metrics(report)
    print(f"student weights: {out / 'model.pt'}")
    return 0


def cmd_evaluate(args) -> int:
    from ..config import ConfigError
    from ..engine.evaluate import resolve_device
    from ..pipeline import build_data, load_model, model_report
    if args.config is None:
        run_dir = args.model if args.model.is_dir() else args.model.parent
        args.config = run_dir / "config.yaml"
        if not args.config.is_file():
            raise ConfigError(f"no config.yaml beside {str(args.model)!r}; pass --config to "
                              f"name the dataset")
    cfg = _load(args, ())
    model = load_model(args.model).to(resolve_device(cfg.device))
    report = model_report(model, build_data(cfg), cfg.device)
    if args.json:
        print(json.dumps(report))
    else:
        _print_metrics(report)
    return 0


def cmd_experiment(args) -> int:
    from ..config import ConfigError, apply_overrides, load_experiment_config
    from ..experiment import GridFailed, run_experiment, write_report
    from ..engine.distributed import is_main, run_on_main
    baseline = "standard"
    failed: GridFailed | None = None
    if args.config is not None:
        notes: list[str] = []
        cfg = load_experiment_config(args.config, args.overrides, notes=notes)
        if args.device:
            cfg = apply_overrides(cfg, [f"device={args.device}"])
        if args.threads is not None:
            cfg = apply_overrides(cfg, [f"threads={args.threads}"])
        if args.backend is not None:
            cfg = apply_overrides(cfg, [f"experiment.backend={args.backend}"])
        if args.address is not None:
            cfg = apply_overrides(cfg, [f"experiment.address={args.address}"])
        if is_main():
            for n in notes:
                _note(n)
        baseline = cfg.experiment.baseline
        if not args.report_only:
            _apply_threads(cfg.threads)
            log = (lambda *a: None) if args.quiet else (lambda m: print(m, file=sys.stderr))
            try:
                run_experiment(cfg, args.out, progress=not args.quiet, log=log)
            except GridFailed as e:     # report what finished, then the error
                failed = e
    elif not args.report_only:
        raise ConfigError("soteacher experiment needs a CONFIG (or --report-only)")

    def report() -> None:           # under torchrun, rank 0 writes and prints the report
        if not args.out.is_dir():
            raise ConfigError(f"no experiment directory {str(args.out)!r}")
        rep = write_report(args.out, baseline=baseline, plots=not args.no_plots,
                           plots_dir=args.plots)
        print(rep["summary"])
        print(f"\nresults: {rep['results_csv']} ({len(rep['rows'])} runs); summary: "
              f"{rep['summary_md']}; premise panel: {rep['premise_md']}"
              + (f"; {len(rep['plots'])} plots in "
                                        f"{rep['plots'][0].parent}" if rep["plots"] else ""))

    run_on_main(report)
    if failed is not None:
        print(f"soteacher experiment: error: {failed}", file=sys.stderr)
        return 1
    return 0


def cmd_tune(args) -> int:
    from ..config import apply_overrides
    from ..tune import TuneFailed, format_result, load_tune_config, tune
    notes: list[str] = []
    cfg = load_tune_config(args.config, args.overrides, notes=notes)
    for key, value in (("device", args.device), ("threads", args.threads),
                       ("tune.backend", args.backend), ("tune.address", args.address),
                       ("tune.parallel", args.parallel)):
        if value is not None:
            cfg = apply_overrides(cfg, [f"{key}={value}"])
    for n in notes:
        _note(n)
    _apply_threads(cfg.threads)
    log = (lambda *a: None) if args.quiet else (lambda m: print(m, file=sys.stderr))
    try:
        result = tune(cfg, args.out, n_trials=args.trials, proxy=args.proxy, seed=args.seed,
                      progress=not args.quiet, log=log)
    except TuneFailed as e:
        print(f"soteacher tune: error: {e}", file=sys.stderr)
        return 1
    print(format_result(result))
    return 0


def cmd_list(args) -> int:
    from ..data import list_datasets
    from ..distillers import list_distillers
    from ..models import list_models
    from ..teachers import list_teachers
    names = {"distillers": list_distillers, "models": list_models, "datasets": list_datasets,
             "teachers": list_teachers}[args.what]()
    print("\n".join(names))
    return 0


def cmd_data(args) -> int:
    from ..data.download import download
    folder = download(args.name, args.root, url=args.url, md5=args.md5)
    print(f"{args.name}: verified and extracted to {folder}")
    return 0


def cmd_bench(args) -> int:
    if args.bench_command == "grid":
        return _bench_grid(args)
    from ..bench import throughput
    _apply_threads(args.threads)
    r = throughput(args.model, batch_size=args.batch_size, steps=args.steps,
                   device=args.device, num_classes=args.num_classes, amp=args.amp,
                   channels_last=args.channels_last, repeats=args.repeats)
    r["cpu_allocator"] = args.cpu_allocator          # set by main()
    if args.json:                                    # machine-readable: the JSON line alone
        print(json.dumps(r))
        return 0
    print(f"{r['model']} batch {r['batch_size']} on {r['device']} ({r['threads']} threads, "
          f"amp {r['amp']}, channels_last {r['channels_last']}, CPU allocator "
          f"{r['cpu_allocator']})")
    for k in ("pure", "standard", "soteacher"):
        print(f"  {k:<10} {r[k + '_images_per_s']:10.1f} images/s")
    print(f"  loop_efficiency    {r['loop_efficiency']:.3f}  (standard / pure)")
    lo, hi = r["soteacher_overhead_range"]
    print(f"  soteacher_overhead {r['soteacher_overhead']:.3f}  (SoTeacher / standard step time; "
          f"rounds {lo:.3f}..{hi:.3f})")
    return 0


def _bench_grid(args) -> int:
    from ..bench import cuda_grid, grid_table
    modes = {"both": (False, True), "off": (False,), "on": (True,)}[args.compile]
    rows = cuda_grid(args.models, args.batch_sizes, modes, device=args.device,
                     steps=args.steps, repeats=args.repeats)
    print(json.dumps(rows) if args.json else grid_table(rows))
    return 0


def _print_metrics(report: dict) -> None:
    width = max(map(len, report))
    for k, v in report.items():
        print(f"{k.ljust(width)}  {v:.4f}")


COMMANDS = {"demo": cmd_demo, "train-teacher": cmd_train_teacher, "distill": cmd_distill,
            "evaluate": cmd_evaluate, "list": cmd_list, "data": cmd_data, "bench": cmd_bench,
            "experiment": cmd_experiment, "tune": cmd_tune}


#: Commands that run on several processes under torchrun (DistributedDataParallel).
DISTRIBUTED_COMMANDS = ("train-teacher", "distill", "experiment")


def _kept(command: str, out: Path | None) -> tuple[str, bool]:
    """What an interrupted command left in ``out``, and whether ``--resume`` can continue it."""
    from ..engine.io import CheckpointError, safe_torch_load
    from ..engine.trainer import CHECKPOINT, WEIGHTS
    if out is None or not out.is_dir():
        return "nothing was kept", False

    def where(run: Path) -> str | None:
        if (run / WEIGHTS).is_file():
            return "finished"
        if (run / CHECKPOINT).is_file():
            try:
                ck = safe_torch_load(run / CHECKPOINT)
                return f"at epoch {ck['epoch']}, step {ck.get('step', 0)}"
            except (CheckpointError, KeyError, TypeError):
                return None
        return None

    if command == "demo":
        runs = sorted(p.parent for p in out.glob("seed*/*/config.yaml"))
        states = [(r.relative_to(out).as_posix(), where(r)) for r in runs]
        done = [name for name, st in states if st == "finished"]
        partial = [f"{name} {st}" for name, st in states if st not in (None, "finished")]
        if not done and not partial:
            return f"nothing finished in {out} yet", (out / "config.yaml").is_file()
        parts = []
        if done:
            parts.append(f"{len(done)} finished run(s) ({', '.join(done)})")
        if partial:
            parts.append(f"the checkpoint of {', '.join(partial)}")
        return f"kept {' and '.join(parts)} in {out}", True
    if command == "tune":
        done = 0
        if (out / "trials.csv").is_file():
            import csv
            with (out / "trials.csv").open() as f:
                done = sum(r.get("state") == "COMPLETE" for r in csv.DictReader(f))
        return (f"kept {done} completed trial(s) in {out / 'study.db'}; the interrupted trial "
                f"is retried with the same settings, from its last checkpoint if it has one"), True
    if command == "experiment":
        done = len(list(out.glob("**/summary.json")))
        return f"kept {done} finished run(s) and the checkpoints of unfinished ones in {out}", True
    state = where(out)
    if state == "finished":
        return f"the run in {out} had finished", True
    if state is not None:
        return f"kept the checkpoint {state} in {out}", True
    return f"no checkpoint had been written in {out} yet", False


def _continue_command(command: str, argv: list[str], resumable: bool) -> str:
    """The command line that continues an interrupted ``command``."""
    args = [a for a in argv if a not in ("--resume", "--overwrite")]
    if command in ("demo", "train-teacher", "distill"):
        args.append("--resume" if resumable else "--overwrite")
    return shlex.join(["soteacher", *args])


def _interrupted(args, argv: list[str]) -> int:
    from ..engine.distributed import is_main
    if not is_main():
        return 130
    out = getattr(args, "out", None)
    if args.command in ("demo", "train-teacher", "distill", "experiment", "tune"):
        kept, resumable = _kept(args.command, out)
        again = ("start again" if not resumable and args.command not in ("experiment", "tune")
                 else "continue")
        print(f"\nsoteacher {args.command}: interrupted; {kept}; {again} with: "
              f"{_continue_command(args.command, argv, resumable)}", file=sys.stderr)
    else:
        print(f"\nsoteacher {args.command}: interrupted; nothing was kept", file=sys.stderr)
    return 130


_SHOWN: set[str] = set()


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    # Library warnings (a schedule that never decays, options dropped by --set) as one line,
    # each once (the config check and the trainer both check a schedule).
    text = str(message)
    if text not in _SHOWN:
        _SHOWN.add(text)
        print(f"note: {text}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    _SHOWN.clear()
    from ..engine.allocator import tune_cpu_allocator
    args.cpu_allocator = "tuned" if tune_cpu_allocator() else "default"
    from ..data.download import DatasetError
    from ..engine.io import CheckpointError
    from ..engine.trainer import NonFiniteLossError
    from ..engine.distributed import process_group
    from ..engine.trainer import request_interrupt
    request_interrupt(False)
    previous = _install_sigint(request_interrupt)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            # Under torchrun (WORLD_SIZE > 1): one process group for the command's lifetime.
            with process_group(f"soteacher {args.command}", args.command in DISTRIBUTED_COMMANDS):
                return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        if os.environ.get("SOTEACHER_DEBUG"):
            raise
        return _interrupted(args, argv)
    except (ValueError, KeyError, CheckpointError, NonFiniteLossError, ImportError, OSError,
            DatasetError) as e:
        if os.environ.get("SOTEACHER_DEBUG"):
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"soteacher {args.command}: error: {msg}", file=sys.stderr)
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
        request_interrupt(False)


def _install_sigint(request_interrupt):
    """On Ctrl-C: raise ``KeyboardInterrupt`` (Python's default) and also flag the request for
    the trainers, which check it before every step. Returns the previous handler (``None`` where
    none can be installed: outside the main thread)."""
    def on_sigint(signum, frame):
        request_interrupt()
        raise KeyboardInterrupt

    try:
        return signal.signal(signal.SIGINT, on_sigint)
    except ValueError:               # not the main thread
        return None


if __name__ == "__main__":
    sys.exit(main())
