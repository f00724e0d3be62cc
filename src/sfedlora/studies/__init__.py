"""Layer 9, studies: experiments over many runs. Sweeps (grids, seeds, resumable
shards, tables) and plots.

May import: every layer below (``core`` to ``runtime``).
"""
