"""Layer 3, privacy: client-level differential privacy (the Gaussian mechanism and its
accountants), client sampling (secret Poisson sampling under DP), the empirical DP
audit, and secure aggregation's protocol and client side.

May import: ``core``, ``settings``, ``comm``, ``aggregation``.
"""
