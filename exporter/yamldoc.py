"""Strict YAML reading and a walker that knows each value's key path, so every error is one line naming it."""

from __future__ import annotations

import difflib
import re
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Final, NoReturn

import yaml

_ENV_RE: Final = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class ConfigError(Exception):
    """A config problem, already phrased for the user: file, key path, what is wrong."""

    def __init__(self, message: str) -> None:
        # Always one line: YAML reader errors and keys taken from the file may hold line breaks.
        super().__init__(" ".join(line.strip() for line in message.splitlines()))


class Node:
    """A value in the YAML document with its key path, so every error can say where it is."""

    def __init__(self, value: object, path: str, source: str) -> None:
        self.value = value
        self.path = path
        self.source = source

    def fail(self, problem: str) -> NoReturn:
        where = f"{self.path}: " if self.path else ""
        raise ConfigError(f"{self.source}: {where}{problem}")

    def child(self, key: str | int, value: object) -> Node:
        path = f"{self.path}[{key}]" if isinstance(key, int) else f"{self.path}.{key}" if self.path else key
        return Node(value, path, self.source)

    def mapping(self, allowed: Sequence[str]) -> dict[str, Node]:
        """The node as a mapping with only `allowed` keys; a typo is named with a suggestion."""
        if self.value is None:
            return {}
        if not isinstance(self.value, dict):
            self.fail(f"must be a mapping (key: value), got {describe(self.value)}")
        out: dict[str, Node] = {}
        for key, value in self.value.items():
            if not isinstance(key, str):
                self.fail(f"key {key!r} must be a string")
            if key not in allowed:
                near = difflib.get_close_matches(key, allowed, n=1)
                hint = f"; did you mean {near[0]!r}?" if near else f"; valid keys: {', '.join(allowed)}"
                self.child(key, value).fail(f"unknown key{hint}")
            out[key] = self.child(key, value)
        return out

    def entries(self, what: str) -> list[tuple[object, Node]]:
        """A mapping with keys of the user's choosing (labels, users): (key, its node) pairs; none if unset."""
        if self.value is None:
            return []
        if not isinstance(self.value, dict):
            self.fail(f"must be a mapping of {what}, got {describe(self.value)}")
        return [(key, self.child(str(key), value)) for key, value in self.value.items()]

    def string(self, *, allow_empty: bool = False) -> str:
        if not isinstance(self.value, str):
            self.fail(f"must be a string, got {describe(self.value)}")
        if not allow_empty and not self.value.strip():
            self.fail("must not be empty")
        return self.value



def describe(value: object) -> str:
    if value is None:
        return "nothing (null)"
    kind = {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean",
            int: "an integer", float: "a number"}.get(type(value), type(value).__name__)
    return f"{kind} ({value!r})" if isinstance(value, (str, int, float)) else kind


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys: YAML would silently keep the last one."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict[object, object]:
    seen: set[object] = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue  # `<<: *anchor`; construct_mapping merges it
        key = loader.construct_object(key_node, deep=deep)
        if not isinstance(key, Hashable):
            continue  # construct_mapping reports "found unhashable key" with its position
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)

# The same loader on libyaml's scanner and parser, where PyYAML was built with it: ~8x faster (a
# 1,000-org-set config parses in 0.05 s, not 0.4 s, and a reload's worker thread holds the GIL,
# which the event loop then waits for, that much less). Only the scanner and parser differ: the
# constructors (duplicate keys included) are the ones above.
_FastLoader: type[yaml.CSafeLoader] | None = None
if getattr(yaml, "__with_libyaml__", False):
    class _CStrictLoader(yaml.CSafeLoader):
        """_StrictLoader on libyaml."""

    _CStrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
    _FastLoader = _CStrictLoader


def parse_yaml(text: str, source: str) -> object:
    if _FastLoader is not None:
        try:
            return yaml.load(text, Loader=_FastLoader)
        except Exception:  # the pure-Python loader below says what is wrong, as it always has
            pass  # libyaml words its errors differently: the messages (and positions) stay the pure loader's
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(f"{source}: {where}invalid YAML: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: invalid YAML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{source}: invalid YAML: nested too deeply") from None


def expand_env(node: Node, env: Mapping[str, str]) -> object:
    """Expand ${VAR} and ${VAR:-default} in every string of the document."""
    value = node.value
    if isinstance(value, str):
        def replace(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if default is not None:  # as in the shell: the default also replaces an empty value
                return env.get(name) or default
            if name in env:
                return env[name]
            node.fail(f"environment variable {name} is not set")
        return _ENV_RE.sub(replace, value)
    if isinstance(value, dict):
        return {k: expand_env(node.child(str(k), v), env) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_env(node.child(i, v), env) for i, v in enumerate(value)]
    return value


def read_text(file: Path, what: str) -> str:
    """The file's text, or a ConfigError naming the file and why it cannot be read."""
    try:
        return file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read {what}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{file}: not UTF-8 text") from None
