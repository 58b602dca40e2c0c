"""Methods by name: "name:field=value,..." -> a method object. The one place that builds a method from a name.

    dense                                        cm.Dense()
    corematching:token_budget=0.25,beta=0.4      cm.CoreMatching(token_budget=0.25, beta=0.4)
    random:token_budget=8,seed=1                 cm.RandomTokens(token_budget=8, seed=1)
    mypackage.methods:MyMethod:token_budget=16   a user's own method class (a cm.SparsityMethod subclass)

A name is any public method class of `corematching` (every `cm.<Class>` that subclasses `SparsityMethod`),
written in lower case, with or without a "Tokens" suffix (`randomtokens` and `random` are the same); new
methods become available here as soon as they are exported from the package. Values are Python literals
(`8`, `0.25`, `None`, `[3, 4]`); anything else is taken as a string (`match=text`).

Every entry point builds its method here: the command line (`--method` and the per-field options of
`add_method_arguments`), `corematching bench`, the lmms-eval model, and the server, whose requests go through
the allow-list of `corematching.apps.serve.request_methods` first. A bad value gets one message wherever it comes from
(`MethodSpecError`, a ValueError naming the field). Specs are trusted input (they may import a user's module);
requests never are.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import inspect

CLI_METHOD_NAMES = ("dense", "corematching", "random", "uniform")  # the names the command line's help lists


class MethodSpecError(ValueError):
    """A method name, field or value that cannot be used; `field` names it ("method" for the name itself)."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


def method_classes() -> dict[str, type]:
    """{name: class} of every public method class of corematching (names in lower case, plus short aliases)."""
    import corematching as cm
    from corematching.methods import SparsityMethod

    names = {}
    for public in getattr(cm, "__all__", dir(cm)):
        cls = getattr(cm, public, None)
        if isinstance(cls, type) and issubclass(cls, SparsityMethod) and cls is not SparsityMethod:
            names[public.lower()] = cls
    for name, cls in list(names.items()):
        if name.endswith("tokens") and name != "tokens":
            names.setdefault(name[: -len("tokens")], cls)
    return names


def split_fields(text: str) -> list[str]:
    """Split "a=1,b=[1, 2],c=x" at the commas outside brackets and quotes."""
    parts, depth, quote, current = [], 0, None, []
    for char in text:
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append("".join(current))
            current = []
            continue
        current.append(char)
    if quote or depth:
        raise MethodSpecError(f"unbalanced brackets or quotes in method fields {text!r}")
    parts.append("".join(current))
    return [part.strip() for part in parts if part.strip()]


def parse_value(text: str):
    """A Python literal when it is one (8, 0.25, None, [1, 2], True), else the text itself."""
    lowered = text.lower()
    if lowered in ("none", "null"):
        return None
    if lowered in ("true", "false"):
        return lowered == "true"
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_fields(text: str) -> dict:
    fields = {}
    for part in split_fields(text):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or not name.isidentifier():
            raise MethodSpecError(f"method field must be name=value, got {part!r}")
        if name in fields:
            raise MethodSpecError(f"method field {name!r} is given twice", field=name)
        fields[name] = parse_value(value.strip())
    return fields


def resolve_class(name: str) -> type:
    """The method class for a registered name, or for "package.module:Class"."""
    from corematching.methods import SparsityMethod

    if ":" in name:
        module_name, _, class_name = name.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            raise MethodSpecError(f"cannot import method module {module_name!r}: {error}", field="method") from None
        cls = getattr(module, class_name, None)
        if cls is None:
            raise MethodSpecError(f"module {module_name!r} has no {class_name!r}", field="method")
        if not (isinstance(cls, type) and issubclass(cls, SparsityMethod)):
            raise MethodSpecError(f"{name} is not a corematching method (a subclass of cm.SparsityMethod)",
                                  field="method")
        return cls
    classes = method_classes()
    cls = classes.get(name.lower())
    if cls is None:
        raise MethodSpecError(f"unknown method {name!r}; known: {', '.join(sorted(classes))}, or package.module:Class",
                              field="method")
    return cls


def split_spec(spec: str) -> tuple[str, str]:
    """"name:fields" or "package.module:Class:fields" -> (class name or path, fields text)."""
    spec = spec.strip()
    if not spec:
        raise MethodSpecError("method spec is empty", field="method")
    head, sep, rest = spec.partition(":")
    if not sep:
        return head, ""
    if head.lower() in method_classes() or "=" in rest.partition(":")[0] or not rest:
        return head, rest  # name:fields
    class_name, _, fields = rest.partition(":")
    return f"{head}:{class_name}", fields


def build(spec: str, **overrides):
    """The method object a spec names. `overrides` are fields set unless the spec sets them itself."""
    target, fields_text = split_spec(spec)
    cls = resolve_class(target)
    return construct(cls, {**overrides, **parse_fields(fields_text)})


def construct(cls: type, fields: dict):
    """cls(**fields), or a MethodSpecError naming the first field it does not take or the field whose value it
    refuses (the class's own message: the same whichever entry point the value came from)."""
    check_fields(cls, fields)
    try:
        return cls(**fields)
    except (ValueError, TypeError) as error:
        raise MethodSpecError(str(error), field=field_named_in(str(error), fields)) from None


def field_named_in(message: str, fields: dict) -> str | None:
    """The given field a method's error message is about (messages start with or name the field)."""
    for name in sorted(fields, key=len, reverse=True):  # "neuron_layers" before "layers"
        if name in message:
            return name
    return None


