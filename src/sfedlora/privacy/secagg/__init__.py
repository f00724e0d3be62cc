"""Secure aggregation: the server learns only the sum of the clients' uploads.

:mod:`.field` holds the arithmetic (quantisation, sums mod 2^32, ChaCha20 masks),
:mod:`.protocol` the four exchanges of one round on either side, without a transport.
"""

from sfedlora.privacy.secagg.protocol import ClientSession, RoundAborted, RoundParams, ServerSession

__all__ = ["ClientSession", "RoundAborted", "RoundParams", "ServerSession"]
