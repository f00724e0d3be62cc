"""Every method in the project on one experiment: accuracy and bytes, side by side.

The experiment is ``configs/sst2_communication.yaml`` (SST-2, all-MiniLM-L6-v2,
10 clients, Dirichlet(0.5), 30 rounds x 5 steps, seed 0); each arm changes only the
method and what the method needs (mixed ranks, a scaling rule, an adapter type). The
learning rates are the same for every arm, not tuned per method. A finished run whose
resolved config is identical (e.g. from ``benchmarks/communication.py``) is reused
instead of run again; half-finished arms resume. Prints the table of
``docs/results/methods.md``.

    python benchmarks/methods.py                       # all arms
    python benchmarks/methods.py --arms ffa rolora --runs-only   # split over processes
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from communication import run_arm

from sfedlora.config import load_config
from sfedlora.simulation import config_differences

ARMS: dict[str, list[str]] = {
    "fedit": ["method=fedit"],
    "ffa": ["method=ffa"],
    "rolora": ["method=rolora"],
    "fedsa": ["method=fedsa"],
    "fedsa-rslora": ["method=fedsa", "lora.scaling=rslora"],
    "fedsa-vera": ["method=fedsa", "lora.adapter=vera"],
    "sfed": ["method=sfed"],
    "flasc": ["method=flasc", "comm.down.density=0.25", "comm.up.density=0.25"],
    "flocora": ["method=flocora"],
    "hetlora": ["method=hetlora", "lora.client_ranks=[2,4,8]"],
    "flora": ["method=flora", "lora.client_ranks=[2,4,8]"],
    "fdlora": ["method=fdlora"],
}
SAME_RUN_MAY_DIFFER = frozenset({"output_dir", "progress"})


def finished_twin(config: str, overrides: list[str], search: list[Path]) -> Path | None:
    """A finished run under ``search`` whose resolved config equals this arm's."""
    want = load_config(config, overrides).model_dump(mode="json")
    for root in search:
        for summary in sorted(root.glob("*/summary.json")):
            # loaded through today's schema, so fields added since take their defaults
            have = load_config(summary.parent / "config.yaml").model_dump(mode="json")
            if not config_differences(have, want, ignore=SAME_RUN_MAY_DIFFER):
                return summary.parent
    return None


def table(run_dirs: dict[str, Path]) -> str:
    lines = [
        "| method | pers. acc | global acc | MB up | MB down | MB total | run |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, run_dir in run_dirs.items():
        s = json.loads((run_dir / "summary.json").read_text())
        glob = "-" if s["global_accuracy"] is None else f"{s['global_accuracy']:.4f}"
        lines.append(
            f"| {name} | {s['personalized_accuracy']:.4f} | {glob} | "
            f"{s['bytes_up_total'] / 1e6:.1f} | {s['bytes_down_total'] / 1e6:.1f} | "
            f"{s['bytes_total'] / 1e6:.1f} | `{run_dir}` |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/sst2_communication.yaml")
    parser.add_argument("--out", default="runs/methods", type=Path)
    parser.add_argument("--reuse", nargs="*", default=[Path("runs/communication")], type=Path,
                        help="folders of finished runs to reuse when their config is identical")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--runs-only", action="store_true",
                        help="run just these arms, no table (to split arms over processes)")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value for every arm")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    run_dirs = {}
    for name in args.arms:
        overrides = [*ARMS[name], *args.overrides]
        twin = finished_twin(args.config, overrides, args.reuse)
        print(f"arm {name} ..." + (f" (reusing {twin})" if twin else ""), flush=True)
        run_dirs[name] = twin or run_arm(args.out / name, args.config, overrides)
    if not args.runs_only:
        print(table(run_dirs))


if __name__ == "__main__":
    main()
