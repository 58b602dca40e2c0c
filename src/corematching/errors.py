"""Errors raised by corematching."""


class UnsupportedModelError(TypeError):
    """The model is not one that corematching knows how to sparsify; the message names what is missing."""
