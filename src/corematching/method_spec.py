"""Methods by name: "name:field=value,..." -> a method object.

    dense                                        cm.Dense()
    corematching:token_budget=0.25,beta=0.4      cm.CoreMatching(token_budget=0.25, beta=0.4)
    random:token_budget=8,seed=1                 cm.RandomTokens(token_budget=8, seed=1)
    mypackage.methods:MyMethod:token_budget=16   a user's own method class (a cm.SparsityMethod subclass)

A name is any public method class of `corematching` (every `cm.<Class>` that subclasses `SparsityMethod`),
written in lower case, with or without a "Tokens" suffix (`randomtokens` and `random` are the same); new
methods become available here as soon as they are exported from the package. Values are Python literals
(`8`, `0.25`, `None`, `[3, 4]`); anything else is taken as a string (`match=text`).
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect


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
        raise ValueError(f"unbalanced brackets or quotes in method fields {text!r}")
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
            raise ValueError(f"method field must be name=value, got {part!r}")
        if name in fields:
            raise ValueError(f"method field {name!r} is given twice")
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
            raise ValueError(f"cannot import method module {module_name!r}: {error}") from None
        cls = getattr(module, class_name, None)
        if cls is None:
            raise ValueError(f"module {module_name!r} has no {class_name!r}")
        if not (isinstance(cls, type) and issubclass(cls, SparsityMethod)):
            raise ValueError(f"{name} is not a corematching method (a subclass of cm.SparsityMethod)")
        return cls
    classes = method_classes()
    cls = classes.get(name.lower())
    if cls is None:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(sorted(classes))}, or package.module:Class")
    return cls


def split_spec(spec: str) -> tuple[str, str]:
    """"name:fields" or "package.module:Class:fields" -> (class name or path, fields text)."""
    spec = spec.strip()
    if not spec:
        raise ValueError("method spec is empty")
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
    fields = {**overrides, **parse_fields(fields_text)}
    check_fields(cls, fields)
    return cls(**fields)


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
        raise ValueError(f"{cls.__name__} does not take {', '.join(unknown)} (it takes {accepted})")


def has_field(cls: type, name: str) -> bool:
    return name in (init_fields(cls) or ())


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
        raise ValueError("no methods given")
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
