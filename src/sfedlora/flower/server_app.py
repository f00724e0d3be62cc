"""The ServerApp: the in-process round loop with clients reached by Flower messages.

:class:`FlowerSimulation` is :class:`~sfedlora.simulation.Simulation` with its two
client-facing methods sent over the Grid; sampling, the server's checks and
aggregation, metrics and the run directory are the simulator's own, so a Flower run
and an in-process run of one config give the same numbers. Replies are put in
client-id order before aggregation, so arrival order never changes a result. A client
that does not reply within ``flower.round_timeout`` (a dead node) or replies with an
error is recorded in the round's ``dropped`` list; the round aggregates the rest when
at least ``clients.min_clients`` replied.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from sfedlora import wire
from sfedlora.config import ConfigError, ExperimentConfig
from sfedlora.evaluation import Scores
from sfedlora.flower import messages
from sfedlora.flower.config import experiment_config
from sfedlora.simulation import Simulation
from sfedlora.worker import FitResult

log = logging.getLogger(__name__)


class FlowerSimulation(Simulation):
    """The round loop of :class:`Simulation`; each client is a SuperNode."""

    # Client state lives on the nodes (and their disks), not in this process, so a
    # server-side checkpoint could not restore it: Flower runs do not checkpoint.
    checkpoints = False

    def __init__(self, cfg: ExperimentConfig, grid: Grid):
        refuse_unsupported(cfg)
        super().__init__(cfg)
        self.grid = grid
        self.nodes = self._find_clients()  # client id -> node id

    # --- the node map ---------------------------------------------------------------

    def _find_clients(self) -> dict[int, int]:
        """Wait for ``clients.num`` nodes, ask each for its client id."""
        want, deadline = self.cfg.clients.num, time.monotonic() + self.cfg.flower.connect_timeout
        while len(node_ids := list(self.grid.get_node_ids())) < want:
            if time.monotonic() > deadline:
                raise ConfigError(
                    f"{len(node_ids)} of clients.num={want} SuperNodes connected within "
                    f"flower.connect_timeout={self.cfg.flower.connect_timeout}s; start one "
                    "node per client (partition-id 0..clients.num-1)")
            time.sleep(0.5)
        replies = self._send(MessageType.QUERY, {n: {messages.WHAT: messages.DESCRIBE}
                                                 for n in node_ids},
                             self.cfg.flower.connect_timeout)
        nodes: dict[int, int] = {}
        for node, reply in replies.items():
            cid = int(reply.content[messages.REPLY][messages.CLIENT])
            if cid in nodes:
                raise ConfigError(f"nodes {nodes[cid]} and {node} both say partition-id={cid}; "
                                  "give every node its own partition-id")
            nodes[cid] = node
        missing = sorted(set(range(want)) - set(nodes))
        if missing:
            raise ConfigError(f"no node answered for client ids {missing}; start one node per "
                              "partition-id 0..clients.num-1")
        log.info("Flower: %d clients on nodes %s", want, nodes)
        return nodes

    def _send(self, kind: str, requests: dict[int, dict], timeout: float | None
              ) -> dict[int, Message]:
        """One message per online node (keyed by node id); the replies without an
        error, keyed by node id. Errors are logged; late or missing replies are simply
        absent. A node the SuperLink already knows is offline is not waited for."""
        online = set(self.grid.get_node_ids())
        if offline := sorted(set(requests) - online):
            log.warning("nodes %s are offline; not sending them %s messages", offline, kind)
        sent = [Message(RecordDict({messages.REQUEST: ConfigRecord(body)}),
                        dst_node_id=node, message_type=kind)
                for node, body in requests.items() if node in online]
        if not sent:
            return {}
        replies = {}
        for reply in self.grid.send_and_receive(sent, timeout=timeout):
            node = reply.metadata.src_node_id
            if reply.has_error():
                log.warning("node %s replied with an error: %s", node, reply.error.reason)
                continue
            replies[node] = reply
        return replies

    def _by_client(self, replies: dict[int, Message]) -> dict[int, Message]:
        return {cid: replies[node] for cid, node in sorted(self.nodes.items())
                if node in replies}

    # --- the two client-facing methods of Simulation -------------------------------

    def fit_clients(self, round_idx: int, downloads: dict[int, bytes]) -> dict[int, FitResult]:
        requests = {self.nodes[cid]: {messages.DOWNLOAD: d, messages.ROUND: round_idx}
                    for cid, d in downloads.items()}
        replies = self._by_client(self._send(MessageType.TRAIN, requests,
                                             self.cfg.flower.round_timeout))
        return {cid: messages.fit_result(r.content[messages.REPLY][messages.UPLOAD],
                                         dict(r.content[messages.METRICS]))
                for cid, r in replies.items()}

    def _eval_download(self, cid: int) -> bytes:
        """What client ``cid`` scores with: the shared state as it would receive it now,
        encoded as a download (evaluation messages are not counted as traffic)."""
        return self.server.down.encode(self.server.received_state(cid))

    def score_clients(self) -> dict[int, tuple[Scores, list[float] | None]]:
        requests = {self.nodes[cid]: {messages.DOWNLOAD: self._eval_download(cid)}
                    for cid in range(self.cfg.clients.num)}
        replies = self._by_client(self._send(MessageType.EVALUATE, requests,
                                             self.cfg.flower.round_timeout))
        return {cid: messages.scores(dict(r.content[messages.METRICS]))
                for cid, r in replies.items()}

    def client_adapter(self, cid: int):
        return self.client_adapters([cid])[cid]

    def client_adapters(self, cids: Sequence[int]) -> dict[int, dict | None]:
        requests = {self.nodes[cid]: {messages.WHAT: messages.ADAPTER,
                                      messages.DOWNLOAD: self._eval_download(cid)}
                    for cid in cids}
        replies = self._by_client(self._send(MessageType.QUERY, requests,
                                             self.cfg.flower.round_timeout))
        adapters = {}
        for cid in cids:
            if cid in replies:
                adapters[cid] = wire.decode(
                    replies[cid].content[messages.REPLY][messages.ADAPTER])
            else:
                log.warning("client %d's node did not return its adapter", cid)
                adapters[cid] = None
        return adapters


def refuse_unsupported(cfg: ExperimentConfig) -> None:
    """What the Flower runtime does not run yet, with the reason."""
    if cfg.task != "classification":
        raise ConfigError("task=causal-lm runs in the in-process simulator only for now "
                          "(its evaluation generates text on the clients); use sfedlora run")
    if cfg.method == "flora":
        raise ConfigError("method=flora merges into every node's base weights, which the "
                          "Flower runtime does not keep per node yet; use sfedlora run")


def main(grid: Grid, context: Context, defaults: dict) -> None:
    cfg = experiment_config({**defaults, **context.run_config})
    summary = FlowerSimulation(cfg, grid).run()
    log.info("Flower run finished in %s: %s", cfg.output_dir, {
        k: summary.get(k) for k in ("personalized_accuracy", "global_accuracy")})


def make_app(defaults: dict | None = None) -> ServerApp:
    """A ServerApp; ``defaults`` is run config that the run's own run config overrides."""
    defaults = dict(defaults or {})
    server = ServerApp()
    server.main()(lambda grid, context: main(grid, context, defaults))
    return server


app = make_app()  # what `flwr run` and the SuperLink load (pyproject [tool.flwr.app])
