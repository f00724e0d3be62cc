"""Local training: the no-federation reference every federated paper reports.

Every part (A, B, head) is private: each client trains its own adapter on its own data
only, round after round, and nothing is sent either way (0 bytes). Evaluated exactly as
the federated methods are, so the gap to them is what federation buys. By default each
client draws its own A (``a_init: independent``), as a client alone would.
"""

from sfedlora.methods.base import ALL_PARTS, Method, Roles, Traits


class Local(Method):
    """reference: each client trains alone on its own data; nothing is sent"""

    roles = Roles(shared=frozenset(), private=ALL_PARTS)
    traits = Traits(
        secure_aggregation_refusal="sends nothing", a_init_modes=("independent", "shared"),
        a_init_note="nothing is averaged, so clients may start from their own A or one A")

    def check_config(self, cfg) -> None:
        refused = [(cfg.privacy.enabled, "privacy.enabled", "nothing is released to noise"),
                   (cfg.server_optimizer != "none", "server.optimizer",
                    "the server holds nothing to step")]
        self.refuse(refused)