def init_fields(cls: type) -> set[str] | None:
    """The names a method class takes at construction (None: any, its __init__ takes **kwargs)."""
    if dataclasses.is_dataclass(cls):
        return {field.name for field in dataclasses.fields(cls) if field.init}
    parameters = list(inspect.signature(cls).parameters.values())
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def check_fields(cls: type, fields: dict) -> None:
    known = init_fields(cls)
    if known is None:
        return
    unknown = sorted(set(fields) - known)
    if unknown:
        accepted = ", ".join(sorted(known)) or "no fields"
        raise MethodSpecError(f"{cls.__name__} does not take {', '.join(unknown)} (it takes {accepted})",
                              field=unknown[0])


def has_field(cls: type, name: str) -> bool:
    return name in (init_fields(cls) or ())


# ----------------------------------------------------------------------------- command-line options


def parse_budget(text: str):
    """'64' -> 64 tokens, '0.25' -> a quarter, 'adaptive' -> None (elbow rule)."""
    if text.lower() in ("adaptive", "none", "auto"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    raise MethodSpecError(f"budget must be an int, a fraction or 'adaptive', got {text!r}", field="token_budget")


def parse_layers(text: str):
    """'3,4' -> [3, 4]; 'none' or 'default' -> None (the method's default); '' -> [] (no layer)."""
    if text.lower() in ("none", "default"):
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise MethodSpecError(f"layers must be comma-separated ints, got {text!r}", field="neuron_layers") from None


def argument_type(parse):
    """An argparse `type` that reports a parser's own message."""
    def convert(text: str):
        try:
            return parse(text)
        except MethodSpecError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    convert.__name__ = parse.__name__
    return convert


# option -> the method field it sets (options not given are left out, so each method keeps its own defaults)
OPTION_FIELDS = {"budget": "token_budget", "prune_layer": "prune_layer", "rho": "rho", "beta": "beta",
                 "match": "match", "neuron_layers": "neuron_layers", "seed": "seed"}


def add_model_arguments(parser: argparse.ArgumentParser, default_model: str | None = "evqa-smollm2") -> None:
    """--model and --device, as every command that loads a model takes them."""
    shown = "" if default_model is None else f" (default: {default_model})"
    parser.add_argument("--model", default=default_model,
                        help=f"evqa-smollm2, scenes-smollm2, a hub id or a local path{shown}")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")


def add_method_arguments(parser: argparse.ArgumentParser, default_method: str) -> None:
    group = parser.add_argument_group("method")
    group.add_argument("--method", default=default_method,
                       help=f"{', '.join(CLI_METHOD_NAMES)}, any method spec (name:field=value,...; see "
                            "corematching.apps.method_spec) or package.module:Class")
    group.add_argument("--budget", type=argument_type(parse_budget), default=argparse.SUPPRESS,
                       help="visual tokens kept per image: count, fraction, or 'adaptive'")
    group.add_argument("--prune-layer", type=int, default=argparse.SUPPRESS)
    group.add_argument("--rho", type=float, default=argparse.SUPPRESS)
    group.add_argument("--beta", type=float, default=argparse.SUPPRESS)
    group.add_argument("--match", default=argparse.SUPPRESS, help="match set: all, text or last")
    group.add_argument("--neuron-layers", type=argument_type(parse_layers), default=argparse.SUPPRESS,
                       help="comma-separated layers decoding with core neurons ('' for none)")
    group.add_argument("--seed", type=int, default=argparse.SUPPRESS, help="seed of --method random")


def from_args(args: argparse.Namespace):
    """The method --method names, with the fields given by the per-field options (a spec's own fields win)."""
    overrides = {field: getattr(args, option) for option, field in OPTION_FIELDS.items() if hasattr(args, option)}
    return build(args.method, **overrides)


# ----------------------------------------------------------------------------- lists and labels


def expand(specs: str, budgets: list | None = None) -> list[str]:
    """';'-separated specs, each method with a token_budget field and none given repeated at every budget."""
    out = []
    for spec in (part.strip() for part in specs.split(";")):
        if not spec:
            continue
        target, fields_text = split_spec(spec)
        cls = resolve_class(target)
        fields = parse_fields(fields_text)
        if budgets and has_field(cls, "token_budget") and "token_budget" not in fields:
            base = f"{spec}," if fields_text.strip() else f"{target}:"
            out.extend(f"{base}token_budget={budget!r}" for budget in budgets)
        else:
            out.append(spec)
    if not out:
        raise MethodSpecError("no methods given", field="method")
    return out


def describe(method, kept_share: float | None = None) -> str:
    """A short label: the class name and its token budget ('CoreMatching 25%', 'RandomTokens 8'); for a method
    without a token_budget field, the share of visual tokens it was measured to keep ('VisionZip 25%'), or its
    first field when it keeps them all ('TEAL sparsity=0.5')."""
    name = type(method).__name__
    budget = getattr(method, "token_budget", "absent")
    if budget == "absent":
        if kept_share is not None and kept_share < 1:
            return f"{name} {100 * kept_share:.3g}%"
        names = sorted(init_fields(type(method)) or ()) if not dataclasses.is_dataclass(method) else [
            field.name for field in dataclasses.fields(method)]
        return f"{name} {names[0]}={getattr(method, names[0], '?')}" if names else name
    if budget is None:
        return f"{name} adaptive"
    if isinstance(budget, float):
        return f"{name} {100 * budget:g}%"
    return f"{name} {budget}"
