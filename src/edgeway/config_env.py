"""Environment variables in configuration values: ``${CLOUD_TOKEN}``.

So that secrets need not live in the file (a systemd ``EnvironmentFile=``, a
Docker ``--env-file`` or a Kubernetes secret holds them), any scalar value
may reference variables::

    sinks:
      - name: cloud
        url: https://ingest.example.com/v1/telemetry
        options:
          headers: {Authorization: "Bearer ${CLOUD_TOKEN}"}
    gateway:
      id: ${EDGEWAY_GATEWAY_ID:-site-a-gw1}   # a default when unset (or empty)

Rules (those of POSIX shells and Docker Compose, the ones operators know):

- ``${NAME}``: the variable's value; unset is a configuration error naming
  the file, the line and the key, never an empty string sent to the cloud.
- ``${NAME:-default}``: ``default`` when ``NAME`` is unset or empty;
  ``${NAME-default}``: only when unset.
- ``$${`` is a literal ``${`` (an escape, for a value that needs one).
- Only values are expanded, never keys, and the result is not parsed as YAML
  again (a value cannot inject structure); an unquoted value that becomes a
  number or a boolean (``port: ${PORT}``) is typed as YAML would type it.
- A bare ``$NAME`` (no braces) is left alone: passwords contain ``$``.

The expansion works on the composed YAML tree, before the schema, so every
later error still names the line of the value.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

import yaml

_REFERENCE = re.compile(
    r"\$\$\{"  # escaped
    r"|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?-)(?P<default>[^}]*))?\}"
    r"|\$\{(?P<bad>[^}]*)\}?"
)
"""One reference: ``$${`` (escape), ``${NAME}``, ``${NAME:-default}`` or
``${NAME-default}``; anything else starting ``${`` is an error (``bad``)."""

MAX_EXPANDED = 64 * 1024
"""Longest value after expansion (bytes of text). A certificate in PEM is a
few KiB; a value this long is a mistake (a whole file in a variable), and a
limit keeps a configuration's size what the file's size suggests."""


class EnvReferenceError(ValueError):
    """A value references a variable that is unset, or is malformed."""


def expand_value(text: str, environ: Mapping[str, str]) -> str:
    """``text`` with its references replaced; :class:`EnvReferenceError` for
    an unset variable without default or a malformed reference."""

    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$${":
            return "${"
        bad = match.group("bad")
        if bad is not None:
            raise EnvReferenceError(
                f"malformed reference ${{{bad}}}: expected ${{NAME}} or ${{NAME:-default}} "
                "(write $${ for a literal ${)"
            )
        name = match.group("name")
        op = match.group("op")
        value = environ.get(name)
        if op == ":-" and not value:
            return str(match.group("default"))
        if op == "-" and value is None:
            return str(match.group("default"))
        if value is None:
            raise EnvReferenceError(
                f"environment variable {name} is not set "
                f"(set it, or give a default: ${{{name}:-default}})"
            )
        return value

    out = _REFERENCE.sub(one, text)
    if len(out) > MAX_EXPANDED:
        raise EnvReferenceError(
            f"value is {len(out)} characters once expanded (at most {MAX_EXPANDED})"
        )
    return out


def expand_tree(
    node: yaml.Node | None, environ: Mapping[str, str] | None = None
) -> list[tuple[tuple[int | str, ...], yaml.Node, str]]:
    """Expand every scalar value under ``node`` in place (``environ`` defaults
    to the process environment); returns ``(key path, node, message)`` for
    each value that could not be expanded."""
    env = os.environ if environ is None else environ
    errors: list[tuple[tuple[int | str, ...], yaml.Node, str]] = []
    _walk(node, (), env, errors, set())
    return errors


def _walk(
    node: yaml.Node | None,
    loc: tuple[int | str, ...],
    env: Mapping[str, str],
    errors: list[tuple[tuple[int | str, ...], yaml.Node, str]],
    seen: set[int],
) -> None:
    # An alias (``*name``) is the same node again: expand it once (a value
    # that expands to ``${`` must not be expanded twice), walk it once (a
    # tree of aliases can be exponentially large, "billion laughs").
    if node is None or id(node) in seen:
        return
    seen.add(id(node))
    if isinstance(node, yaml.ScalarNode):
        _expand_scalar(node, loc, env, errors)
    elif isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            name: int | str = key.value if isinstance(key, yaml.ScalarNode) else "?"
            _walk(value, (*loc, name), env, errors, seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _walk(item, (*loc, i), env, errors, seen)


_RESOLVER = yaml.resolver.Resolver()


def _expand_scalar(
    node: yaml.ScalarNode,
    loc: tuple[int | str, ...],
    env: Mapping[str, str],
    errors: list[tuple[tuple[int | str, ...], yaml.Node, str]],
) -> None:
    if "${" not in node.value:
        return
    try:
        value = expand_value(node.value, env)
    except EnvReferenceError as e:
        errors.append((loc, node, str(e)))
        return
    node.value = value
    if node.style is None:
        # A plain scalar is typed from its text (``${PORT}`` -> 1883 an int),
        # as it would have been had the text been written in the file.
        node.tag = _RESOLVER.resolve(yaml.ScalarNode, value, (True, False))  # type: ignore[no-untyped-call]
    else:
        node.tag = "tag:yaml.org,2002:str"


def construct(node: yaml.Node) -> object:
    """The Python value of a composed (and expanded) YAML tree."""
    return yaml.constructor.SafeConstructor().construct_document(node)
