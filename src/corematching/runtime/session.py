"""`sparsify(model, method)`: attach a method to a model for a while, and detach it without a trace."""

import functools
import threading
import weakref
from contextlib import contextmanager

import torch
from torch import nn

from ..errors import UnsupportedModeError, UnsupportedModelError
from ..methods import SparsityMethod
from ..models import adapter_for
from .cache_state import SessionToken, state_of
from .engine import Engine
from .ffn import check_sliceable
from .generation_compile import note_generation_compile_off
from .neuron_order import check_untied
from .records import SparsityRecord

NEURON_WEIGHTS = ("copy", "in_place")  # how core-neuron decoding gets its weights (see sparsify)

# Entry modules currently under a session, so that two sessions never stack on one model.
_ACTIVE: "weakref.WeakKeyDictionary[nn.Module, Session]" = weakref.WeakKeyDictionary()
_ACTIVE_LOCK = threading.Lock()


class _FFNForward:
    """Stands in for an FFN module's forward (as an instance attribute) while a session is active."""

    def __init__(self, engine: Engine, layer: int, parts):
        self.engine, self.layer, self.parts = engine, layer, parts

    def __call__(self, hidden, *args, **kwargs):
        return self.engine.ffn_forward(self.layer, self.parts, hidden)


class Session:
    """A method attached to a model. Use as a context manager, or call remove() when done.

    `last` is the record of the calling thread's latest prefill (None before the first one).
    """

    def __init__(self, model: nn.Module, method: SparsityMethod, neuron_weights: str = "copy"):
        if not isinstance(method, SparsityMethod):
            raise TypeError(f"method must be a corematching method (e.g. cm.CoreMatching()), got {method!r}")
        if neuron_weights not in NEURON_WEIGHTS:
            raise ValueError(
                f"neuron_weights must be one of {', '.join(map(repr, NEURON_WEIGHTS))}, got {neuron_weights!r}"
            )
        _check_not_compiled(model)
        adapter = adapter_for(model)
        method.check_layers(adapter.num_layers)
        adapter.check_prune_layer(method.prune_layer_index())
        with _ACTIVE_LOCK:  # two threads sparsifying one model: one of them is refused
            if adapter.entry_module in _ACTIVE:
                raise RuntimeError("this model is already inside a corematching session; remove that one first")
            self._attach(model, method, adapter, neuron_weights)
            _ACTIVE[adapter.entry_module] = self

    def _attach(self, model: nn.Module, method: SparsityMethod, adapter, neuron_weights: str) -> None:
        self.model = model
        self.method = method
        self.adapter = adapter
        self._lock = threading.RLock()  # one model call at a time (see sparsify: shared use)
        self._thread = threading.local()  # per thread: calls it is inside, the record of its latest prefill
        self.token = SessionToken(f"{type(method).__name__} on {type(model).__name__}")
        self.engine = Engine(adapter, method, self.token, neuron_weights)
        for layer in self.engine.neuron_layers:
            check_sliceable(adapter.ffn(layer), layer)
        if neuron_weights == "in_place":
            every_ffn = {layer: adapter.ffn(layer).module for layer in range(adapter.num_layers)}
            check_untied(model, {layer: adapter.ffn(layer) for layer in self.engine.neuron_layers}, every_ffn)
        self._handles = []
        self._replaced = []  # (object, attribute name, its previous instance value or _ABSENT), restored on remove
        try:
            self._install()
        except BaseException:
            self.remove()
            raise

    @property
    def last(self) -> SparsityRecord | None:
        """The record of the calling thread's latest prefill (a thread that has not called the model under the
        session: the session's latest)."""
        own = self._thread
        if getattr(own, "depth", 0) or not hasattr(own, "last"):
            return self.engine.last
        return own.last

    @property
    def held_bytes(self) -> int:
        """Bytes the session holds beside the model's weights now for core-neuron decoding: the sliced FFNs of the
        conversations whose KV caches (or copies) are alive, and, in place, swap indices of reordered layers (see
        sparsify). 0 when no such conversation is alive and no layer is reordered."""
        return self.engine.sliced_bytes()

    def held_bytes_of(self, cache) -> int:
        """Bytes beside the model's weights that `cache` (or any copy of it) keeps alive: the sliced FFNs of the
        decision it carries, built at its first decode step (counted before that too). A store of caches (a prefix
        cache) adds them to the bytes of the caches it keeps."""
        state = state_of(cache)
        if state is None or state.owner is not self.token:
            return 0
        return self.engine.decision_bytes(state.decision)

    @property
    def needs_calibration(self) -> bool:
        """Whether the method has input-dependent state that `calibrate` sets (TEAL) and refuses to decode
        without."""
        return self.method.needs_calibration()

    @property
    def active(self) -> bool:
        return self.engine is not None and _ACTIVE.get(self.adapter.entry_module) is self

    def _install(self) -> None:
        engine, adapter = self.engine, self.adapter
        entry, top = adapter.entry_module, adapter.top_module()
        self._replace(entry, "forward", self._entry_forward(entry.forward))
        if top is not entry:
            self._replace(top, "forward", self._serialized(top.forward))
        for owner, name, wrapper in engine.model_replacements():  # conversation state, inputs between layers
            self._replace(owner, name, self._serialized(wrapper))  # generate() calls some outside any forward
        if not engine.changes_model:
            return
        self._handles.append(adapter.top_module().register_forward_pre_hook(_refuse_labels, with_kwargs=True))
        self._disable_generation_compile()
        self._keep_generation_masks_2d()
        if hasattr(self.model, "_get_candidate_generator"):  # assisted decoding: its prompt, for the engine
            self._replace(self.model, "_get_candidate_generator", engine.assisted.watch(
                self.model._get_candidate_generator))
        for layer in engine.upper_layers:

            def on_layer(module, args, kwargs, layer=layer):
                return engine.on_layer(layer, args, kwargs)

            self._handles.append(adapter.decoder_layers[layer].register_forward_pre_hook(on_layer, with_kwargs=True))
        for module, hook, after in engine.inputs.hooks():  # what the method asked for, caught on the way
            register = module.register_forward_hook if after else module.register_forward_pre_hook
            self._handles.append(register(hook, with_kwargs=True))
        layer_of_module = {}
        for layer in sorted(engine.watched_layers):
            parts = adapter.ffn(layer)
            module = parts.module
            if id(module) in layer_of_module:
                raise UnsupportedModelError(
                    f"decoder layers {layer_of_module[id(module)]} and {layer} share one FFN module: the session "
                    "computes each layer's FFN with that layer's own core neurons; untie the layers' FFN modules"
                )
            layer_of_module[id(module)] = layer
            self._replace(module, "forward", _FFNForward(engine, layer, parts))
        for owner, name, wrapper in engine.inputs.replacements():  # methods the inputs are read from, wrapped
            self._replace(owner, name, wrapper)

    @contextmanager
    def _one_call_at_a_time(self):
        """Hold the session's lock for a model call (re-entered by the calls nested in it); remember the record of
        a prefill it made as the calling thread's latest."""
        own = self._thread
        with self._lock:
            own.depth = getattr(own, "depth", 0) + 1
            before = self.engine.last
            try:
                yield
            finally:
                own.depth -= 1
                if self.engine.last is not before:
                    own.last = self.engine.last

    def _serialized(self, forward):
        """A forward that runs under the session's lock (same signature, for generate()'s inspection)."""

        @functools.wraps(forward)
        def serialized(*args, **kwargs):
            with self._one_call_at_a_time():
                return forward(*args, **kwargs)

        return serialized

    def _entry_forward(self, forward):
        """The entry module's forward under the session: the engine classifies the call before it and records its
        decisions in the cache after it, all under the lock. A forward that raises leaves no call behind (hooks
        would not run on an exception; this does)."""
        engine = self.engine

        @functools.wraps(forward)
        def entry_forward(*args, **kwargs):
            with self._one_call_at_a_time():
                if not self.token.active:  # removed while this call waited for the lock: the plain model's call
                    return forward(*args, **kwargs)
                try:
                    engine.on_entry(args, kwargs)
                    output = forward(*args, **kwargs)
                    engine.on_entry_done(output)
                finally:
                    engine.call = None
                return output

        return entry_forward

    def calibrate(self, **inputs) -> None:
        """Set the method's input-dependent state from one prefill of `inputs` (the model's keyword arguments:
        input_ids, attention_mask, pixel_values, ...; a few representative prompts as one batch). TEAL's per-layer
        thresholds come from the real tokens each of its layers sees in that prefill (after token pruning, for a
        composed method) and stay with the method instance, for this model, until it is calibrated again. Nothing
        else sets them: a method that needs calibration refuses to decode without it. Runs under the session's
        lock, so calls from other threads see the state before or after, never half of it."""
        if not self.active:
            raise RuntimeError("this session has been removed; calibrate inside an active session")
        if not self.needs_calibration:
            raise ValueError(f"{type(self.method).__name__} has no input-dependent state to calibrate")
        if inputs.get("past_key_values") is not None or inputs.get("cache") is not None:
            raise ValueError("calibrate runs a fresh prefill: pass the prompts without a KV cache")
        with self._lock, torch.no_grad():
            self.engine.calibrating = True
            try:
                self.model(**{**inputs, "use_cache": False})
            finally:
                self.engine.calibrating = False

    def _replace(self, owner, name: str, value) -> None:
        """Set an instance attribute for the session's lifetime (remove() puts back what was there)."""
        self._replaced.append((owner, name, owner.__dict__.get(name, _ABSENT)))
        setattr(owner, name, value)

    def remove(self) -> None:
        """Detach: hooks removed, replaced attributes (FFN forwards, generation settings, wrapped methods)
        restored, FFN neurons back in their order, decisions and sliced weights dropped. Idempotent. Waits for a
        call in progress in another thread to finish."""
        with self._lock:
            self._remove()

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for owner, name, previous in reversed(self._replaced):
            if previous is _ABSENT:
                owner.__dict__.pop(name, None)
            else:
                setattr(owner, name, previous)
        self._replaced.clear()
        self.token.active = False  # caches it filled refuse to be continued from now on
        self.engine.reset()
        if _ACTIVE.get(self.adapter.entry_module) is self:
            del _ACTIVE[self.adapter.entry_module]

    def _disable_generation_compile(self) -> None:
        """generate() compiles the forward on GPUs when the cache is static; a sparsified forward must run eagerly."""
        config = getattr(self.model, "generation_config", None)
        if config is not None and hasattr(config, "disable_compile"):
            note_generation_compile_off(self.model, config)
            self._replace(config, "disable_compile", True)

    def _keep_generation_masks_2d(self) -> None:
        """generate() builds the 4-D masks of a static cache itself, each layer type's from the cache of its first
        layer; when that layer holds only the kept tokens, the mask is over cache slots, not positions. The
        session has generate() pass the 2-D padding mask instead, and the model builds its masks as for any other
        cache (the layers after the prune layer get theirs from the session)."""
        self._replace(self.model, "create_masks_for_generate", _padding_mask_as_is)

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc_info) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return f"Session({self.method!r}, {self.adapter.family}, {state})"


