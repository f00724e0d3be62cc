"""Federated supervised fine-tuning of a causal language model on your own
prompt/response file.

    .venv/bin/python examples/causal_lm_sft.py --data my_pairs.jsonl \
        --prompt instruction --response output
    .venv/bin/python examples/causal_lm_sft.py     # no file: writes a small arithmetic one

The file is JSON Lines (or CSV) with a prompt and a response column. The loss counts
response tokens only, prompts go through the tokenizer's chat template, and every
client's adapter is scored by perplexity and, where answers end with ``#### <number>``,
by exact match of greedy answers. The default model is SmolLM2-135M-Instruct from its
offline package; ``model.name=PATH_OR_HUB_ID`` takes any causal LM.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import sfedlora


def arithmetic_pairs(path: Path, count: int = 200) -> Path:
    rng = random.Random(0)
    rows = []
    for _ in range(count):
        a, b = rng.randint(1, 50), rng.randint(1, 50)
        rows.append({"prompt": f"What is {a} plus {b}?", "response": f"#### {a + b}"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, help="prompt/response JSONL or CSV")
    parser.add_argument("--prompt", default="prompt", help="the prompt column")
    parser.add_argument("--response", default="response", help="the response column")
    parser.add_argument("--method", default="sfed")
    parser.add_argument("--out", type=Path, default=Path("runs/causal_lm_sft"))
    parser.add_argument("overrides", nargs="*", help="dotted.key=value for the run")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    data = args.data or arithmetic_pairs(args.out / "pairs.jsonl")
    config = {
        "task": "causal-lm", "method": args.method, "rounds": 3,
        "clients": {"num": 4},
        "data": {"source": "files", "train_path": str(data), "prompt_column": args.prompt,
                 "response_column": args.response, "partition": "iid"},
        "local": {"steps": 4, "batch_size": 4, "lr": 5e-4},
        "eval": {"generate": 4, "max_new_tokens": 16},
        "model": {"max_length": 128},
    }
    result = sfedlora.run(config, *args.overrides, f"output_dir={args.out / 'run'}",
                          overwrite=True)
    metrics = result.metrics
    print(metrics[["round", "train_loss", "personalized_perplexity"]].to_string(index=False))
    print("adapters:", ", ".join(result.adapters()), "in", result.run_dir / "adapters")
    return result


if __name__ == "__main__":
    main()
