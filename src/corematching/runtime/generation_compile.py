"""What a session tells about generate()'s own compilation, which it switches off (a sparsified forward changes
its shapes with the tokens it keeps, so it runs eagerly)."""

import logging

log = logging.getLogger("corematching")

# cache implementations generate() compiles the forward for (transformers' static ones, current and deprecated)
COMPILED_CACHES = ("static", "offloaded_static", "sliding_window", "hybrid", "hybrid_chunked", "offloaded_hybrid",
                   "offloaded_hybrid_chunked")

_noted: set[str] = set()  # the models (by class) already told about, so that the line is logged once


def note_generation_compile_off(model, generation_config) -> None:
    """Log once per model class, at warning level, when the model's generation config asks generate() to compile
    (a compile_config, or a static cache implementation) and the session is about to switch that off."""
    if generation_config is None or getattr(generation_config, "disable_compile", False):
        return
    compile_config = getattr(generation_config, "compile_config", None)
    cache = getattr(generation_config, "cache_implementation", None)
    if compile_config is None and cache not in COMPILED_CACHES:
        return
    name = type(model).__name__
    if name in _noted:
        return
    _noted.add(name)
    asked = "compile_config" if compile_config is not None else f"cache_implementation={cache!r}"
    log.warning(
        "corematching: generate() would compile %s's forward (its generation config sets %s); a sparsified "
        "forward runs uncompiled, so the session sets generation_config.disable_compile=True until it ends",
        name,
        asked,
    )
