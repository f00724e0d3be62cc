"""RoLoRA (Chen et al., NeurIPS 2025): alternate which factor trains. Odd rounds
(1, 3, ...) freeze A and train/average B; even rounds freeze B and train/average A.
It starts with B because with B = 0 the gradient of A is zero. The frozen factor is
identical on every client, so the average of products is exact, and one factor goes
up per round. The head trains and is averaged every round.
"""

from sfedlora.methods.base import Method, Part, RoundPlan, Traits


class RoLoRA(Method):
    """alternating B-rounds and A-rounds, B first"""

    traits = Traits(a_init_note="the frozen factor must be identical on every client")

    def plan(self, round_idx: int) -> RoundPlan:
        factor = Part.B if round_idx % 2 == 1 else Part.A
        parts = frozenset({factor, Part.HEAD})
        return RoundPlan(train=parts, upload=parts)
