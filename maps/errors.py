"""Errors a user can fix: the CLI prints them as one line, without a traceback."""
import re


class MapsError(Exception):
    """Base of every error caused by user input (a file, key or value at fault)."""


class ConfigError(MapsError):
    """A config file, key or value is invalid."""


class DatasetError(MapsError):
    """A dataset is missing or malformed; the message names the file and what was expected."""


class MemoryBankError(MapsError):
    """A memory bank is missing, truncated, inconsistent or built with another encoder."""


# ---------------------------------------------------------------------------------------------
# pydantic validation errors as one line naming the file and the key
# ---------------------------------------------------------------------------------------------
#: what a value must be, by pydantic's error type (the schema's own validators say the rest)
_MUST_BE = {"int_type": "int", "int_parsing": "int", "int_from_float": "int", "float_type": "a number",
            "float_parsing": "a number", "string_type": "text", "bool_type": "true or false",
            "bool_parsing": "true or false", "dict_type": "a mapping", "list_type": "a list",
            "tuple_type": "a list", "model_type": "a mapping", "dataclass_type": "a mapping"}
_BOUNDS = {"greater_than_equal": (">=", "ge"), "greater_than": (">", "gt"),
           "less_than_equal": ("<=", "le"), "less_than": ("<", "lt")}
_PREDICATES = ("must ", "may ", "is ")


def schema_error_message(error, where, model=None, prefix: str = "") -> str:
    """The first problem of a pydantic ``ValidationError`` as ``"<where>: key 'a.b': <what>"``.

    pydantic's ``loc`` names the key; an unknown key gets the keys allowed at its level (read
    from ``model``, the validated class) and the closest one; a missing key gets the field's
    description. Unknown and missing keys are reported before wrong values, as a reader fixes
    the shape of a file first. ``prefix`` goes before key names (``profile.`` for ``--set``).
    A schema's own validators raise ``ValueError`` with the whole phrase ("must be ...",
    "expected ...", or, at the model level, "key 'x': ..."); a model-level message without a
    key is about the object ``prefix`` names (``space.KEY.`` for one searched key of a sweep).
    """
    errors = error.errors(include_url=False)
    rank = {"extra_forbidden": 0, "missing": 1}
    err = sorted(errors, key=lambda e: rank.get(e["type"], 2))[0]
    loc = _plain_loc(err["loc"])
    kind = err["type"]
    if kind == "extra_forbidden":
        parent, key = loc[:-1], str(loc[-1])
        allowed = sorted(_fields_at(model, parent))
        import difflib

        hint = difflib.get_close_matches(key, allowed, n=1)
        at = f"key '{prefix}{_dotted(parent)}': " if parent else ""
        name = key if parent else prefix + key
        more = f" (did you mean '{'' if parent else prefix}{hint[0]}'?)" if hint else ""
        listed = f"; allowed: {', '.join(allowed)}" if allowed else ""
        return f"{where}: {at}unknown key '{name}'{more}{listed}"
    if kind == "missing":
        field = _fields_at(model, loc[:-1]).get(str(loc[-1])) if loc else None
        why = f" ({field.description})" if field is not None and field.description else ""
        parent = f"key '{prefix}{_dotted(loc[:-1])}': " if len(loc) > 1 else ""
        name = str(loc[-1]) if len(loc) > 1 else prefix + str(loc[-1])
        return f"{where}: {parent}missing key '{name}'{why}"
    what = _what(err)
    sep = " " if what.startswith(_PREDICATES) else ": "
    if not loc:  # a check across keys: its message names them ("key 'x' is ... but y is ...")
        if what.startswith("key '"):
            return f"{where}: " + what.replace("key '", f"key '{prefix}")
        return f"{where}: key '{prefix.rstrip('.')}'{sep}{what}" if prefix else f"{where}: {what}"
    return f"{where}: key '{prefix}{_dotted(loc)}'{sep}{what}"


def _what(err) -> str:
    kind, ctx, got = err["type"], err.get("ctx") or {}, err.get("input")
    if kind in ("value_error", "assertion_error") and "error" in ctx:
        return str(ctx["error"])
    if kind in _MUST_BE:
        return f"must be {_MUST_BE[kind]}, got {got!r}"
    if kind in _BOUNDS:
        op, name = _BOUNDS[kind]
        return f"must be {op} {ctx[name]}, got {got!r}"
    if kind in ("too_short", "string_too_short") and ctx.get("min_length") == 1:
        return f"must not be empty, got {got!r}"
    if kind == "literal_error":
        return f"{got!r} is not one of {ctx.get('expected')}"
    msg = str(err.get("msg", kind))
    return f"{msg[:1].lower()}{msg[1:]}, got {got!r}"


def _plain_loc(loc) -> tuple:
    """``loc`` without pydantic's markers: a bad dict key (``'[key]'``) is reported at its dict."""
    loc = tuple(loc)
    if "[key]" in loc:
        loc = loc[: max(loc.index("[key]") - 1, 0)]
    return loc


def _dotted(loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (("." if out else "") + str(part))
    return out


def _fields_at(model, loc) -> dict:
    """The fields (name -> FieldInfo) of the model reached by following ``loc`` from ``model``;
    list indices and dict keys stay on the element model. Empty when unknown."""
    for part in loc:
        if model is None:
            return {}
        fields = getattr(model, "model_fields", {})
        if isinstance(part, str) and part in fields:
            model = _inner_model(fields[part].annotation)
    return dict(getattr(model, "model_fields", {})) if model is not None else {}


def _inner_model(annotation):
    import typing

    if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
        return annotation
    for arg in typing.get_args(annotation):
        found = _inner_model(arg)
        if found is not None:
            return found
    return None


# ---------------------------------------------------------------------------------------------
# secrets never printed
# ---------------------------------------------------------------------------------------------
_URL_PASSWORD = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.\-]*://[^\s:/@]*:)[^\s]*@")


def redact_secrets(text: str) -> str:
    """``text`` with the password of every URL (``scheme://user:PASSWORD@host``) replaced by
    ``***``: messages quote storage URLs, and a terminal or a log must never show a password."""
    return _URL_PASSWORD.sub(lambda m: m.group("head") + "***@", str(text))
