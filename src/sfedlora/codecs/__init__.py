"""Message codecs: sparsification, quantisation, casting, error feedback (see
:mod:`sfedlora.codecs.codec`)."""

from sfedlora.codecs.codec import Codec, decode

__all__ = ["Codec", "decode"]
