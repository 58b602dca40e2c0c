"""The per-request sparsity setting: the `"corematching"` extension field of a chat request -> a method object.

    "corematching": {"method": "corematching", "token_budget": 0.25, "rho": 0.2}
    "corematching": {"method": "dense"}

A request may set only the typed settings of `corematching.apps.serve.request_methods` (an allow-list per method); a
missing setting takes the method's default, and without `method` the settings refine the server's default
method. Without the extension field a request runs the server's default method. A bad setting is a 400 naming it
(`"param": "corematching.rho"`); nothing a request gives is used as a path, module or class.
"""

from __future__ import annotations

from ..method_spec import MethodSpecError
from .errors import bad_request
from .request_methods import build_from_request, check_for_model, method_fields, request_name


def method_name(method) -> str:
    """The extension field's name of a method object ('dense', 'corematching', ...)."""
    return request_name(method)


def method_settings(method) -> dict:
    """A method's fields as JSON values (what a response reports; anything else is shown as its repr)."""
    return {name: json_value(value) for name, value in method_fields(method).items()}


def json_value(value):
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [json_value(item) for item in value]
    return repr(value)


def method_key(method) -> str:
    """Requests with equal keys run under one session and may share a batch."""
    return repr(method)


def parse_method(field, default, num_layers: int | None = None):
    """The method a request asks for (`field` is the parsed JSON of its extension field, or None), checked against
    a model of num_layers layers when given."""
    try:
        method = build_from_request(field, default)
        if num_layers is not None and method is not default:
            check_for_model(method, num_layers)
    except MethodSpecError as error:
        param = f"corematching.{error.field}" if error.field else "corematching"
        raise bad_request(f"invalid 'corematching' setting: {error}", param=param) from None
    return method
