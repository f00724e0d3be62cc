"""A one-run empirical audit of our client-level DP (Steinke, Nasr and Jagielski, 2023).

Plan, fixed before the first run (parameters chosen with a NumPy model of the same
mechanism, before this script existed):

* Population: 4,000 canary clients and 1,000 honest clients (N = 5,000). Each canary is
  included with probability 1/2 from OS entropy; an included canary sends its own
  coordinate direction at norm C (C = 1), an honest client a random direction at norm
  C. Updates pass through the real server: decoding, the DP stage (clip to C, sum,
  sigma*C noise, divide by qN) and the real samplers.
* Released: the shared state after every round (what every download carries). The
  auditor scores canary i by the sum of its coordinate's released changes over the
  rounds (over the rounds the public schedule says it was sampled in, where the
  schedule is public), guesses with the strategies of :func:`sfedlora.privacy.audit.guess_grid`
  (fixed in advance, Bonferroni over them), 95% confidence.
* Rows (T = 50 rounds each, delta = 1e-5), each run 3 times (the randomness is secret,
  so runs differ):
  - ``dp q=0.1``: sigma 1, q 0.1, secret Poisson sampling (our design);
  - ``dp q=0.02``: sigma 1, q 0.02, secret Poisson sampling;
  - ``no noise``: as ``dp q=0.02`` with the noise switched off, claiming what sigma 1
    would give;
  - ``public sampling``: as ``dp q=0.02`` with the cohort drawn as before (a fixed
    number, seeded from the config seed, so public), claiming the Poisson-amplified
    epsilon that was printed.
* Decision: the audit passes if every ``dp`` lower bound is at most the accountant's
  epsilon (PLD), and has teeth if every lower bound of the two broken rows exceeds the
  epsilon that would have been claimed.

    python benchmarks/dp_audit.py [--repeats 3] [--out docs/results/dp_audit]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from sfedlora.config import PrivacyConfig, ServerConfig
from sfedlora.core import wire
from sfedlora.core.adapters import TensorSpec
from sfedlora.core.environment import describe
from sfedlora.methods import get_method
from sfedlora.privacy.audit import audit, guess_grid
from sfedlora.privacy.dp import Accountant, GaussianMechanism
from sfedlora.privacy.sampling import SecretPoissonSampler, SeededSampler, secure_uniforms
from sfedlora.runtime.server import Reply, build_server

ROOT = Path(__file__).resolve().parents[1]

NAME = "m.audit.lora_A.default.weight"
CANARIES, HONEST, ROUNDS, CLIP, DELTA, SIGMA = 4000, 1000, 50, 1.0, 1e-5, 1.0


@dataclass(frozen=True)
class Row:
    name: str
    rate: float
    noise: float  # the noise the run adds
    claimed_noise: float  # the noise the accountant is told of
    public: bool  # the cohort is a seeded fixed-size draw the auditor can recompute


ROWS = [Row("dp q=0.1", 0.1, SIGMA, SIGMA, False),
        Row("dp q=0.02", 0.02, SIGMA, SIGMA, False),
        Row("no noise", 0.02, 0.0, SIGMA, False),
        Row("public sampling", 0.02, SIGMA, SIGMA, True)]


def run(row: Row) -> dict:
    clients = CANARIES + HONEST  # canaries are 0..m-1, each its own coordinate
    dim = CANARIES
    expected = row.rate * clients
    mechanism = GaussianMechanism(
        PrivacyConfig(enabled=True, noise_multiplier=row.noise, clip_norm=CLIP),
        row.rate, expected)
    server = build_server(get_method("fedit"), {NAME: torch.zeros(dim)},
                          {NAME: TensorSpec((dim,), torch.float32)}, lambda parts: [NAME],
                          ServerConfig(), privacy=mechanism)
    sampler = (SeededSampler(clients, round(expected), seed=0) if row.public
               else SecretPoissonSampler(clients, row.rate, ROUNDS))
    included = secure_uniforms(CANARIES) < 0.5
    honest = np.random.default_rng().standard_normal((HONEST, dim))  # OS-seeded
    honest *= CLIP / np.linalg.norm(honest, axis=1, keepdims=True)
    scores = np.zeros(CANARIES)
    for round_idx in range(1, ROUNDS + 1):
        cohort = sampler.sample(round_idx)
        before = server.state[NAME].double().clone()
        replies = []
        for c in cohort:
            if c < CANARIES and not included[c]:
                continue  # an excluded canary is not in the population at all
            change = torch.zeros(dim, dtype=torch.float64)
            if c < CANARIES:
                change[c] = CLIP
            else:
                change = torch.from_numpy(honest[c - CANARIES])
            upload = (server.sent[NAME].double() + change).float()
            replies.append(Reply(c, 1, wire.encode({NAME: upload})))
        server.aggregate(round_idx, replies)
        released = (server.state[NAME].double() - before).numpy()
        if row.public:  # the auditor reads only the rounds each canary was drawn for
            drawn = np.zeros(CANARIES, dtype=bool)
            drawn[[c for c in cohort if c < CANARIES]] = True
            scores += np.where(drawn, released, 0.0)
        else:
            scores += released
    result = audit(scores, included, guess_grid(CANARIES))
    claimed = Accountant(row.claimed_noise, row.rate, DELTA)
    return {"row": row.name, "epsilon_lb": result.epsilon_lb, "guesses": result.guesses,
            "correct": result.correct, "strategy": asdict(result.strategy),
            "claimed_epsilon_pld": claimed.epsilon_pld(ROUNDS),
            "claimed_epsilon_rdp": claimed.epsilon_rdp(ROUNDS),
            "included_canaries": int(included.sum())}


def table(results: list[dict]) -> str:
    lines = ["| row | claimed epsilon (PLD / RDP) | audit lower bounds (95%), 3 runs | "
             "verdict |", "|---|---|---|---|"]
    for row in ROWS:
        runs = [r for r in results if r["row"] == row.name]
        claimed = runs[0]["claimed_epsilon_pld"]
        bounds = [r["epsilon_lb"] for r in runs]
        broken = row.noise != row.claimed_noise or row.public
        ok = min(bounds) > claimed if broken else max(bounds) <= claimed
        verdict = (("caught: every bound exceeds the claim" if ok else "NOT caught")
                   if broken else ("consistent: every bound below the claim" if ok
                                   else "VIOLATED"))
        lines.append(f"| {row.name} | {claimed:.2f} / {runs[0]['claimed_epsilon_rdp']:.2f} | "
                     + ", ".join(f"{b:.2f} ({r['correct']}/{r['guesses']})"
                                 for b, r in zip(bounds, runs, strict=True))
                     + f" | {verdict} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "docs/results/dp_audit"))
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results, start = [], time.time()
    for row in ROWS:
        for repeat in range(args.repeats):
            results.append(run(row) | {"repeat": repeat})
            print(json.dumps(results[-1]), flush=True)
    text = table(results)
    print(text)
    settings = {"canaries": CANARIES, "honest": HONEST, "rounds": ROUNDS, "clip": CLIP,
                "delta": DELTA, "rows": [asdict(r) for r in ROWS],
                "guess_grid": [asdict(g) for g in guess_grid(CANARIES)], "beta": 0.05}
    (out / "results.json").write_text(json.dumps(
        {"settings": settings, "runs": results, "seconds": time.time() - start}, indent=1))
    (out / "table.md").write_text(text)
    (out / "environment.json").write_text(json.dumps(describe(), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
