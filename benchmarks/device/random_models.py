"""Build seeded random-weight copies of the models ``prepare.py`` sent (config and
tokenizer only): the speed figures need the models' shapes, not their weights.

    python3 benchmarks/device/random_models.py .device/models /tmp/models
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM


def build(source: Path, target: Path, seed: int = 0) -> None:
    config = AutoConfig.from_pretrained(source)
    torch.manual_seed(seed)
    causal = any(a.endswith("ForCausalLM") for a in (config.architectures or []))
    model = (AutoModelForCausalLM if causal else AutoModel).from_config(config)
    model.save_pretrained(target)
    for path in source.iterdir():  # the tokenizer's files (config.json is written above)
        if path.name != "config.json":
            shutil.copy2(path, target / path.name)


if __name__ == "__main__":
    sources, targets = Path(sys.argv[1]), Path(sys.argv[2])
    for folder in sorted(p for p in sources.iterdir() if p.is_dir()):
        build(folder, targets / folder.name)
        print(f"{targets / folder.name}: random weights from {folder / 'config.json'}")
