"""Secure aggregation (Bonawitz et al., CCS 2017), one round, without a transport.

Built from Flower's secure-aggregation building blocks (``flwr.common.
secure_aggregation``: Shamir sharing, ECDH key agreement with HKDF, Fernet
authenticated encryption) and ``cryptography``'s key generation; nothing
cryptographic is written here. Flower's own ``SecAggPlusWorkflow`` needs the legacy
Strategy API and ``LegacyContext``; our round runs on the Message API (and in-process),
so the protocol's four exchanges are driven by :mod:`sfedlora.privacy.secagg.round`.

The exchanges, for the clients U0 sampled in a round and a threshold t:

1. **advertise**: each client draws two key pairs (c: encryption, s: masking) and sends
   the public keys. U1 = clients that answered.
2. **share**: each client draws a self-mask seed b, splits b and its s private key into
   |U1| Shamir shares with threshold t, and sends each peer its shares encrypted under
   their shared c key. The server only routes ciphertexts. U2 = clients that answered.
3. **mask**: each client sends ``y = x + PRG(b) + sum_v +-PRG(s_uv)`` over the peers v of
   U2 (+ if its id is smaller, - otherwise) mod 2^32, where x is its quantised,
   pre-weighted upload (:mod:`.field`). U3 = clients that answered.
4. **unmask**: each client of U3 decrypts what its peers sent it and reveals, per peer,
   the share of b for a survivor (U3) or the share of the s key for a client that
   dropped after sharing (U2 minus U3), never both. With t shares of each, the server
   removes every b mask and the dropped clients' pairwise masks: what is left is the
   sum of U3's uploads, and nothing about any single one.

Secrets come from the OS (``os.urandom`` and ``cryptography``'s key generation), never
from the config seed. Each round uses fresh keys.

Against a server that lies, clients refuse to help it (:class:`ProtocolViolation`):
they answer the unmask request of a round at most once (so never reveal both kinds of
share of one peer), only for a survivor list of at least t clients of U2 that includes
themselves, and refuse a key list in which two clients share a public key. With t a
strict majority (:func:`sfedlora.privacy.secagg.server_stage.threshold`), two groups shown different
survivor lists cannot both reach t, since no client answers twice. What this does not
stop (no PKI here): a server that invents clients (a Sybil attack) or swaps keys in
transit; the threat model is in docs/reliability.md.
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass, field

import numpy as np
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import (
    decrypt,
    encrypt,
    generate_shared_key,
)

import sfedlora.privacy.secagg.field as fieldmath

CURVE = ec.SECP384R1()


class RoundAborted(RuntimeError):
    """Fewer clients than the threshold remain at some exchange: the round is skipped."""


class ProtocolViolation(ValueError):
    """A request an honest server never sends; the client refuses to answer it."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"))


