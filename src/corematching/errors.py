"""Errors raised by corematching."""


class UnsupportedModelError(TypeError):
    """The model is not one that corematching knows how to sparsify; the message names what is missing."""


class UnsupportedModeError(RuntimeError):
    """A way of calling the model that a session cannot run exactly (a generation mode, cache kind or input);
    the message names it."""
