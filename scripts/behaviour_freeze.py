"""A refactoring guard: tiny runs of every method and every cross-cutting feature, whose
``metrics.jsonl`` must stay byte-identical across a change that means to keep
behaviour (issue 38's restructuring).

    .venv/bin/python scripts/behaviour_freeze.py record   # before: write the references
    .venv/bin/python scripts/behaviour_freeze.py check    # after: rerun and compare

Byte identity holds on one machine: CPUs with other vector units (AVX2 against AVX-512)
run other kernels, which round differently in the last bits. ``environment.json`` beside
the references says what they were recorded with, and a check elsewhere says so; record
the references on the machine that checks, at the commit before the change.

The references live in ``scripts/behaviour_freeze/<case>.jsonl``. Runs are in-process
on the tests' tiny seeded BERT and data (``tests/conftest.py``); the Flower equality
tests cover the other runtime. DP draws its sampling and noise from ``os.urandom``, so
this script (never the package) replaces ``os.urandom`` with a seeded stream to make
DP runs comparable.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import random
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REFERENCES = ROOT / "scripts" / "behaviour_freeze"
sys.path.insert(0, str(ROOT))  # tests/ is not a package on sys.path by default

MIXED = ["lora.client_ranks=[2,4,2,4]"]
WIRELESS = ["network.model=wireless", "network.allocation=min_max"]
CASES: dict[str, list[str]] = {
    **{m: [f"method={m}"] for m in (
        "fedit", "ffa", "fedsa", "rolora", "sfed", "flasc", "flocora", "fdlora", "fedex",
        "fedsvd", "soft", "local", "central")},
    **{m: [f"method={m}", *MIXED] for m in ("flora", "hetlora", "flexlora")},
    "tsfa": ["method=tsfa", *WIRELESS, "network.bandwidth_hz=2e3", "options.latency_budget_s=3",
             "options.keep_choices=[0.25,0.5,1.0]", "comm.up.error_feedback=true"],
    "dp": ["method=sfed", "privacy.enabled=true", "privacy.noise_multiplier=0.5",
           "lora.a_init=shared", "clients.per_round=2", "eval.every=1"],
    "secagg": ["method=sfed", "privacy.secure_aggregation=true"],
    "delta-down": ["method=sfed", "comm.down.delta=true", "comm.down.density=0.1",
                   "comm.down.bits=8", "clients.per_round=2"],
    "lossy-up": ["method=fedit", "comm.up.bits=8", "comm.up.density=0.25",
                 "comm.up.error_feedback=true"],
    "wireless": ["method=sfed", *WIRELESS],
    "partial": ["method=fedsa", "clients.per_round=2", "eval.every=1"],
    "fedsvd-frozen-head": ["method=fedsvd", "options.train_head=false"],
}


def _seeded_urandom() -> None:
    stream = random.Random(38)
    os.urandom = lambda n: stream.randbytes(n)  # a check, never a release


def run_case(name: str, overrides: list[str], work: Path) -> str:
    from sfedlora.config import load_config
    from sfedlora.runtime.simulation import Simulation
    from tests.conftest import tiny_base

    _seeded_urandom()
    out = work / name
    cfg = load_config(None, [*tiny_base(work / "model", work / "data.csv", out), *overrides])
    Simulation(cfg).run()
    return (out / "metrics.jsonl").read_text()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["record", "check"])
    parser.add_argument("cases", nargs="*", help="a subset of the cases (default: all)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore")
    from tests.conftest import make_tiny_data, make_tiny_model

    names = args.cases or list(CASES)
    failed = []
    here = _arithmetic()
    if args.mode == "check" and (recorded := _recorded_arithmetic()) != here:
        # other CPU kernels round differently: byte identity is then not expected
        print(f"note: references recorded with {recorded}, this machine has {here}; "
              "record them here first (at the commit before the change), then check")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        make_tiny_model(work / "model")
        make_tiny_data(work / "data.csv")
        REFERENCES.mkdir(exist_ok=True)
        for name in names:
            start = time.perf_counter()
            got = run_case(name, CASES[name], work)
            ref = REFERENCES / f"{name}.jsonl"
            if args.mode == "record":
                ref.write_text(got)
                status = "recorded"
            elif ref.read_text() == got:
                status = "identical"
            else:
                failed.append(name)
                status = "DIFFERS"
                sys.stdout.writelines(difflib.unified_diff(
                    ref.read_text().splitlines(True), got.splitlines(True),
                    str(ref), "now", n=0))
            print(f"{name:20s} {status} ({time.perf_counter() - start:.1f} s)", flush=True)
    if args.mode == "record":
        ENVIRONMENT.write_text(json.dumps(here, indent=1) + "\n")
    if failed:
        print(f"{len(failed)} of {len(names)} cases changed: {', '.join(failed)}")
        return 1
    return 0


ENVIRONMENT = REFERENCES / "environment.json"


def _arithmetic() -> dict:
    """What decides the runs' last bits besides the code: torch and its CPU kernels."""
    import torch

    return {"torch": torch.__version__,
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability()}


def _recorded_arithmetic() -> dict | None:
    return json.loads(ENVIRONMENT.read_text()) if ENVIRONMENT.is_file() else None


if __name__ == "__main__":
    raise SystemExit(main())
