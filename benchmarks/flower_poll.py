"""What one dispatcher sweep of Flower's simulation engine costs, by node count.

flwr 1.41's simulation engine (``flwr.server.superlink.fleet.vce.vce_api``) polls every
registered node for messages about every 0.1 s; each poll
(``InMemoryLinkState.get_message_ins``) takes the state's lock and checks every stored
message. This times one sweep over N registered nodes with no message stored: the
floor of that cost, which then grows with every message in flight (each poll checks
each message's expiry and federation). ``docs/results/scale.md`` explains the round
times of one virtual SuperNode per client with it.

    python benchmarks/flower_poll.py [--nodes 10 1000 10000]
"""

from __future__ import annotations

import argparse
import secrets
import time

from flwr.common.constant import HEARTBEAT_INTERVAL_INF, NOOP_ACCOUNT_NAME, NOOP_FLWR_AID
from flwr.server.superlink.linkstate import LinkStateFactory
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.superlink.federation.noop_federation_manager import NoOpFederationManager


def sweep_seconds(nodes: int, sweeps: int = 5) -> float:
    """The median time of one poll of every node of an in-memory LinkState (the
    simulation engine's own), as its dispatcher does it."""
    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(),
                               ObjectStoreFactory())
    state = factory.state()
    ids = [state.create_node(NOOP_FLWR_AID, NOOP_ACCOUNT_NAME, secrets.token_bytes(32),
                             heartbeat_interval=HEARTBEAT_INTERVAL_INF) for _ in range(nodes)]
    times = []
    for _ in range(sweeps):
        start = time.perf_counter()
        for node in ids:
            state.get_message_ins(node_id=node, limit=1)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[10, 1000, 10000])
    args = parser.parse_args(argv)
    # the dispatcher waits 0.1 s after each sweep: it is busy sweep / (sweep + 0.1 s)
    print("| nodes | one sweep, no message stored (ms) | share of one core |\n"
          "|---|---|---|")
    for n in args.nodes:
        ms = 1e3 * sweep_seconds(n)
        print(f"| {n:,} | {ms:.2f} | {ms / (ms + 100):.1%} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
