"""``sfedlora`` command line: ``sfedlora run [CONFIG.yaml] [dotted.key=value ...]``.

Layer 10, the top: may import every layer."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

import sfedlora.api as api
from sfedlora.config import ConfigError, load_config, to_yaml
from sfedlora.core.checkpoint import CheckpointError
from sfedlora.studies import runs as run_files


def _quiet_libraries() -> None:
    from sfedlora.runtime.report import quiet_libraries

    quiet_libraries()


def _print_table(summary: dict, run_dir: str) -> None:
    from rich.console import Console
    from rich.table import Table

    from sfedlora.runtime.report import summary_rows, summary_title

    table = Table(title=summary_title(summary))
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in summary_rows(summary):
        table.add_row(name, value)
    console = Console()
    console.print(table)
    console.print(f"run directory: {run_dir}")


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def cmd_run(args: argparse.Namespace) -> int:
    _quiet_libraries()
    from sfedlora.runtime.simulation import Simulation

    if args.resume:
        sim = Simulation.resume(args.resume, _resume_overrides(args))
    else:  # the Python API's path (sfedlora.run), step by step
        config, overrides = _split_config_arg(args)
        sim = api.simulation(api.experiment_config(config, overrides), args.overwrite)
    cfg = sim.cfg
    # Schedulers (SLURM, Kubernetes) stop jobs with SIGTERM: checkpoint as on Ctrl-C.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        result = api.finish(sim, sim.run(overwrite=args.overwrite))
    except KeyboardInterrupt:
        print(f"interrupted; continue with: sfedlora run --resume {cfg.output_dir}",
              file=sys.stderr)
        return 130
    _print_table(result.summary, str(result.run_dir))
    return 0


def _resume_overrides(args: argparse.Namespace) -> list[str]:
    overrides = [a for a in (args.config, *args.overrides) if a is not None]
    if any("=" not in a for a in overrides):
        raise ConfigError("--resume takes the run directory's own config; give only "
                          "dotted.key=value overrides, not a config file")
    return overrides


def _split_config_arg(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    config_path, overrides = args.config, list(args.overrides)
    if config_path is not None and "=" in config_path:  # only overrides were given
        overrides.insert(0, config_path)
        config_path = None
    return config_path, overrides


def cmd_config(args: argparse.Namespace) -> int:
    cfg = load_config(*_split_config_arg(args))
    print(to_yaml(cfg), end="")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    _quiet_libraries()
    from sfedlora.studies.sweep import parse_grid, parse_shard

    config, overrides = _split_config_arg(args)
    out = Path(args.out)
    done = api.sweep(config, parse_grid(args.grid), *overrides, out=out,
                     shard=parse_shard(args.shard), batched=args.batched,
                     tune_on=args.tune_on,
                     on_start=lambda name: print(f"run {name}", file=sys.stderr, flush=True),
                     ).finished
    if done:
        print((out / "table.md").read_text(), end="")
    else:
        print(f"shard {args.shard} finished; the tables are written when every shard is")
    print(f"sweep directory: {out}")
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    _quiet_libraries()
    from sfedlora.studies.plan import PlanError
    from sfedlora.studies.protocol import PlannedStudy

    try:
        study = PlannedStudy.load(Path(args.plan), shard=args.shard)
        if args.stage == "status":
            print(study.progress())
            return 0
        if args.stage in ("check", "select", "report", "all"):
            from sfedlora.studies.preflight import check

            if problems := check(study.plan, study.root):
                raise PlanError("some runs of this plan cannot start, so none was "
                                "started:\n" + "\n".join(f"- {p}" for p in problems))
            if args.stage == "check":
                print(f"every run of {args.plan} can start: each arm's config resolves on "
                      "every seed and rung, and its clients can be built")
                return 0
        if args.jobs > 1 and args.batched > 1:
            raise PlanError("--jobs and --batched are two ways to share the machine; "
                            "give one of them")
        if args.batched > 1:
            from sfedlora.studies.parallel import run_batched

            done = run_batched(study, args.stage, args.arms, args.batched)
        elif args.jobs > 1:
            from sfedlora.studies.parallel import run_parallel

            done = run_parallel(study, args.stage, args.arms, args.jobs)
        else:
            done = study.run(args.stage, args.arms)
    except PlanError as exc:
        print(f"sfedlora study: {exc}", file=sys.stderr)
        return 2
    if not done:
        print(f"shard {args.shard} finished its part; the rest waits for the other shards")
        return 0
    if args.stage in ("decide", "all"):
        print((study.folder / "report.md").read_text(), end="")
    return 0


def cmd_flower_sim(args: argparse.Namespace) -> int:
    _quiet_libraries()
    from sfedlora.runtime.flower.simulation import run_simulation

    if args.resume:
        run_simulation(None, _resume_overrides(args), workers=args.workers,
                       resume=args.resume)
    else:
        config, overrides = _split_config_arg(args)
        run_simulation(config, overrides, workers=args.workers, overwrite=args.overwrite)
    return 0


def cmd_deploy_local(args: argparse.Namespace) -> int:
    _quiet_libraries()
    from sfedlora.runtime.flower.deploy import DeploymentError, deploy_local

    if args.nodes < 1:
        raise ConfigError(f"--nodes must be at least 1, got {args.nodes}")
    config, overrides = ((None, _resume_overrides(args)) if args.resume
                         else _split_config_arg(args))
    try:
        run_dir = deploy_local(config, overrides, args.nodes, timeout=args.timeout,
                               resume=args.resume, overwrite=args.overwrite,
                               state_dir=args.state_dir, serving=args.serving,
                               compute_slots=args.compute_slots or None)
    except DeploymentError as exc:
        print(f"sfedlora: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; every process the deployment started is stopped",
              file=sys.stderr)
        return 130
    _print_table(run_files.summary(run_dir), str(run_dir))
    print(f"process logs: {run_dir / 'deploy'}")
    return 0


def cmd_node_runtime(args: argparse.Namespace) -> int:
    _quiet_libraries()
    from sfedlora.runtime.flower.node_runtime import supervise

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    return supervise(args)


def cmd_plot(args: argparse.Namespace) -> int:
    from sfedlora.studies.plots import plot_lr_transfer, plot_runs, plot_sweep

    if bool(args.runs) == bool(args.sweep):
        raise ConfigError("give run directories or --sweep SWEEP_DIR (one of the two)")
    try:
        if args.sweep and args.lr_transfer:
            written = plot_lr_transfer(args.sweep, args.out, curve_key=args.curve)
        elif args.sweep:
            written = plot_sweep(args.sweep, args.out, metric=args.y)
        else:
            written = [plot_runs(args.runs, args.out or "plot.png", x=args.x, y=args.y,
                                 labels=args.labels, title=args.title)]
    except (FileNotFoundError, ValueError, KeyError) as exc:
        raise ConfigError(str(exc)) from None
    print("\n".join(str(p) for p in written))
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from sfedlora.data import catalog

    if args.action == "list":
        print(f"data directory: {catalog.data_dir()} (${catalog.ENV})")
        for name, about, present in catalog.status():
            print(f"  {name:<7} {'present' if present else 'missing'}  {about}")
        return 0
    if not args.names:
        raise ConfigError("sfedlora data get needs dataset names, e.g. sfedlora data get sst2")
    for name in args.names:
        print(f"{name}: {catalog.get(name, Path(args.source) if args.source else None)}")
    return 0


def _method_commands(sub) -> None:
    """The subcommands that ship with methods (``sfedlora.methods.COMMANDS``: TSFA's
    tsfa-plan), each given the config loader and the in-process runtime, which a method
    may not import."""
    from types import SimpleNamespace

    from sfedlora.methods import COMMANDS

    for command in COMMANDS:
        parser = sub.add_parser(command.name, help=command.help)
        command.add_arguments(parser)

        def run(args, command=command) -> int:
            _quiet_libraries()
            from sfedlora.runtime.simulation import run_rounds

            context = SimpleNamespace(load_config=load_config, run_rounds=run_rounds)
            return command.run(args, context)

        parser.set_defaults(func=run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sfedlora", description="Federated LoRA fine-tuning (SFed-LoRA and baselines)."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run one federated experiment in this process")
    run.add_argument("config", nargs="?", help="YAML config (default: the offline main job)")
    run.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    run.add_argument("--resume", metavar="RUN_DIR",
                     help="continue the run in RUN_DIR from its last checkpoint")
    run.add_argument("--overwrite", action="store_true", help="replace the run that "
                     "output_dir holds (without it, such a directory is refused)")
    run.set_defaults(func=cmd_run)
    show = sub.add_parser("config", help="print the resolved config (validated) and exit")
    show.add_argument("config", nargs="?", help="YAML config (default: the offline main job)")
    show.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    show.set_defaults(func=cmd_config)
    sweep = sub.add_parser("sweep", help="run the cross product of grid values; resumable")
    sweep.add_argument("config", nargs="?", help="base YAML config")
    sweep.add_argument("overrides", nargs="*", help="dotted.key=value for every run")
    sweep.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                       help="a swept key and its values (repeat for a cross product)")
    sweep.add_argument("--out", default="runs/sweep", help="sweep directory")
    sweep.add_argument("--shard", default="0/1", metavar="K/M",
                       help="run only runs K, K+M, K+2M, ... (M processes share one sweep)")
    sweep.add_argument("--batched", type=int, default=1, metavar="R",
                       help="run R runs at a time in this process, their clients trained "
                            "in shared passes through the one base model (1: one run "
                            "after another)")
    sweep.add_argument("--tune-on", choices=["loss", "accuracy"], default="loss",
                       help="what a learning-rate ladder's best_lr tables choose on: the "
                            "lowest mean validation loss or the highest mean validation "
                            "accuracy (better where each client keeps its own head)")
    sweep.set_defaults(func=cmd_sweep)
    study = sub.add_parser("study", help="run a study by its committed plan.yaml: choose "
                           "each arm's rung on the selection seeds, run the reporting seeds, "
                           "decide the plan's rules (writes report.md beside the plan)")
    study.add_argument("plan", help="the study's plan.yaml")
    study.add_argument("--stage", choices=["select", "report", "decide", "all", "status",
                                           "check"],
                       default="all", help="status: what has finished and what is due "
                       "next, per arm; check: whether every run's config resolves and its "
                       "clients can be built (both run nothing; select, report and all "
                       "check first)")
    study.add_argument("--arms", nargs="+", help="only these arms (default: every arm; "
                       "run arms in separate processes to share the machine)")
    study.add_argument("--shard", default="0/1", metavar="K/M",
                       help="run only runs K, K+M, ... of each sweep (M processes)")
    study.add_argument("--jobs", type=int, default=1, metavar="N",
                       help="keep N runs going at once, each a process of its own, each "
                       "started as soon as the runs it depends on have finished (one torch "
                       "thread each unless OMP_NUM_THREADS says otherwise)")
    study.add_argument("--batched", type=int, default=1, metavar="R",
                       help="run up to R runs at a time in this process, their clients "
                       "trained in shared passes through the one base model (for a GPU); "
                       "every run that can start goes into the next batch")
    study.set_defaults(func=cmd_study)
    flower = sub.add_parser(
        "flower-sim", help="run one experiment on Flower's simulation engine (one virtual "
        "SuperNode per client); same results as `run`")
    flower.add_argument("config", nargs="?", help="YAML config (default: the offline main job)")
    flower.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    flower.add_argument("--workers", type=int, help="worker processes, one model each "
                        "(default: one per CPU core)")
    flower.add_argument("--resume", metavar="RUN_DIR", help="continue the Flower run in "
                        "RUN_DIR from its last checkpoint (nodes read their state dirs)")
    flower.add_argument("--overwrite", action="store_true",
                        help="replace the run that output_dir holds")
    flower.set_defaults(func=cmd_flower_sim)
    deploy = sub.add_parser(
        "deploy-local", help="run one experiment on Flower's deployment engine on this "
        "machine: a SuperLink and one SuperNode per client as separate processes, with TLS "
        "and node authentication")
    deploy.add_argument("config", nargs="?", help="YAML config (default: the offline main job)")
    deploy.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    deploy.add_argument("--nodes", type=int, required=True,
                        help="SuperNodes to start, one per client (sets clients.num)")
    deploy.add_argument("--timeout", type=float, help="give up (and stop everything) after "
                        "this many seconds (default: wait for the run)")
    deploy.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR "
                        "from its last checkpoint")
    deploy.add_argument("--overwrite", action="store_true",
                        help="replace the run that output_dir holds")
    deploy.add_argument("--state-dir", help="where the nodes keep their clients' state and "
                        "exported adapters (default: $SFEDLORA_STATE_DIR, else "
                        "~/.cache/sfedlora/flower-state); a resumed run needs the same one")
    deploy.add_argument("--serving", choices=["runtime", "worker", "per-message"],
                        default="runtime",
                        help="what answers a node's messages: runtime (default), the node's "
                        "sfedlora runtime, one process with the model loaded once, taking "
                        "tasks from its SuperNode; worker, Flower's per-message ClientApp "
                        "process handing each message to a long-lived worker; per-message, "
                        "Flower's default, the model built for every message (slowest; "
                        "for comparison)")
    deploy.add_argument("--compute-slots", type=int, default=-1, metavar="K",
                        help="at most K nodes compute at once, each with cores/K torch "
                        "threads (default: one per core); 0: every node at once")
    deploy.set_defaults(func=cmd_deploy_local)

    from sfedlora.runtime.flower import node_runtime

    runtime = sub.add_parser(
        "node-runtime", help="answer a Flower SuperNode's messages (one started with "
        "--isolation process) in one long-lived process, the model loaded once; restarted "
        "if it dies")
    node_runtime.add_arguments(runtime)
    runtime.set_defaults(func=cmd_node_runtime)

    data = sub.add_parser("data", help="the named datasets (data.dataset: NAME): list them, "
                          "or fetch them into the data directory")
    data.add_argument("action", choices=["get", "list"])
    data.add_argument("names", nargs="*", help="datasets to fetch, e.g. sst2 gsm8k")
    data.add_argument("--from", dest="source", metavar="FOLDER", help="copy the files from "
                      "this folder instead of the Hugging Face Hub (machines offline)")
    data.set_defaults(func=cmd_data)

    _method_commands(sub)

    plot = sub.add_parser("plot", help="draw a metric of runs against rounds or bytes")
    plot.add_argument("runs", nargs="*", help="run directories")
    plot.add_argument("--sweep", help="a sweep directory: write the scaling-study figures "
                      "to SWEEP/figures/")
    plot.add_argument("--x", choices=["round", "bytes", "simulated_seconds"],
                      default="round", help="simulated_seconds: runs with "
                      "network.model=wireless")
    plot.add_argument("--y", default="personalized_accuracy", help="metric to draw")
    plot.add_argument("--labels", nargs="+", help="one legend label per run")
    plot.add_argument("--title")
    plot.add_argument("--out", help="PNG file to write (default plot.png); with --sweep, "
                      "the folder for the figures (default SWEEP_DIR/figures)")
    plot.add_argument("--lr-transfer", action="store_true",
                      help="with --sweep: held-out loss against learning rate per rule, "
                           "one curve per rank (or client count), minima starred")
    plot.add_argument("--curve", help="with --lr-transfer: the key with one curve per value "
                      "(default lora.rank, else clients.num)")
    plot.set_defaults(func=cmd_plot)
    return parser


def _torchrun_helper() -> bool:
    """Whether torchrun started this process as a rank above 0: it serves rank 0's
    clients (:mod:`sfedlora.runtime.client_group`) instead of running the command."""
    return ("TORCHELASTIC_RUN_ID" in os.environ
            and int(os.environ.get("RANK", "0")) > 0)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse takes positionals before options only; accept overrides after options too
    # (``sfedlora sweep base.yaml --grid seed=0,1 local.lr=0.01``).
    if extra and all("=" in a and not a.startswith("-") for a in extra) \
            and hasattr(args, "overrides"):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if _torchrun_helper():
        from sfedlora.runtime.client_group import serve

        serve()  # `torchrun --nproc-per-node W sfedlora run ... clients.world_size=W`
        return 0
    try:
        return args.func(args)
    except (ConfigError, CheckpointError) as exc:
        print(f"sfedlora: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
