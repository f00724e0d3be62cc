"""Message codecs: sparsification, quantisation, casting, error feedback (see
:mod:`sfedlora.core.codecs.codec`)."""

from sfedlora.core.codecs.codec import Codec, decode, decode_with_presence

__all__ = ["Codec", "decode", "decode_with_presence"]
