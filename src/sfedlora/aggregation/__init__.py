"""Layer 2, aggregation: how a server combines updates. Weighted means, robust
combiners (median, trimmed mean), clipping, and the server optimizers of FedOpt.

May import: ``core``, ``settings``.
"""
