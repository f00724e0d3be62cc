"""FFA-LoRA: A is frozen at a random init identical on every client (a shared seed,
so it never travels); only B and the head train, go up and are averaged. With A the
same everywhere, mean(B_i) A = mean(B_i A): aggregation is exact, at half FedIT's
traffic.
"""

from sfedlora.methods.base import Method, Part, Roles, Traits


class FFA(Method):
    """A frozen (shared seed); B and head averaged"""

    roles = Roles(shared=frozenset({Part.B, Part.HEAD}), fixed=frozenset({Part.A}))
    traits = Traits(a_init_note="A is frozen at one init shared by every client")
