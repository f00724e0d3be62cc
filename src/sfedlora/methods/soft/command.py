"""``sfedlora tsfa-plan CONFIG --out PLAN``: TSFA's offline stage from the command line
(:mod:`.plan` does the work; the CLI passes in the config loader and the runtime)."""

from __future__ import annotations

import json
from pathlib import Path

from sfedlora.methods.base import Command


def _add_arguments(parser) -> None:
    parser.add_argument("config", nargs="?", help="YAML config (network.model=wireless)")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    parser.add_argument("--out", default="tsfa-plan.json", help="the plan file to write")


def _run(args, context) -> int:
    from sfedlora.methods.soft.plan import make_plan

    config_path, overrides = args.config, list(args.overrides)
    if config_path is not None and "=" in config_path:  # only overrides were given
        overrides.insert(0, config_path)
        config_path = None
    plan = make_plan(context.load_config(config_path, overrides), context.run_rounds)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(plan, indent=1) + "\n")
    print("rank  last loss  q/round  variance  T at min keep (s)  bound  feasible")
    for p in plan["pilots"]:
        print(f"{p['rank']:>4}  {p['last_loss']:9.4f}  {p['loss_ratio_per_round']:7.4f}  "
              f"{p['variance']:8.4f}  {p['latency_s_at_min_keep']:17.3f}  {p['bound']:.4f}  "
              f"{p['feasible']}")
    print(f"chosen rank {plan['rank']}; run with: method=tsfa lora.rank={plan['rank']} "
          f"options.plan={args.out}")
    return 0


PLAN = Command(
    name="tsfa-plan",
    help="TSFA's offline stage: pilot each rank of options.ranks and write the chosen rank "
         "and the estimates to a JSON plan that a method=tsfa run reads (options.plan)",
    add_arguments=_add_arguments, run=_run)
