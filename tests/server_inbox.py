"""What the ServerApp received, read two ways, and the check that none of it is private.

Flower runs in this process are intercepted where every reply arrives
(``FlowerPool._send``); a deployment's ServerApp runs in a process of its own, so there
the check reads the inbox log the ServerApp writes (``flower.inbox_log``). The
simulation tests compare the two readings, so the log a deployment test trusts is
itself checked against the raw messages.
"""

from __future__ import annotations

import json
from pathlib import Path


def intercept(monkeypatch) -> list:
    """Every message the ServerApp receives from a node, recorded as it arrives."""
    from sfedlora.runtime.flower.pool import FlowerPool

    inbox, send = [], FlowerPool._send

    def spy(self, kind, requests, timeout):
        replies = send(self, kind, requests, timeout)
        inbox.extend(replies.values())
        return replies

    monkeypatch.setattr(FlowerPool, "_send", spy)
    return inbox


def _tensor_names(data: bytes) -> list[str]:
    """The tensor names of a safetensors payload; [] if not one (JSON, text)."""
    from safetensors.torch import load

    try:
        return sorted(load(data))
    except Exception:
        return []


def contents(inbox: list) -> list[dict]:
    """Raw messages as ``{record: {key: tensor names}}`` (read with safetensors here,
    independently of :func:`sfedlora.runtime.flower.messages.describe`)."""
    return [{name: {key: _tensor_names(v) if isinstance(v, bytes) else []
                    for key, v in record.items()}
             for name, record in m.content.items()} for m in inbox]


def logged(path: Path) -> list[dict]:
    """The inbox log's lines in the same form as :func:`contents`."""
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert all("error" not in x for x in lines), [x["error"] for x in lines if "error" in x]
    return [{name: {key: sorted(v.get("tensors", {})) if isinstance(v, dict) else []
                    for key, v in record["items"].items()}
             for name, record in x["records"].items()} for x in lines]


def assert_nothing_private(received: list[dict], cfg) -> None:
    """No message the server received holds a tensor of a part the method keeps on the
    client (B and the head for FedSA/SFed, everything for local, FDLoRA's personal
    copy); under secure aggregation, no per-client training statistic either; and the
    only adapter files are the global adapter's."""
    from sfedlora.methods import get_method, part_of
    from sfedlora.privacy.secagg import messages as sm
    from sfedlora.runtime.flower import messages

    method = get_method(cfg.method)
    assert received
    seen = 0
    for message in received:
        for record in message.values():
            for key, names in record.items():
                if key == messages.LAYOUT:  # the seeded model's initial values: no data
                    continue
                seen += len(names)
                leaked = [n for n in names if n != sm.MASKED  # a masked vector
                          and (n.startswith("personal.") or part_of(n) in method.roles.private)]
                assert not leaked, (key, leaked[:3])
        if cfg.privacy.secure_aggregation and message.get(messages.METRICS):
            assert messages.SAMPLES in message[messages.REPLY]  # scores, not fits
    assert seen or not method.roles.shared  # the check read real payloads (local sends none)
    # a client's own adapter (FDLoRA's fusion with its personal copy too) is saved on
    # its node: the only adapter files the server may receive are the global adapter's
    files = [m for m in received if messages.FILE + "adapter_model.safetensors"
             in m.get(messages.REPLY, {})]
    assert len(files) <= int(method.roles.has_global_adapter), len(files)
