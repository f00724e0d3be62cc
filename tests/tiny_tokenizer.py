"""SmolLM2's tokenizer cut down to the tokens a test corpus needs.

The tiny test Llama is 32 wide; with SmolLM2's full 49,152-token vocabulary its output
layer and the cross-entropy over it cost far more than the rest of the model (most of
each causal-LM test's time). Cutting the vocabulary keeps SmolLM2's byte-level BPE,
chat template and special tokens, and encodes the corpus to the same tokens as the full
tokenizer (only the ids are renumbered); any other text still encodes, through the
byte alphabet and the merges kept. Written here because neither ``tokenizers`` nor
``transformers`` prunes a trained BPE vocabulary (``train_new_from_iterator`` learns new
merges instead, which would change how the corpus is split).
"""

from __future__ import annotations

import json
import shutil
from collections import defaultdict
from pathlib import Path


def _needed(tokens: set[str], merges: list[tuple[str, str]]) -> set[str]:
    """``tokens`` and every token a merge that forms one of them starts from. A merge
    that fires while encoding the corpus forms a token that is either in the encoding
    or merged again later, so this set holds every token any such merge uses: dropping
    the other merges cannot change the corpus's encoding (BPE applies, at each step,
    the lowest-ranked merge that applies; only merges that never fire are dropped)."""
    formed_by = defaultdict(list)
    for a, b in merges:
        formed_by[a + b].append((a, b))
    needed, todo = set(), list(tokens)
    while todo:
        token = todo.pop()
        if token in needed:
            continue
        needed.add(token)
        for pair in formed_by[token]:
            todo.extend(pair)
    return needed


def prune(source: Path, texts: list[str], out: Path) -> dict[int, int]:
    """Write to ``out`` the tokenizer of ``source`` keeping its special tokens, its
    256-symbol byte alphabet and what encoding ``texts`` needs. Returns the map from
    the full tokenizer's ids to the pruned one's (the special tokens keep theirs)."""
    from transformers import AutoTokenizer

    full = AutoTokenizer.from_pretrained(source)
    spec = json.loads((source / "tokenizer.json").read_text(encoding="utf-8"))
    model = spec["model"]
    if model["type"] != "BPE" or spec["pre_tokenizer"]["type"] != "ByteLevel":
        raise ValueError(f"{source}: expected a byte-level BPE tokenizer")
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1))
              for m in model["merges"]]
    vocab: dict[str, int] = model["vocab"]
    used = {full.convert_ids_to_tokens(i) for text in texts
            for i in full(text, add_special_tokens=False)["input_ids"]}
    specials = {t["content"] for t in spec["added_tokens"]}
    alphabet = {token for token in vocab if len(token) == 1}
    keep = _needed(used - specials, merges) | specials | alphabet
    old_ids = sorted(vocab[token] for token in keep)
    new_id = {old: new for new, old in enumerate(old_ids)}
    if any(new_id[t["id"]] != t["id"] for t in spec["added_tokens"]):
        raise ValueError(f"{source}: the special tokens are not the first ids")
    model["vocab"] = {token: new_id[i] for token, i in vocab.items() if token in keep}
    model["merges"] = [[a, b] for a, b in merges if {a, b, a + b} <= keep]
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False),
                                        encoding="utf-8")
    for name in ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (source / name).is_file():
            shutil.copy(source / name, out / name)
    return new_id
