"""Load the adapters a run exported with plain PEFT and transformers: no sfedlora.

    .venv/bin/python examples/load_in_peft.py runs/latest "a new phone chip" "the match"

A run directory's ``adapters/`` holds one global adapter (FedIT, FFA-LoRA, ...) or one
per client (methods whose B and head stay on the client: FedSA-LoRA, SFed-LoRA, ...).
Each is a standard PEFT adapter folder whose config names its base model, and the
task head is saved with it, so this is all it takes to classify with one.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from peft import PeftConfig, PeftModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer


def load(adapter_dir: Path, num_labels: int):
    """The base model the adapter names, with the adapter loaded on it."""
    base_path = PeftConfig.from_pretrained(adapter_dir).base_model_name_or_path
    base = AutoModelForSequenceClassification.from_pretrained(base_path,
                                                              num_labels=num_labels)
    return PeftModel.from_pretrained(base, adapter_dir).eval(), \
        AutoTokenizer.from_pretrained(base_path)


def classify(run_dir: Path, texts: list[str], adapter: str | None = None) -> dict:
    """Label names predicted for ``texts`` by each exported adapter (or only
    ``adapter``), and the logits."""
    labels = json.loads((run_dir / "labels.json").read_text())
    found = sorted(p for p in (run_dir / "adapters").iterdir() if p.is_dir())
    predictions = {}
    for folder in found if adapter is None else [run_dir / "adapters" / adapter]:
        model, tokenizer = load(folder, len(labels))
        with torch.inference_mode():
            logits = model(**tokenizer(texts, padding=True, return_tensors="pt")).logits
        predictions[folder.name] = ([labels[i] for i in logits.argmax(-1).tolist()], logits)
    return predictions


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, nargs="?", default=Path("runs/latest"))
    parser.add_argument("texts", nargs="*", default=["Shares fell as the bank cut its "
                        "profit forecast.", "The striker scored twice in the cup final."])
    parser.add_argument("--adapter", help="one adapter folder name (default: every one)")
    args = parser.parse_args(argv)
    predictions = classify(args.run_dir.resolve(), args.texts, args.adapter)
    for name, (labels, _) in predictions.items():
        print(f"{name:>10}: {labels}")
    return predictions


if __name__ == "__main__":
    main()
