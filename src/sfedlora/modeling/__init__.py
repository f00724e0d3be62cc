"""Layer 4, models: building the PEFT-wrapped base model and tokenizer, batching,
several clients' rows through one pass (:mod:`.client_rows`), and the causal-LM
helpers (prompts, answers).

May import: ``core``, ``settings``, ``comm``, ``aggregation``, ``privacy``.
"""
