r"""Tables of committed runs: the main job's (``docs/results/demo.md``) and the GSM8K
config's (``docs/results/gsm8k.md``).

The main job's runs are ``make demo``'s command with an output folder (and, for the
second, the FedSA-LoRA scale):

    sfedlora run configs/demo.yaml output_dir=docs/results/demo/runs/sfed progress=false
    sfedlora run configs/demo.yaml method=fedsa lora.a_init=independent \
        output_dir=docs/results/demo/runs/fedsa-independent-a progress=false
    python benchmarks/demo.py --report docs/results/demo/runs/sfed \
        docs/results/demo/runs/fedsa-independent-a

(``docs/results/demo.md`` gives the full list, ``make demo`` on a clean clone included.)

The GSM8K run is ``sfedlora run configs/gsm8k_smollm2.yaml
output_dir=docs/results/gsm8k/runs/smollm2 progress=false``.

``--report`` prints, per run, the evaluated rounds and where its wall-clock time went
(``timings.jsonl``), with the commit that ran it and the hardware: a CPU's float results
can differ in their last digits between instruction sets, since torch picks its kernels
by the one it finds. A classification run shows accuracies
beside the clients' majority-label baseline, gradient and adapter-output norms and
cumulative bytes; a causal-LM run shows held-out perplexities and exact match.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from sfedlora.studies import runs

COLUMNS = [
    ("round", "round", "{}"),
    ("train loss", "train_loss", "{:.4f}"),
    ("personalised acc.", "personalized_accuracy", "{:.4f}"),
    ("majority-label baseline", "majority_baseline_accuracy", "{:.4f}"),
    ("global acc.", "global_accuracy", "{:.4f}"),
    ("‖∇A‖", "grad_norm_A", "{:.3f}"),
    ("‖∇B‖", "grad_norm_B", "{:.3f}"),
    ("‖γBAx‖", "adapter_output_norm", "{:.3f}"),
    ("bytes up (cum.)", "bytes_up_total", "{:,}"),
    ("bytes down (cum.)", "bytes_down_total", "{:,}"),
]
LM_COLUMNS = [
    ("round", "round", "{}"),
    ("train loss", "train_loss", "{:.4f}"),
    ("personalised perplexity", "personalized_perplexity", "{:.3f}"),
    ("global perplexity", "global_perplexity", "{:.3f}"),
    ("personalised exact match", "personalized_exact_match", "{:.3f}"),
    ("global exact match", "global_exact_match", "{:.3f}"),
    ("‖γBAx‖", "adapter_output_norm", "{:.3f}"),
    ("bytes up (cum.)", "bytes_up_total", "{:,}"),
]
EVALUATED = {"classification": "personalized_accuracy", "causal-lm": "personalized_perplexity"}


def _cell(fmt: str, value) -> str:
    return "" if value is None else fmt.format(value)


def provenance(run: Path) -> str:
    """The commit the run's first process ran at, and the hardware it ran on."""
    first = runs.environments(run)[0]
    modified = " (modified)" if (first.get("source") or {}).get("modified") else ""
    return f"commit {(runs.commit(first) or '?')[:7]}{modified}, {runs.hardware(first)}"


def report(run_dirs: list[Path]) -> str:
    out = []
    for run in run_dirs:
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        task = cfg.get("task", "classification")
        columns = LM_COLUMNS if task == "causal-lm" else COLUMNS
        lines = [m for m in runs.metrics(run) if m.get(EVALUATED[task]) is not None]
        times = runs.timings(run)
        rounds = [t for t in times if "started_at" in t]  # round 0: an evaluation alone
        before = sum(t.get("eval", 0.0) for t in times if "started_at" not in t)
        train = sum(t["train"] for t in rounds)
        evaluate = sum(t.get("eval", 0.0) for t in rounds)
        aggregate = sum(t.get("aggregate", 0.0) for t in rounds)
        wall = rounds[-1]["ended_at"] - rounds[0]["started_at"]
        first = f" after an evaluation of the base model ({before:.1f} s)" if before else ""
        out += [f"**{run.name}** (method {cfg['method']}, `{run}`, {provenance(run)}): "
                f"{len(rounds)} rounds in {wall:.1f} s of wall-clock time{first}: training "
                f"{train:.1f} s, evaluation {evaluate:.1f} s, aggregation {aggregate:.2f} s.",
                "", "| " + " | ".join(name for name, _, _ in columns) + " |",
                "|---" * len(columns) + "|"]
        out += ["| " + " | ".join(_cell(fmt, m.get(key)) for _, key, fmt in columns) + " |"
                for m in lines]
        out.append("")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--report", type=Path, nargs="+", required=True,
                        help="run directories to print")
    print(report(parser.parse_args().report))


if __name__ == "__main__":
    main()
