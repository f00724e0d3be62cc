"""Layer 9, studies: experiments over many runs. A study's plan, fixed before its first
run, its readings and verdicts (:mod:`.plan`), and the check that each of its runs can
start before any does (:mod:`.preflight`); one reader of run directories
(:mod:`.runs`), statistics (:mod:`.stats`: 95% t-intervals, paired differences), the
tuned comparison's learning-rate ladder and rate choice (:mod:`.tuning`, parameterised
by a :class:`~.tuning.Study`), verdict readings (:mod:`.readings`: time- and
bytes-to-target; :mod:`.verdicts`: targets and constrained choices), table cells
(:mod:`.tables`), run comparison (:mod:`.compare`), sweeps (grids, seeds, resumable
shards) and plots. A benchmark under ``benchmarks/`` is its arms, configs and report,
importing only these.

May import: every layer below (``core`` to ``runtime``).
"""