_ABSENT = object()  # an attribute the instance did not have before the session


def _padding_mask_as_is(*, attention_mask=None, **_):
    return attention_mask


def _refuse_labels(module, args, kwargs):
    if kwargs.get("labels") is not None:
        raise UnsupportedModeError(
            "labels= under a session: a sparsified forward returns logits for the kept tokens only "
            "(session.last.kept_positions), so the model's own loss would pair them with the wrong labels; "
            "compute the loss from those logits, or run the forward outside the session"
        )


def _check_not_compiled(model: nn.Module) -> None:
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        raise UnsupportedModelError(
            "a torch.compile'd model: sparsify the original module (model._orig_mod) and run it uncompiled; "
            "the kept tokens change the shapes from call to call"
        )


def sparsify(model: nn.Module, method: SparsityMethod, neuron_weights: str = "copy") -> Session:
    """Attach `method` to `model` (a transformers VLM). Returns a Session; the model is restored exactly when
    the session is removed (leaving its `with` block, even on an exception, or calling `remove()`).

    Under the session every call of the model is one of:
      - a call without past tokens (a plain forward, a prefill, likelihood scoring): the method chooses the kept
        tokens and core neurons from this call's inputs (a fresh prefill, whatever came before). The returned
        logits cover the kept tokens only: position s of `logits` belongs to token
        `session.last.kept_positions[b][s]` (right-aligned when samples keep different numbers);
      - a call that continues a KV cache filled under this session (decoding, a new turn, beam search, assisted
        decoding, a deep copy of the cache): it continues exactly from that cache's own decisions;
      - anything else (no image): the model runs unchanged.
    `labels=` is refused (the loss would be paired with the wrong tokens), as are torch.compile and custom
    4-D masks; a cache filled under the session refuses to be continued after the session is removed.

    `neuron_weights` says where core-neuron decoding (a method with neuron layers) gets the core neurons' weights:
      - "copy" (default): a gathered copy per layer of the union of the batch's core neurons, made at the first
        decode step of a prompt and kept beside the model's weights while the prompt's KV cache lives (see
        "Memory" below);
      - "in_place": no copy. Each layer's FFN neurons are reordered in place (rows of gate/up and their biases,
        columns of down, which leaves the FFN's function unchanged) so that the core neurons come first, and
        decoding uses views of those first rows and columns. What stays resident beside the model is two index
        vectors per layer (and a batch's row masks, as with "copy"). The reordering costs a swap at the first
        decode step of each prompt: the m core neurons outside the first |U| positions trade places with m
        others, through two transient m-row temporaries of one matrix at a time. It is undone before any other
        use of the layer's FFN (a prefill, a pass-through call, another conversation's decode step: conversations
        decoded in alternation swap at every step) and when the session is removed, which gives back the
        original tensors bit for bit. While the session is active, the FFN parameters of the neuron layers may
        be in that other order: do not read or save them from inside it. Tied FFN weights (a tensor shared with
        another layer or module) are refused for "in_place" (cm.UnsupportedModeError): use "copy".

    Memory. Beside the model's weights a session holds, at most:
      - per conversation whose KV cache (or a copy of it: beam search, a prefix cache) is alive and has decoded at
        least one step with core neurons: for each neuron layer, with "copy", the gathered rows of gate/up and
        columns of down of the union U of its batch's core neurons (|U| <= the FFN width: at most one FFN per
        layer per such conversation) and, for a batch, a [batch, |U|] bool row mask; with "in_place", only the
        row masks and two swap index vectors (together at most the FFN width) per layer. They are freed when the
        last cache or copy that uses them is dropped, whichever thread drops it; `session.held_bytes` reports them;
      - FFN weights offloaded by accelerate: the slices of the latest decision only (an earlier conversation that
        continues reads its slices from the store again);
      - with "in_place", for each layer still in the reordered order, its two swap index vectors (at most one
        arrangement per layer), until the layer's next use or the session's end;
      - the record of the latest prefill per calling thread (`session.last`: masks over the prompt and the core
        neuron indices), and a method's calibrated state (TEAL: two floats per layer, on the method instance).
    A call's own activations and masks are transient: they go when the call returns (or raises).

    Shared use. A session serializes the model's calls: each call of the model (its forward, the language model's
    entry when called directly, and the methods generate() calls before its first forward to read a continued
    conversation's positions) runs under a per-session lock, so several threads (a web app's workers)
    may call `generate` on the model at once and each gets exactly what its call gets alone; a forward that
    raises releases the lock. Conversations interleave between calls as they do in one thread, each continuing
    from its own cache. What a vision tower run outside a call passes on (generate() encodes images first) is kept
    per thread. `session.last` is the calling thread's latest record. `remove()` waits for a call in progress.
    Calls run one at a time, not in parallel: batch requests to use the hardware (the server does).

    Calibration. A method with input-dependent state (TEAL's magnitude thresholds) gets it only from
    `session.calibrate(**inputs)`, one prefill of representative prompts, and refuses to decode before it.
    """
    return Session(model, method, neuron_weights)
