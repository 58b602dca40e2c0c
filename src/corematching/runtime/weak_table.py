"""Tables keyed by an object's identity, `{id(obj): (weak reference to obj, payload)}`, whose entries go with
their objects (so a new object that reuses the id never finds the old payload)."""

import weakref


def forget_when_collected(table: dict, key: int):
    """The callback for `weakref.ref(obj, callback)`: drop `table[key]` when obj is collected, unless the entry
    was replaced meanwhile (by another object with the same id)."""

    def forget(reference: weakref.ref) -> None:
        entry = table.get(key)
        if entry is not None and entry[0] is reference:
            table.pop(key, None)

    return forget
