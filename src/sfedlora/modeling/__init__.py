"""Layer 4, models: building the PEFT-wrapped base model and tokenizer, batching, and
the causal-LM helpers (prompts, answers).

May import: ``core``, ``settings``, ``comm``, ``aggregation``, ``privacy``.
"""
