"""Message codecs: sparsification, quantisation, casting, error feedback (see
:mod:`sfedlora.codecs.codec`)."""

from sfedlora.codecs.codec import Codec, decode, decode_with_presence

__all__ = ["Codec", "decode", "decode_with_presence"]
