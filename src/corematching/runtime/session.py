"""`sparsify(model, method)`: attach a method to a model for a while, and detach it without a trace."""

import weakref

from torch import nn

from ..methods import SparsityMethod
from ..models import adapter_for
from .engine import Engine
from .records import SparsityRecord

# Entry modules currently under a session, so that two sessions never stack on one model.
_ACTIVE: "weakref.WeakKeyDictionary[nn.Module, Session]" = weakref.WeakKeyDictionary()


class _FFNForward:
    """Stands in for an FFN module's forward (as an instance attribute) while a session is active."""

    def __init__(self, engine: Engine, layer: int, parts):
        self.engine, self.layer, self.parts = engine, layer, parts

    def __call__(self, hidden, *args, **kwargs):
        return self.engine.ffn_forward(self.layer, self.parts, hidden)


class Session:
    """A method attached to a model. Use as a context manager, or call remove() when done.

    `last` is the record of the latest prefill (None before the first one).
    """

    def __init__(self, model: nn.Module, method: SparsityMethod):
        if not isinstance(method, SparsityMethod):
            raise TypeError(f"method must be a corematching method (e.g. cm.CoreMatching()), got {method!r}")
        adapter = adapter_for(model)
        method.check_layers(adapter.num_layers)
        if adapter.entry_module in _ACTIVE:
            raise RuntimeError("this model is already inside a corematching session; remove that one first")
        self.model = model
        self.method = method
        self.adapter = adapter
        self.engine = Engine(adapter, method)
        self._handles = []
        self._replaced_forwards = []  # (module, previous instance forward or None)
        try:
            self._install()
        except BaseException:
            self.remove()
            raise
        _ACTIVE[adapter.entry_module] = self

    @property
    def last(self) -> SparsityRecord | None:
        return self.engine.last

    @property
    def active(self) -> bool:
        return self.engine is not None and _ACTIVE.get(self.adapter.entry_module) is self

    def _install(self) -> None:
        engine, adapter = self.engine, self.adapter

        def on_entry(module, args, kwargs):
            engine.on_entry(args, kwargs)

        def on_entry_done(module, args, output):
            engine.on_entry_done()

        entry = adapter.entry_module
        self._handles.append(entry.register_forward_pre_hook(on_entry, with_kwargs=True))
        self._handles.append(entry.register_forward_hook(on_entry_done))
        if not engine.changes_model:
            return

        def on_language_model(module, args, kwargs):
            engine.on_language_model(args, kwargs)

        self._handles.append(adapter.language_model.register_forward_pre_hook(on_language_model, with_kwargs=True))
        for layer in engine.upper_layers:

            def on_layer(module, args, kwargs, layer=layer):
                return engine.on_layer(layer, args, kwargs)

            self._handles.append(adapter.decoder_layers[layer].register_forward_pre_hook(on_layer, with_kwargs=True))
        for layer in sorted(engine.watched_layers):
            parts = adapter.ffn(layer)
            module = parts.module
            self._replaced_forwards.append((module, module.__dict__.get("forward")))
            module.forward = _FFNForward(engine, layer, parts)

    def remove(self) -> None:
        """Detach: hooks removed, FFN forwards restored, decisions and sliced weights dropped. Idempotent."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for module, previous in reversed(self._replaced_forwards):
            if previous is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = previous
        self._replaced_forwards.clear()
        self.engine.reset()
        if _ACTIVE.get(self.adapter.entry_module) is self:
            del _ACTIVE[self.adapter.entry_module]

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc_info) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return f"Session({self.method!r}, {self.adapter.family}, {state})"


def sparsify(model: nn.Module, method: SparsityMethod) -> Session:
    """Attach `method` to `model` (a transformers VLM). Returns a Session; the model is restored exactly when
    the session is removed (leaving its `with` block, even on an exception, or calling `remove()`)."""
    return Session(model, method)
