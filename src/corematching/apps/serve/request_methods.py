"""The methods and settings an untrusted caller may ask for: an allow-list of typed scalar settings.

    {"method": "corematching", "token_budget": 0.25, "rho": 0.2}     CoreMatching, two settings given
    {"token_budget": 8}                                               the server's default method, refined
    {"method": "dense"}

Per method, a request may set only the settings listed in `REQUEST_SETTINGS`, each a JSON scalar (or, for layer
lists, a short list of ints) of a known type and range. Nothing a request gives is ever used as a path, a module
or a class name: a method is chosen from this table by name, and fields outside it (`neuron_budgets`, which the
method would read as a file path, or any field a user's method class takes) are refused by name before their
values are looked at, so the answer is the same whatever a value points to. Values then go through the method
class's own checks (`method_spec.construct`), so a bad value gets the same message as on the command line.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from numbers import Integral
from typing import Callable

from ... import neuron_rules
from ...methods import CoreMatching, Dense, RandomTokens, UniformTokens
from ...methods.defaults import MATCH_SETS
from ..method_spec import MethodSpecError, construct

MAX_LAYER_INDEX = 4095  # far beyond any supported model; the model's own depth is checked when serving
MAX_LAYER_LIST = 256
MAX_TOKEN_COUNT = 2**31 - 1
MAX_SEED = 2**63 - 1  # what torch.Generator.manual_seed takes


@dataclass(frozen=True)
class Setting:
    """One setting a request may give: its name and the check of the JSON value (raises ValueError)."""

    name: str
    check: Callable[[object], None]
    describe: str  # the type and range, as clients are told (GET /v1/models)


def is_int(value) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def int_in(low: int, high: int, describe: str) -> Callable[[object], None]:
    def check(value):
        if not is_int(value) or not low <= value <= high:
            raise ValueError(f"must be {describe}")
    return check


def ratio(value) -> None:
    if not is_number(value) or not 0 < value <= 1:
        raise ValueError("must be a number in (0, 1]")


def budget(adaptive: bool):
    def check(value):
        if value is None and adaptive:
            return
        if is_int(value) and 1 <= value <= MAX_TOKEN_COUNT:
            return
        if isinstance(value, float) and 0 < value <= 1:
            return
        raise ValueError("must be an int count >= 1, a fraction in (0, 1]" + (" or null (adaptive)" * adaptive))
    return check


def one_of(choices: tuple[str, ...]):
    def check(value):
        if not isinstance(value, str) or value not in choices:
            raise ValueError(f"must be one of {', '.join(repr(choice) for choice in choices)}")
    return check


def layer_list(value) -> None:
    if value is None:
        return
    if (not isinstance(value, list) or len(value) > MAX_LAYER_LIST
            or not all(is_int(layer) and 0 <= layer <= MAX_LAYER_INDEX for layer in value)):
        raise ValueError(f"must be null or a list of at most {MAX_LAYER_LIST} layer indices (ints >= 0)")


LAYER = "an int >= 0 (a layer of the model)"
PRUNE_LAYER = Setting("prune_layer", int_in(0, MAX_LAYER_INDEX, LAYER), LAYER)
TOKEN_BUDGET = Setting("token_budget", budget(adaptive=False), "an int >= 1 or a fraction in (0, 1]")

REQUEST_SETTINGS: dict[str, tuple[type, tuple[Setting, ...]]] = {
    "dense": (Dense, ()),
    "corematching": (CoreMatching, (
        PRUNE_LAYER,
        Setting("token_budget", budget(adaptive=True), "an int >= 1, a fraction in (0, 1] or null (adaptive)"),
        Setting("rho", ratio, "a number in (0, 1]"),
        Setting("beta", ratio, "a number in (0, 1]"),
        Setting("neuron_layers", layer_list, f"null or a list of at most {MAX_LAYER_LIST} layer indices"),
        Setting("match", one_of(MATCH_SETS), " / ".join(MATCH_SETS)),
        Setting("min_tokens", int_in(1, MAX_TOKEN_COUNT, "an int >= 1"), "an int >= 1"),
        Setting("neuron_rule", one_of(neuron_rules.RULES), " / ".join(neuron_rules.RULES)),
    )),
    "random": (RandomTokens, (TOKEN_BUDGET, PRUNE_LAYER,
                              Setting("seed", int_in(0, MAX_SEED, "an int in [0, 2**63 - 1]"), "an int >= 0"))),
    "uniform": (UniformTokens, (TOKEN_BUDGET, PRUNE_LAYER)),
}


def documented() -> dict:
    """{method name: {setting: its type and range}}: what a request may ask for (shown by GET /v1/models)."""
    return {name: {setting.name: setting.describe for setting in settings}
            for name, (_, settings) in REQUEST_SETTINGS.items()}


def request_name(method) -> str:
    """The name a request uses for a method object ('dense', 'corematching', ...; others: the class name)."""
    for name, (cls, _) in REQUEST_SETTINGS.items():
        if type(method) is cls:
            return name
    return type(method).__name__.lower()


def settings_of(cls: type) -> tuple[Setting, ...] | None:
    """The settings a request may give to a method of class `cls` (None: the class is not on the list)."""
    for known, settings in REQUEST_SETTINGS.values():
        if known is cls:
            return settings
    return None


def method_fields(method) -> dict:
    """A method's fields (its dataclass fields; {} for other classes)."""
    if not dataclasses.is_dataclass(method):
        return {}
    return {field.name: getattr(method, field.name) for field in dataclasses.fields(method) if field.init}


def build_from_request(request, default):
    """The method a request's settings ask for (`request`: parsed JSON, or None for the default method).

    Raises MethodSpecError whose `field` names the bad setting ("method" for the name)."""
    if request is None:
        return default
    if not isinstance(request, dict):
        raise MethodSpecError("must be an object, e.g. {\"method\": \"corematching\", \"token_budget\": 0.25}")
    given = dict(request)
    name = given.pop("method", None)
    if name is None:  # the settings refine the server's default method
        cls, base, label = type(default), method_fields(default), request_name(default)
    elif isinstance(name, str) and name.lower() in REQUEST_SETTINGS:
        label = name.lower()
        cls, base = REQUEST_SETTINGS[label][0], {}
    else:
        raise MethodSpecError(f"unknown method; a request may ask for {', '.join(REQUEST_SETTINGS)}", field="method")
    allowed = {setting.name: setting for setting in settings_of(cls) or ()}
    # Names first, values never looked at: the answer to a forbidden field does not depend on its value.
    refused = sorted(field for field in given if field not in allowed)
    if refused:
        takes = ", ".join(allowed) or "no settings"
        shown = shorten(refused[0])
        raise MethodSpecError(f"method {label!r} does not take {shown} in a request (a request may set: {takes})",
                              field=shown)
    for field, value in given.items():
        try:
            allowed[field].check(value)
        except ValueError as error:
            raise MethodSpecError(f"{field} {error}, got {shorten(repr(value))}", field=field) from None
    return construct(cls, {**base, **given})


def shorten(text: str, limit: int = 64) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_for_model(method, num_layers: int) -> None:
    """Raise MethodSpecError when the method's layers do not exist in a model of num_layers layers."""
    try:
        method.check_layers(num_layers)
    except ValueError as error:
        from ..method_spec import field_named_in

        raise MethodSpecError(str(error), field=field_named_in(str(error), method_fields(method)) or "prune_layer") \
            from None
