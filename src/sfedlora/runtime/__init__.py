"""Layer 8, runtimes: what executes a method on a task. The worker (local training),
the experiment a process builds, client pools (in-process and Flower), the server's
round, the plain upload stage, evaluation, the round loop (:class:`~.simulation.Simulation`),
run directories and tracking, and the Flower apps and deployment (``flower/``).
Runtimes never branch on a method or a task.

May import: every layer below (``core`` to ``config``).
"""
