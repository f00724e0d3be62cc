"""The client pool of a Flower ServerApp: every request is a message to a SuperNode.

The ServerApp builds no model and loads no data: the adapter's layout comes from a
node (:meth:`FlowerPool.info`), and every adapter is built, scored and saved where it
lives. Replies are put in client-id order before use, so arrival order never changes a
result. A client that does not reply within ``flower.round_timeout`` (a dead node) or
replies with an error is absent from the result (the loop records it as dropped or
unscored).

Each node keeps its client's state in its state directory under this run's key, one
file per round it trained (:mod:`sfedlora.runtime.flower.node_state`); messages carry the
round and the last checkpointed round, so a node restarted, or a run resumed from its
checkpoint, reads the state of the right round.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from sfedlora.core import wire
from sfedlora.core.adapters import AdapterLayout
from sfedlora.core.records import ClientScores, FitResult, StageRequest, Tensors
from sfedlora.runtime.flower import messages
from sfedlora.runtime.pool import AdapterRequest, PoolInfo
from sfedlora.settings import ConfigError, ExperimentConfig

log = logging.getLogger(__name__)
PULL_S = 0.5  # how often a deployment's ServerApp asks the SuperLink for replies


class FlowerPool:
    def __init__(self, cfg: ExperimentConfig, grid: Grid, any_node: bool = False):
        self.cfg, self.grid = cfg, grid
        if cfg.clients.parallel > 1:
            log.warning("clients.parallel=%d is for the in-process runtime: each Flower "
                        "node (or simulation actor) trains its clients one at a time",
                        cfg.clients.parallel)
        self.run_key = uuid.uuid4().hex[:16]  # names this run's state on the nodes
        self.round = 0  # the last round trained
        self.saved = 0  # the last round whose server state is checkpointed
        self.timeline = uuid.uuid4().hex[:16]  # this server process's timeline
        self.resumed_at = 0  # the checkpoint's round it continues from
        # any_node (the simulation engine): the virtual nodes, served in turn; else
        # (a deployment) client id -> the node that holds its data
        self.any_node = any_node
        if any_node:
            want = cfg.flower.virtual_nodes or cfg.clients.num
            self.free_nodes = self._connected(want)[:want]
        else:
            self.nodes = self._find_clients()

    # --- the node map ---------------------------------------------------------------

    def _connected(self, want: int) -> list[int]:
        """The ids of ``want`` connected nodes, once that many have connected."""
        deadline = time.monotonic() + self.cfg.flower.connect_timeout
        while len(node_ids := list(self.grid.get_node_ids())) < want:
            if time.monotonic() > deadline:
                raise ConfigError(
                    f"{len(node_ids)} of {want} SuperNodes connected within "
                    f"flower.connect_timeout={self.cfg.flower.connect_timeout}s; start one "
                    "node per client (partition-id 0..clients.num-1)")
            time.sleep(0.5)
        return sorted(node_ids)

    def _find_clients(self) -> dict[int, int]:
        """Ask every node for its client id (its partition-id: a deployment, where a
        node holds one client's data)."""
        want = self.cfg.clients.num
        node_ids = self._connected(want)
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
        common = {messages.RUN_KEY: self.run_key, messages.CHECKPOINTED: self.saved,
                  messages.TIMELINE: self.timeline, messages.RESUMED_AT: self.resumed_at}
        sent = [Message(RecordDict({messages.REQUEST: ConfigRecord({**common, **body})}),
                        dst_node_id=node, message_type=kind)
                for node, body in requests.items() if node in online]
        if not sent:
            return {}
        replies = {}
        for reply in self._send_and_receive(sent, timeout):
            self._log_inbox(reply)
            node = reply.metadata.src_node_id
            if reply.has_error():
                log.warning("node %s replied with an error: %s", node, reply.error.reason)
                continue
            replies[node] = reply
        return replies

    def _send_and_receive(self, sent: list[Message], timeout: float | None
                          ) -> list[Message]:
        """``Grid.send_and_receive``, pulling every ``PULL_S`` seconds: flwr 1.42's gRPC
        grid (the deployment engine's) waits 3 s between pulls, about 1.5 s added to
        every exchange of a round; the simulation engine's grid keeps its own interval."""
        pull_s = getattr(self.grid, "pull_interval", PULL_S)
        waiting = set(self.grid.push_messages(sent))
        end = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while waiting:
            pulled = self.grid.pull_messages(waiting)
            replies += pulled
            waiting -= {reply.metadata.reply_to_message_id for reply in pulled}
            if not waiting or (end is not None and time.monotonic() >= end):
                break
            time.sleep(pull_s)
        return replies

    def _log_inbox(self, reply: Message) -> None:
        """A line describing ``reply`` in ``flower.inbox_log`` (when set)."""
        if path := self.cfg.flower.inbox_log:
            line = {"round": self.round, **messages.describe(reply)}
            with open(path, "a", encoding="utf-8") as log_file:
                log_file.write(json.dumps(line, sort_keys=True) + "\n")

    def _trips(self, cids: list[int]) -> list[dict[int, int]]:
        """Round trips of ``{position in cids: node}``, each node at most once per trip
        (a node answers one message at a time). A deployment sends each client's
        message to its own node. The simulation engine gives a trip's k-th message to
        the k-th virtual node: every virtual node runs the same ClientApp over the same
        data and state directory, and the message names its client, so no node map
        is needed (asking 10,000 nodes for one costs O(N^2) in flwr 1.41's simulation
        engine, whose in-memory LinkState scans every stored message per node polled)."""
        trips: list[dict[int, int]] = []
        if self.any_node:
            k = len(self.free_nodes)
            for start in range(0, len(cids), k):
                trips.append({i: self.free_nodes[i - start]
                              for i in range(start, min(start + k, len(cids)))})
            return trips
        for i, cid in enumerate(cids):
            node = self.nodes[cid]
            trip = next((t for t in trips if node not in t.values()), None)
            if trip is None:
                trips.append(trip := {})
            trip[i] = node
        return trips

    def _exchange(self, kind: str, bodies: list[tuple[int, dict]], timeout: float | None
                  ) -> dict[int, Message]:
        """Send each ``(client id, body)``, the body naming its client; the replies
        without an error, keyed by position in ``bodies``."""
        out: dict[int, Message] = {}
        for trip in self._trips([cid for cid, _ in bodies]):
            replies = self._send(kind, {node: {**bodies[i][1], messages.CLIENT: bodies[i][0]}
                                        for i, node in trip.items()}, timeout)
            out |= {i: replies[node] for i, node in trip.items() if node in replies}
        return out

    def _by_client(self, kind: str, bodies: dict[int, dict], timeout: float | None
                   ) -> dict[int, Message]:
        """One message per client; the replies keyed by client id, in id order."""
        items = sorted(bodies.items())
        replies = self._exchange(kind, items, timeout)
        return {items[i][0]: r for i, r in sorted(replies.items())}

    # --- the ClientPool protocol ------------------------------------------------------

    def info(self) -> PoolInfo:
        reply = self._by_client(MessageType.QUERY, {0: {messages.WHAT: messages.LAYOUT}},
                                self.cfg.flower.connect_timeout).get(0)
        if reply is None:
            raise ConfigError("the node of client 0 did not describe the adapter; see its "
                              "log")
        layout, meta = AdapterLayout.decode(reply.content[messages.REPLY][messages.LAYOUT])
        return PoolInfo(layout, list(meta["label_names"]), str(meta["base_path"]),
                        int(meta["base_params"]))

    def fit(self, round_idx: int, downloads: dict[int, bytes],
            then: dict[int, StageRequest] | None = None) -> dict[int, FitResult]:
        self.round = round_idx
        requests = {cid: {messages.DOWNLOAD: d, messages.ROUND: round_idx,
                          **(messages.stage_fields(then[cid]) if then else {})}
                    for cid, d in downloads.items()}
        replies = self._by_client(MessageType.TRAIN, requests, self.cfg.flower.round_timeout)
        return {cid: messages.fit_result(r.content[messages.REPLY][messages.UPLOAD],
                                         dict(r.content[messages.METRICS]),
                                         dict(r.content.get(messages.REPORT, {})))
                for cid, r in replies.items()}

    def exchange(self, round_idx: int, requests: dict[int, StageRequest]
                 ) -> dict[int, bytes]:
        bodies = {cid: {messages.WHAT: messages.STAGE_EXCHANGE, messages.ROUND: round_idx,
                        **messages.stage_fields(request)}
                  for cid, request in requests.items()}
        replies = self._by_client(MessageType.QUERY, bodies, self.cfg.flower.round_timeout)
        return {cid: r.content[messages.REPLY][messages.PAYLOAD] for cid, r in replies.items()}

    def _ask(self, kind: str, requests: list[AdapterRequest], what: dict
             ) -> dict[int | None, Message]:
        """One message per request, to the node of the client it goes via; the
        replies keyed by the request's client id (None: the global adapter)."""
        bodies = [(r.via, {**what, messages.ROUND: self.round,
                           # what the client holds, as it holds it: lossless
                           messages.DOWNLOAD: wire.encode({**r.shared, **r.extras}),
                           messages.GLOBAL: r.cid is None,
                           messages.GLOBAL_PART: r.global_part})
                  for r in requests]
        replies = self._exchange(kind, bodies, self.cfg.flower.round_timeout)
        return {requests[i].cid: r for i, r in replies.items()}

    def score(self, requests: list[AdapterRequest]) -> dict[int | None, ClientScores]:
        replies = self._ask(MessageType.EVALUATE, requests, {})
        return {cid: messages.scores(r.content) for cid, r in replies.items()}

    def adapters(self, requests: list[AdapterRequest]) -> dict[int | None, Tensors | None]:
        replies = self._ask(MessageType.QUERY, requests, {messages.WHAT: messages.ADAPTER})
        return {r.cid: (wire.decode(replies[r.cid].content[messages.REPLY][messages.ADAPTER])
                        if r.cid in replies else None) for r in requests}

    def export(self, requests: list[AdapterRequest]) -> dict[int | None, dict[str, bytes]]:
        """The global adapter's files; a client's own adapter (its private parts) is
        saved on its node, and the run directory records only where (``on_node.json``)."""
        replies = self._ask(MessageType.QUERY, requests, {messages.WHAT: messages.EXPORT})
        out: dict[int | None, dict[str, bytes]] = {}
        for cid, r in replies.items():
            reply = r.content[messages.REPLY]
            if messages.LOCATION in reply:
                out[cid] = {messages.ON_NODE: json.dumps(
                    {"client": cid, "node": int(r.metadata.src_node_id),
                     "path": str(reply[messages.LOCATION])}, indent=1).encode()}
            else:
                out[cid] = {k[len(messages.FILE):]: v for k, v in reply.items()
                            if k.startswith(messages.FILE)}
        return out

    def checkpointed(self, round_idx: int) -> None:
        self.saved = round_idx

    def state_dict(self) -> dict[str, Any]:
        return {"run_key": self.run_key, "round": self.round}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.run_key = state["run_key"]
        self.round = self.saved = self.resumed_at = int(state["round"])
