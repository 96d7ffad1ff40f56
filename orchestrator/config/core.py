"""The machinery every config model shares: the Secret type, the one reader of the
`*_env` / `*_file` / `*_credential` secret forms, constrained field types, and the translation
of a pydantic error into one `config error: dotted.key: problem` line."""

from __future__ import annotations

import os
import typing
import urllib.parse
from collections.abc import Collection
from pathlib import Path
from typing import Annotated, Any

import pydantic
import pydantic_core
from pydantic_core import core_schema

from orchestrator import errors


class Secret:
    """A string that never shows itself in repr/str, so it cannot leak into a log by accident.

    A secret left unread (`load(..., secrets=False)`, for commands that only read the database)
    raises a ConfigError naming its key when something asks for its value."""

    __slots__ = ("_absent", "_unread_key", "_value")

    def __init__(self, value: str) -> None:
        self._value = value
        self._unread_key = ""
        self._absent = ""

    @classmethod
    def unread(cls, key: str) -> Secret:
        s = cls("")
        s._unread_key = key
        return s

    @classmethod
    def absent(cls, key: str, why: str) -> Secret:
        """Stands for a secret this configuration does without (e.g. no storage key with
        Entra ID): asking for its value is a bug that names the key."""
        s = cls.unread(key)
        s._absent = why
        return s

    def place(self, table_key: str) -> None:
        """Prefix an unread secret's key with its table's dotted key (validators do not know
        where they are), for the error it raises if used."""
        if self._unread_key and not self._absent:
            self._unread_key = f"{table_key}.{self._unread_key}".lstrip(".")

    @property
    def is_read(self) -> bool:
        return not self._unread_key

    @property
    def is_absent(self) -> bool:
        return bool(self._absent)

    def get(self) -> str:
        if self._unread_key:
            raise errors.ConfigError(self._unread_key, self._absent or
                                     "was not read (this command runs without secrets)")
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and (other._value, other._unread_key) == (
            self._value, self._unread_key)

    def __hash__(self) -> int:
        return hash(self._value)

    @classmethod
    def __get_pydantic_core_schema__(
        cls, source: Any, handler: pydantic.GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        # Only ever built by the secret-forms validator (or by code): never from file text.
        return core_schema.is_instance_schema(cls)


def key_error(key: str, problem: str) -> pydantic_core.PydanticCustomError:
    """An error about `key` below the model being validated (turned into `a.b.key: problem`)."""
    return pydantic_core.PydanticCustomError("config_key", "{problem}", {"key": key,
                                                                         "problem": problem})


def resolve(value: Any, base: Path | None) -> Any:
    """A path from the file: ~ expanded, relative to the file's folder. Non-paths pass through
    unchanged, for the field's own validation to refuse."""
    if isinstance(value, Path):
        return value
    if not isinstance(value, str) or not value:
        return value
    p = Path(os.path.expanduser(value))
    return p if p.is_absolute() or base is None else base / p


def base_path(info: pydantic.ValidationInfo) -> Path | None:
    ctx = info.context or {}
    base = ctx.get("base")
    return base if isinstance(base, Path) else None


def _to_path(value: Any, info: pydantic.ValidationInfo) -> Path:
    value = resolve(value, base_path(info))
    if not isinstance(value, Path):
        raise ValueError("must be a path")
    return value


def _check_http_url(value: str) -> str:
    """An http(s) URL with a host: anything else can never be reached, so it is refused here
    instead of being retried forever."""
    try:
        parts = urllib.parse.urlsplit(value)
        parts.port  # noqa: B018  (raises on a port that is not a number)
    except ValueError:
        raise ValueError("is not a URL") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError("must start with http:// or https://")
    if not parts.hostname:
        raise ValueError("has no host")
    return value


def _check_file_name(value: str) -> str:
    if "/" in value or "\\" in value or value.startswith(".") or value in ("", ".."):
        raise ValueError("is not a usable file name")
    return value


def _str_map(value: Any) -> Any:
    """A table of strings; numbers are accepted and sent as their text."""
    if not isinstance(value, dict):
        return value
    out: dict[str, Any] = {}
    for k, v in value.items():
        if isinstance(v, bool) or not isinstance(v, str | int | float):
            raise key_error(str(k), "must be a string or a number")
        out[str(k)] = str(v)
    return out


ConfigPath = Annotated[Path, pydantic.BeforeValidator(_to_path)]
Text = Annotated[str, pydantic.Field(min_length=1)]
WebUrl = Annotated[str, pydantic.Field(min_length=1), pydantic.AfterValidator(_check_http_url)]
FileName = Annotated[str, pydantic.Field(min_length=1), pydantic.AfterValidator(_check_file_name)]
StrMap = Annotated[dict[str, str], pydantic.BeforeValidator(_str_map)]
Positive = Annotated[int, pydantic.Field(ge=1)]


def is_secret(annotation: Any) -> bool:
    return annotation is Secret or Secret in typing.get_args(annotation)


def _read_env(key: str, var: Any) -> str:
    if not isinstance(var, str) or not var:
        raise key_error(key, "must name an environment variable")
    value = os.environ.get(var)
    if not value:
        raise key_error(key, f"environment variable {var} is not set")
    return value.strip()


def _read_file(key: str, path: Any) -> str:
    if not isinstance(path, str) or not path:
        raise key_error(key, "must name a file")
    try:
        value = Path(path).expanduser().read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise key_error(key, f"cannot read {path}: {exc.strerror}") from None
    if not value:
        raise key_error(key, f"{path} is empty")
    return value


def _read_credential(key: str, name: Any) -> str:
    if not isinstance(name, str) or not name or "/" in name:
        raise key_error(key, "must name a credential")
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    if not creds:
        raise key_error(key, "CREDENTIALS_DIRECTORY is not set")
    return _read_file(key, str(Path(creds) / name))


_READERS = {"env": _read_env, "file": _read_file, "credential": _read_credential}


class Model(pydantic.BaseModel):
    """A config table: unknown keys refused, numbers not taken from strings, frozen."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True, strict=True)

    @pydantic.model_validator(mode="before")
    @classmethod
    def _secret_forms(cls, data: Any, info: pydantic.ValidationInfo) -> Any:
        """The one reader of secrets: each field typed Secret is given in the file as exactly one
        of NAME_env / NAME_file / NAME_credential, never as NAME itself."""
        if not isinstance(data, dict):
            return data
        read = (info.context or {}).get("secrets", True)
        data = dict(data)
        for name, field in cls.model_fields.items():
            if not is_secret(field.annotation):
                continue
            forms = [f for f in _READERS if f"{name}_{f}" in data]
            if name in data and not isinstance(data[name], Secret):
                raise key_error(name, f"secrets are not allowed in the file; use {name}_env,"
                                       f" {name}_file or {name}_credential")
            if len(forms) > 1:
                given = ", ".join(f"{name}_{f}" for f in forms)
                raise key_error(f"{name}_{forms[1]}", f"give only one of {given}")
            if not forms:
                if field.is_required() and name not in data:
                    raise key_error(f"{name}_env", "is required (or _file/_credential)")
                continue
            key = f"{name}_{forms[0]}"
            raw = data.pop(key)
            # An unread secret knows its key; `parse` prefixes it with the table's.
            data[name] = Secret(_READERS[forms[0]](key, raw)) if read else Secret.unread(key)
        return data


_MESSAGES = {
    "missing": "is required",
    "extra_forbidden": "unknown key",
    "float_type": "must be a number",
    "int_type": "must be a whole number",
    "int_from_float": "must be a whole number",
    "bool_type": "must be true or false",
    "string_type": "must be a string",
    "string_too_short": "must be a non-empty string",
    "dict_type": "must be a table",
    "model_type": "must be a table",
    "model_attributes_type": "must be a table",
    "list_type": "must be a list",
    "tuple_type": "must be a list",
    "union_tag_not_found": "must be a table",
    "is_instance_of": "must be given as a secret (NAME_env, NAME_file or NAME_credential)",
}


def to_config_error(
    exc: pydantic.ValidationError, *, union_tags: Collection[str] = ()
) -> errors.ConfigError:
    """The first problem, as `dotted.key: problem`. Never the offending value: it may be a
    secret."""
    err = exc.errors(include_url=False, include_input=False)[0]
    loc: list[str | int] = list(err["loc"])
    if len(loc) > 2 and loc[0] == "services" and loc[2] in union_tags:
        del loc[2]  # the union's tag, not a key in the file
    ctx = err.get("ctx") or {}
    kind = err["type"]
    if kind == "config_key":
        loc.append(str(ctx["key"]))
        problem = str(ctx["problem"])
    elif kind == "union_tag_invalid":
        loc.append("kind")
        problem = "must be one of " + ", ".join(f'"{k}"' for k in union_tags)
    elif kind == "value_error":
        problem = str(ctx.get("error", err["msg"]))
    elif kind == "literal_error":
        problem = "must be " + str(ctx.get("expected", "")).replace("'", '"')
    elif kind in ("greater_than_equal", "greater_than", "less_than", "less_than_equal"):
        words = {"greater_than_equal": "at least", "greater_than": "more than",
                 "less_than": "below", "less_than_equal": "at most"}[kind]
        bound = next(iter(ctx.values()))
        problem = f"must be {words} {bound:g}" if isinstance(bound, float) else (
            f"must be {words} {bound}")
    elif loc == ["watch"] and kind in ("tuple_type", "list_type"):
        problem = "must be an array of tables: [[watch]]"
    else:
        problem = _MESSAGES.get(kind, err["msg"])
    return errors.ConfigError(_dotted(loc), problem)


def _dotted(loc: list[str | int]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out
