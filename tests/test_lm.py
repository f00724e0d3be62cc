"""The causal-LM task: loss mask, answer parsing, federated runs on a tiny Llama."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from sfedlora.config import ConfigError
from sfedlora.modeling.lm import (
    EncodedLM,
    LMCollator,
    PairDataset,
    encode_pairs,
    parse_answer,
    prompt_text,
)
from sfedlora.runtime.experiment import build_experiment
from sfedlora.runtime.simulation import Simulation


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir):
    return AutoTokenizer.from_pretrained(tiny_llama_dir)


def test_loss_mask_covers_exactly_the_response_tokens(tokenizer):
    pairs = PairDataset(["What is 2 plus 3?", "Name a colour."],
                        ["2 + 3 = 5\n#### 5", "Blue."], np.zeros(2, dtype=np.int64))
    enc = encode_pairs(tokenizer, pairs, max_length=256)
    for ids, labels, response in zip(enc.input_ids, enc.labels, pairs.responses, strict=True):
        target = [t for t in labels if t != -100]
        expected = tokenizer(response, add_special_tokens=False)["input_ids"]
        assert target == [*expected, tokenizer.eos_token_id]
        start = labels.index(target[0])
        assert all(t == -100 for t in labels[:start])  # the whole prompt is masked
        assert ids[start:] == target  # labels are the tokens themselves at those positions
        prompt = tokenizer.decode(ids[:start])
        assert "<|im_start|>assistant" in prompt  # the chat template was applied


def test_a_max_length_that_cuts_off_every_response_is_refused(tokenizer, caplog):
    """Otherwise the loss reads 0 and the perplexity 1, as if the model were perfect."""
    from sfedlora.config import ConfigError
    from sfedlora.modeling.lm import prompt_text

    short = len(tokenizer(prompt_text(tokenizer, "Hi."), add_special_tokens=False)["input_ids"])
    long_prompt = "Tell me the number that follows this long question please. " * 8
    pairs = PairDataset([long_prompt, long_prompt], ["#### 5", "#### 6"],
                        np.zeros(2, dtype=np.int64))
    with pytest.raises(ConfigError, match=r"raise model\.max_length"):
        encode_pairs(tokenizer, pairs, max_length=short + 2)
    mixed = PairDataset(["Hi.", long_prompt], ["#### 5", "#### 6"], np.zeros(2, dtype=np.int64))
    enc = encode_pairs(tokenizer, mixed, max_length=short + 2)
    assert "1 of 2 examples" in caplog.text
    assert any(t != -100 for t in enc.labels[0])


def test_collator_pads_labels_with_ignore_index(tokenizer):
    enc = EncodedLM([[5, 6, 7], [8]], [[-100, 6, 7], [8]])
    batch = LMCollator(tokenizer)(enc, [0, 1])
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["input_ids"][1, 1].item() == tokenizer.pad_token_id


def test_packing_fills_blocks_and_keeps_the_mask(tokenizer):
    pairs = PairDataset(["q"] * 20, ["an answer of a few tokens"] * 20,
                        np.zeros(20, dtype=np.int64))
    plain = encode_pairs(tokenizer, pairs, max_length=64)
    packed = encode_pairs(tokenizer, pairs, max_length=64, packing=True)
    assert all(len(s) == 64 for s in packed.input_ids)
    total = sum(len(s) for s in plain.input_ids)
    assert len(packed) == total // 64
    assert packed.num_target_tokens <= plain.num_target_tokens


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Janet sells 16 - 3 - 4 = 9 eggs.\n#### 18", "18"),
        ("#### 1,234", "1234"),
        ("#### $70,000", "70000"),
        ("#### -5", "-5"),
        ("The answer is $1,250.50 in total.", "1250.5"),
        ("So she has -3 apples left. Hooray!", "-3"),
        ("It takes 2 hours, then 3.0 more", "3"),
        ("#### 42 apples\nmore text 7", "42"),
        ("no number here", None),
        ("#### 0.25", "0.25"),
    ],
)
def test_answer_parser(text, expected):
    assert parse_answer(text) == expected


@pytest.mark.parametrize("method", [
    "fedit", "ffa", "fedsa", "rolora", "sfed", "flocora", "flasc server.lr=0.1",
    "hetlora lora.client_ranks=[2,4]", "fedsa lora.adapter=vera local.lr=0.1",
    "sfed comm.up.density=0.25 comm.up.bits=4 comm.down.bits=8",
    "fdlora options.grid=[0,0.5,1]",  # 9 fusions scored per client, not the default 25
    "flora lora.client_ranks=[2,4]", "fedex", "flexlora lora.client_ranks=[2,4]", "fedsvd",
    # one client's worth of steps per round, as the others take (per_round x local.steps)
    "central clients.per_round=1",
])
def test_every_method_lowers_the_training_loss_of_a_tiny_llama(method, tiny_lm_config,
                                                               tmp_path):
    name, *extra = method.split()
    # scored before training and after the last round only: what the thresholds compare
    cfg = tiny_lm_config(f"method={name}", "local.lr=0.02", "eval.generate=0",
                         "eval.at_start=true", "eval.every=3", "rounds=3", *extra)
    summary = Simulation(cfg).run()
    lines = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [x["round"] for x in lines] == [0, 1, 2, 3]
    # measured at seed 0 (2026-12-07, the cut tokenizer): training loss after round 3
    # over round 1's, 0.51-0.69; perplexity after round 3 over the untrained model's,
    # 0.010-0.033
    assert summary["train_loss"] < 0.9 * lines[1]["train_loss"]
    assert summary["personalized_perplexity"] < 0.1 * lines[0]["personalized_perplexity"]


def test_lm_run_writes_perplexity_exact_match_and_samples(tiny_lm_config, tmp_path):
    cfg = tiny_lm_config("method=sfed", "eval.at_start=true", "rounds=2")
    Simulation(cfg).run()
    out = tmp_path / "run"
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["round"] for x in lines] == [0, 1, 2]
    for key in ("personalized_perplexity", "global_perplexity", "personalized_exact_match",
                "global_exact_match"):
        assert all(x[key] is not None for x in lines), key
    samples = [json.loads(x) for x in (out / "samples/round_0002.jsonl").read_text().splitlines()]
    assert len(samples) == 3 * 2 + 3 * 2  # 2 per client's own test part, 2 per client@global
    assert {"question", "reference", "generated", "parsed", "correct"} <= set(samples[0])
    assert (out / "adapters/client_0/adapter_config.json").is_file()


@pytest.mark.parametrize("method", ["fedit", "fedex"])  # fedex: base merges, exact LoRA
def test_lm_exported_adapter_loads_in_peft(method, tiny_lm_config, tiny_llama_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    sim = Simulation(tiny_lm_config(f"method={method}", "rounds=1", "eval.generate=0"))
    sim.run()
    batch = sim.pool.exp.worker.collate(sim.pool.exp.global_test, list(range(4)))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
                                      tmp_path / "run/adapters/global").eval()
    sim.pool.exp.worker.slots.load(sim.global_adapter())
    sim.pool.exp.worker.model.eval()
    with torch.inference_mode():
        ours = sim.pool.exp.worker.model(input_ids=batch["input_ids"],
                                    attention_mask=batch["attention_mask"]).logits
        theirs = model(input_ids=batch["input_ids"],
                       attention_mask=batch["attention_mask"]).logits
    # FedEx-LoRA's residual lives in float32 base weights (W + delta, rounded), while
    # PEFT adds the exact LoRA's B A x separately: float32 rounding of O(1) logits,
    # measured up to 2.6e-5; 1e-4 is still 1e3x below a logit difference that matters
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5 if method == "fedit" else 1e-4)


def test_llama_targets_default_to_attention_and_mlp(tiny_lm_config):
    exp = build_experiment(tiny_lm_config())
    targets = exp.worker.model.peft_config["default"].target_modules
    assert set(targets) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                            "down_proj"}


def test_lm_config_errors(tiny_lm_config):
    with pytest.raises(ConfigError, match="task=causal-lm needs prompt/response data"):
        tiny_lm_config("data.source=bbc")
    with pytest.raises(ConfigError, match=r"data\.prompt_column='instruction' is not a column"):
        build_experiment(tiny_lm_config("data.prompt_column=instruction"))
    with pytest.raises(ConfigError, match="metadata field"):
        build_experiment(tiny_lm_config("data.partition=dirichlet"))
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="needs a CUDA GPU"):
            build_experiment(tiny_lm_config("model.load_in_4bit=true"))


def test_fixed_padding_is_refused_for_a_language_model(tiny_lm_config):
    with pytest.raises(ConfigError, match=r"model\.padding=max_length applies to "
                                          r"classification"):
        tiny_lm_config("model.padding=max_length")


def test_the_tiny_llamas_tokenizer_splits_its_data_as_smollm2s_does(tiny_llama_dir,
                                                                    tiny_math_file):
    """The tiny Llama's tokenizer is SmolLM2's cut to what the tiny data needs
    (``tiny_tokenizer``): the same tokens, the same chat template, a small vocabulary."""
    from sfedlora.modeling.lm import smollm2_path

    full, tiny = AutoTokenizer.from_pretrained(smollm2_path()), AutoTokenizer.from_pretrained(
        tiny_llama_dir)
    rows = [json.loads(line) for line in tiny_math_file.read_text().splitlines()]
    for row in rows:
        for text in (prompt_text(full, row["question"]), row["answer"]):
            assert tiny.tokenize(text) == full.tokenize(text), text
    assert prompt_text(tiny, "q") == prompt_text(full, "q")
    assert tiny.eos_token == full.eos_token and tiny.eos_token_id == full.eos_token_id
    assert len(tiny) < 1000
    anything = "Ünïcode ☃ and 3,141 eggs\n#### 7"  # not in the data: bytes and kept merges
    assert tiny.decode(tiny(anything, add_special_tokens=False)["input_ids"]) == anything
