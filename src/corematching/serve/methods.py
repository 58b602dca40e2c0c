"""The per-request sparsity setting: the `"corematching"` extension field of a chat request -> a method object.

    "corematching": {"method": "corematching", "token_budget": 0.25, "rho": 0.2}
    "corematching": {"method": "dense"}

The fields are the method dataclass's own and are validated by it, as in the Python API; a missing field takes
the method's default. Without the extension field a request runs the server's default method.
"""

from __future__ import annotations

import dataclasses

import corematching as cm

from .errors import bad_request

METHOD_CLASSES = {
    "dense": cm.Dense,
    "corematching": cm.CoreMatching,
    "random": cm.RandomTokens,
    "uniform": cm.UniformTokens,
}


def method_name(method) -> str:
    """The extension field's name of a method object ('dense', 'corematching', ...)."""
    for name, cls in METHOD_CLASSES.items():
        if type(method) is cls:
            return name
    return type(method).__name__.lower()


def method_fields(method) -> dict:
    return {field.name: getattr(method, field.name) for field in dataclasses.fields(method)}


def method_key(method) -> str:
    """Requests with equal keys run under one session and may share a batch."""
    return repr(method)


def parse_method(field, default):
    """The method a request asks for (`field` is the parsed JSON of its extension field, or None)."""
    if field is None:
        return default
    if not isinstance(field, dict):
        raise bad_request("'corematching' must be an object, e.g. {\"method\": \"corematching\", "
                          "\"token_budget\": 0.25}", param="corematching")
    fields = dict(field)
    name = fields.pop("method", None)
    if name is None:
        cls, base = type(default), method_fields(default)  # fields refine the server's default method
    elif isinstance(name, str) and name.lower() in METHOD_CLASSES:
        cls, base = METHOD_CLASSES[name.lower()], {}
    else:
        raise bad_request(f"unknown method {name!r}; known: {', '.join(METHOD_CLASSES)}", param="corematching.method")
    accepted = {field.name for field in dataclasses.fields(cls) if field.init}
    unknown = sorted(set(fields) - accepted)
    if unknown:
        takes = ", ".join(sorted(accepted)) or "no fields"
        raise bad_request(f"method {method_name_of(cls)!r} does not take {', '.join(unknown)} (it takes {takes})",
                          param=f"corematching.{unknown[0]}")
    try:
        return cls(**{**base, **fields})
    except (ValueError, TypeError) as error:
        param = next((f"corematching.{key}" for key in fields if key in str(error)), "corematching")
        raise bad_request(f"invalid 'corematching' setting: {error}", param=param) from None


def method_name_of(cls) -> str:
    return next((name for name, known in METHOD_CLASSES.items() if known is cls), cls.__name__)