def _public_bytes(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


def _private_bytes(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _load_private(data: bytes) -> ec.EllipticCurvePrivateKey:
    return serialization.load_der_private_key(data, password=None)


def _load_public(data: bytes) -> ec.EllipticCurvePublicKey:
    return serialization.load_der_public_key(data)


def _share_plaintext(src: int, dst: int, b_share: bytes, sk_share: bytes) -> bytes:
    return b"".join([src.to_bytes(8, "little"), dst.to_bytes(8, "little"),
                     len(b_share).to_bytes(4, "little"), b_share, sk_share])


def _split_plaintext(data: bytes) -> tuple[int, int, bytes, bytes]:
    src, dst = int.from_bytes(data[:8], "little"), int.from_bytes(data[8:16], "little")
    size = int.from_bytes(data[16:20], "little")
    return src, dst, data[20:20 + size], data[20 + size:]


def pair_sign(own: int, peer: int) -> int:
    """+1 if ``own`` adds the pairwise mask with ``peer``, -1 if it subtracts it."""
    return 1 if own < peer else -1


@dataclass(frozen=True)
class RoundParams:
    """Public settings of one secure round, sent to every client with each exchange."""

    round_idx: int
    threshold: int
    step: float
    value_range: float
    weight_step: float = 1.0  # 1: integer weights, summed exactly

    def to_json(self) -> dict:
        return {"round": self.round_idx, "threshold": self.threshold, "step": self.step,
                "range": self.value_range, "weight_step": self.weight_step}

    @classmethod
    def from_json(cls, data: dict) -> RoundParams:
        return cls(int(data["round"]), int(data["threshold"]), float(data["step"]),
                   float(data["range"]), float(data["weight_step"]))


@dataclass
class ClientSession:
    """One client's side of one round. Its state is JSON-able (:meth:`state_dict`), so a
    Flower node keeps it in its state directory between exchanges."""

    cid: int
    c_key: bytes = b""  # private keys, PKCS8 DER
    s_key: bytes = b""
    b_seed: bytes = b""
    peers: list[int] = field(default_factory=list)  # U1, in share order
    own_shares: tuple[bytes, bytes] = (b"", b"")
    received: dict[int, str] = field(default_factory=dict)  # peer -> ciphertext for us
    masked_with: list[int] = field(default_factory=list)  # U2
    public_keys: dict[int, dict] = field(default_factory=dict)  # U1's, as broadcast
    threshold: int = 0  # t of this round, from its public parameters
    answered: bool = False  # the unmask request was answered: never again

    def advertise(self) -> dict:
        c, s = ec.generate_private_key(CURVE), ec.generate_private_key(CURVE)
        self.c_key, self.s_key = _private_bytes(c), _private_bytes(s)
        return {"c_pk": _b64(_public_bytes(c)), "s_pk": _b64(_public_bytes(s))}

    def share(self, params: RoundParams, public_keys: dict[int, dict]) -> dict[int, str]:
        """Shares of b and of the s key for every peer of U1, encrypted for it."""
        self.public_keys = {int(k): v for k, v in public_keys.items()}
        self.peers = sorted(self.public_keys)
        self.threshold = params.threshold
        if self.cid not in self.peers or len(self.peers) < params.threshold:
            raise RoundAborted(f"client {self.cid}: {len(self.peers)} peers < threshold "
                               f"{params.threshold}")
        for kind in ("c_pk", "s_pk"):
            keys = [self.public_keys[p][kind] for p in self.peers]
            if len(set(keys)) != len(keys):
                raise ProtocolViolation(f"client {self.cid}: two clients of the key list "
                                        f"share a public {kind} key")
        self.b_seed = os.urandom(32)
        b_shares = create_shares(self.b_seed, params.threshold, len(self.peers))
        sk_shares = create_shares(self.s_key, params.threshold, len(self.peers))
        c_key = _load_private(self.c_key)
        out = {}
        for peer, b_share, sk_share in zip(self.peers, b_shares, sk_shares, strict=True):
            if peer == self.cid:
                self.own_shares = (b_share, sk_share)
                continue
            key = generate_shared_key(c_key,
                                      _load_public(_unb64(self.public_keys[peer]["c_pk"])))
            # a Fernet token is URL-safe base64 text already
            out[peer] = encrypt(key, _share_plaintext(self.cid, peer, b_share,
                                                      sk_share)).decode("ascii")
        return out

    def mask(self, params: RoundParams, vector: np.ndarray, received: dict[int, str],
             masked_with: list[int]) -> np.ndarray:
        """``vector`` (uint32, from :func:`~sfedlora.privacy.secagg.field.quantize`) plus the
        self mask and the pairwise masks with every other client of U2."""
        self.received = {int(k): v for k, v in received.items()}
        self.masked_with = sorted(masked_with)
        s_key = _load_private(self.s_key)
        total = vector.astype(np.uint32) + fieldmath.mask(self.b_seed, vector.size)
        for peer in self.masked_with:
            if peer == self.cid:
                continue
            seed = generate_shared_key(s_key, _load_public(_unb64(self.public_keys[peer]["s_pk"])))
            pair = fieldmath.mask(seed, vector.size)
            total = total + pair if pair_sign(self.cid, peer) > 0 else total - pair
        return total

    def unmask(self, survivors: list[int]) -> dict[str, dict[int, str]]:
        """Per peer of U2 (and itself): the b share of a survivor or the s-key share
        of a client that dropped after sharing."""
        alive = set(survivors)
        if self.answered:
            raise ProtocolViolation(f"client {self.cid}: the unmask request of this round "
                                    "was answered already")
        if not alive <= set(self.masked_with) or self.cid not in alive:
            raise ProtocolViolation(f"client {self.cid}: survivors {sorted(alive)} are not "
                                    f"clients it masked with ({self.masked_with}) or omit it")
        if len(alive) < self.threshold:
            raise ProtocolViolation(f"client {self.cid}: {len(alive)} survivors < threshold "
                                    f"{self.threshold}")
        self.answered = True
        c_key = _load_private(self.c_key)
        reveal: dict[str, dict[int, str]] = {"b": {}, "sk": {}}
        for peer in self.masked_with:
            if peer == self.cid:
                b_share, sk_share = self.own_shares
            else:
                key = generate_shared_key(c_key,
                                          _load_public(_unb64(self.public_keys[peer]["c_pk"])))
                src, dst, b_share, sk_share = _split_plaintext(
                    decrypt(key, self.received[peer].encode("ascii")))
                if (src, dst) != (peer, self.cid):
                    raise ValueError(f"client {self.cid}: a share from {peer} names {src}->{dst}")
            if peer in alive:
                reveal["b"][peer] = _b64(b_share)
            else:
                reveal["sk"][peer] = _b64(sk_share)
        return reveal

    def state_dict(self) -> dict:
        return {"cid": self.cid, "c_key": _b64(self.c_key), "s_key": _b64(self.s_key),
                "b_seed": _b64(self.b_seed), "peers": self.peers,
                "own_shares": [_b64(s) for s in self.own_shares],
                "public_keys": {str(k): v for k, v in self.public_keys.items()},
                "received": {str(k): v for k, v in self.received.items()},
                "masked_with": self.masked_with, "threshold": self.threshold,
                "answered": self.answered}

    @classmethod
    def from_state(cls, state: dict) -> ClientSession:
        return cls(int(state["cid"]), _unb64(state["c_key"]), _unb64(state["s_key"]),
                   _unb64(state["b_seed"]), list(state["peers"]),
                   tuple(_unb64(s) for s in state["own_shares"]),
                   {int(k): v for k, v in state["received"].items()},
                   list(state["masked_with"]),
                   {int(k): v for k, v in state["public_keys"].items()},
                   int(state.get("threshold", 0)), bool(state.get("answered", False)))


class ServerSession:
    """The server's side of one round: it routes keys and ciphertexts, sums masked
    vectors, and removes the masks from the sum. It never holds a client's upload."""

    def __init__(self, params: RoundParams, sampled: list[int]):
        self.params, self.sampled = params, sorted(sampled)
        self.public_keys: dict[int, dict] = {}
        self.u2: list[int] = []
        self.total: np.ndarray | None = None
        self.u3: list[int] = []

    def _enough(self, stage: str, clients) -> None:
        if len(clients) < self.params.threshold:
            raise RoundAborted(f"{stage}: {len(clients)} clients answered, fewer than the "
                               f"reconstruction threshold {self.params.threshold}")

    def keys(self, replies: dict[int, dict]) -> dict[int, dict]:
        """Public keys of U1, broadcast to each of them."""
        self.public_keys = {c: replies[c] for c in sorted(replies) if c in self.sampled}
        self._enough("advertise", self.public_keys)
        return self.public_keys

    def route(self, replies: dict[int, dict[int, str]]) -> dict[int, dict[int, str]]:
        """Each client of U2 gets the ciphertexts addressed to it by the others of U2."""
        self.u2 = sorted(c for c in replies if c in self.public_keys)
        self._enough("share", self.u2)
        return {dst: {src: replies[src][dst] for src in self.u2
                      if src != dst and dst in replies[src]} for dst in self.u2}

    def collect(self, replies: dict[int, np.ndarray]) -> list[int]:
        """Sum the masked vectors of U3 (mod 2^32); returns U3."""
        self.u3 = sorted(c for c in replies if c in self.u2)
        self._enough("mask", self.u3)
        sizes = {replies[c].size for c in self.u3}
        if len(sizes) != 1:
            raise RoundAborted(f"masked vectors of different sizes {sorted(sizes)}")
        total = np.zeros(sizes.pop(), dtype=np.uint32)
        for c in self.u3:
            total += replies[c].astype(np.uint32)
        self.total = total
        return self.u3

    def unmask(self, replies: dict[int, dict[str, dict]]) -> np.ndarray:
        """The signed integer sum of U3's quantised uploads (last entry: their weights)."""
        self._enough("unmask", [c for c in replies if c in self.u3])
        total = self.total.copy()
        dropped = [c for c in self.u2 if c not in self.u3]
        for peer in self.u3:  # survivors: remove their self masks
            seed = self._reconstruct(replies, "b", peer)
            total -= fieldmath.mask(seed, total.size)
        for peer in dropped:  # dropped after sharing: remove what survivors added for them
            s_key = _load_private(self._reconstruct(replies, "sk", peer))
            for alive in self.u3:
                seed = generate_shared_key(
                    s_key, _load_public(_unb64(self.public_keys[alive]["s_pk"])))
                pair = fieldmath.mask(seed, total.size)
                total = total - pair if pair_sign(alive, peer) > 0 else total + pair
        return fieldmath.signed(total)

    def _reconstruct(self, replies, kind: str, peer: int) -> bytes:
        shares = [_unb64(r[kind][peer]) for c, r in sorted(replies.items())
                  if c in self.u3 and peer in r.get(kind, {})]
        if len(shares) < self.params.threshold:
            raise RoundAborted(f"{len(shares)} shares of client {peer}'s {kind} < threshold "
                               f"{self.params.threshold}")
        return combine_shares(shares[: self.params.threshold])
