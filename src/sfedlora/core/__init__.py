"""Layer 0, the core: what every other layer speaks. The parts of an adapter, the
records a round produces, seeds, the wire format (safetensors), tensor stores, the
LoRA scale, codecs, rank padding and checkpoint files.

May import: nothing of sfedlora outside ``core``.
"""
