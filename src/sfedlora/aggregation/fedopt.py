"""Server optimizers (FedOpt, Reddi et al., ICLR 2021): the mean client change,
taken relative to what the clients received, is the gradient of one optimizer step on
the server's dense state. FLASC uses AdamW this way; SGD with lr 1 is plain averaging.

The step is torch's own optimizer on parameters that mirror the server state, so its
moments are exactly torch's and checkpoint as a plain ``state_dict``.
"""

from __future__ import annotations

import torch

from sfedlora.core.adapters import TensorSpec
from sfedlora.settings import ServerConfig

Tensors = dict[str, torch.Tensor]


class ServerOptimizer:
    def __init__(self, kind: str, cfg: ServerConfig, spec: dict[str, TensorSpec],
                 names: list[str]):
        self.params = {n: torch.nn.Parameter(torch.zeros(spec[n].shape, dtype=spec[n].dtype))
                       for n in names}
        params = list(self.params.values())
        if kind == "adamw":
            self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas,
                                               weight_decay=cfg.weight_decay)
        elif kind == "sgd":
            self.optimizer = torch.optim.SGD(params, lr=cfg.lr)
        else:
            raise ValueError(f"unknown server optimizer {kind!r}")

    def step(self, state: Tensors, sent: Tensors, combined: Tensors) -> Tensors:
        """New server state: for each combined tensor, one step on
        ``sent - combined`` (the mean change, sign as a gradient). A tensor the
        clients did not receive (drawn by each client itself) is taken as combined."""
        new = dict(state)
        with torch.no_grad():
            for name, p in self.params.items():
                p.grad = None
                if name in state:
                    p.copy_(state[name])
            stepped = []
            for name, value in combined.items():
                if name in sent and name in self.params and name in state:
                    self.params[name].grad = (sent[name] - value).to(self.params[name].dtype)
                    stepped.append(name)
                else:
                    new[name] = value
        self.optimizer.step()
        for name in stepped:
            new[name] = self.params[name].detach().clone()
            self.params[name].grad = None
        return new

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)
