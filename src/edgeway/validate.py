"""Validating a configuration without running it.

One check behind ``edgeway check``, ``edgeway run``'s start-up and (next)
the admin API and reload, so that what one accepts the others accept::

    issues = validate(Path("edgeway.yaml"))        # a file
    issues = validate(text, filename="pushed")     # YAML text
    for issue in issues:
        print(issue)     # edgeway.yaml:12: sinks[0].options.tls.ca: what was expected

Nothing that runs is built: no socket is opened, no file written, no task
started. Sink and south adapter objects are constructed (that is where each
type checks its own settings) but never started. Beyond the schema that
:func:`edgeway.config.parse_config` applies (YAML syntax, keys given twice,
types, unknown keys with the nearest known one), it checks:

- sinks: each type's ``options``; names given once; the optional library
  the type needs is installed (naming the extra);
- routes: names given once; every sink a route, a quarantine or
  ``pipeline.default_sinks`` names exists;
- south adapters: each configured adapter's own checks; its optional library;
- TLS: certificate, key and CA files named by listeners, HTTP ingest, MQTT
  client connections and OPC-UA security exist and parse;
- ``mqtt.users[].password_hash``: a complete argon2 hash (a placeholder such
  as ``$argon2id$v=19$m=65536,t=3,p=4$...`` can never verify a password).
"""

from __future__ import annotations

import base64
import binascii
import ssl
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from edgeway.config import (
    Config,
    ConfigError,
    ConfigIssue,
    KeyLines,
    TlsConfig,
    apply_overrides,
    parse_config_lines,
)

__all__ = ["check_config", "read_config", "validate"]

Loc = tuple[str | int, ...]


def validate(
    source: str | Path, *, filename: str | None = None, sink_urls: Sequence[str] = ()
) -> list[ConfigIssue]:
    """Every problem in a configuration; empty when ``edgeway run`` would accept it.

    ``source`` is a file (:class:`~pathlib.Path`) or YAML text (``str``,
    reported as ``filename``, default ``<config>``). Relative paths in the
    configuration (certificates) are taken from the current directory, as
    ``edgeway run`` takes them. ``sink_urls`` are sinks a command line adds
    (``--sink URL``: ``sink1``, ``sink2``, ...), which routes may name.
    """
    try:
        if isinstance(source, Path):
            config, lines = read_config(source)
        else:
            config, lines = parse_config_lines(source, filename or "<config>")
    except ConfigError as e:
        return list(e.issues)
    if sink_urls:
        config = apply_overrides(config, sinks=sink_urls)
    return check_config(config, lines)


def read_config(path: Path) -> tuple[Config, KeyLines]:
    """Read and parse a configuration file; :class:`ConfigError` on any schema problem."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(
            [ConfigIssue(str(path), None, "", f"cannot read: {e.strerror}")]
        ) from None
    return parse_config_lines(text, str(path))


def check_config(config: Config, lines: KeyLines) -> list[ConfigIssue]:
    """The checks beyond the schema, on a parsed configuration (with any
    command-line overrides applied); ``lines`` places each issue in the file."""
    issues: list[ConfigIssue] = []
    for check in _CHECKS:
        issues += check(config, lines)
    return sorted(issues, key=lambda i: i.line or 0)


# --------------------------------------------------------------------------
# sinks


def _sinks(config: Config, lines: KeyLines) -> Iterator[ConfigIssue]:
    from edgeway.sinks.base import SinkOptionsError, create_sink, sink_class_for

    seen: set[str] = set()
    for i, sink in enumerate(config.sinks):
        where = f"sinks[{i}]"
        if sink.name in seen:
            # Names key the outbox's per-sink cursors and counters.
            yield lines.issue(("sinks", i, "name"), f"sink {sink.name!r} defined twice")
        seen.add(sink.name)
        try:
            cls = sink_class_for(sink.url)
        except ValueError as e:
            yield lines.issue(("sinks", i, "url"), str(e), f"{where}.url ({sink.name})")
            continue
        if cls.library is not None and not cls.library.installed():
            yield lines.issue(("sinks", i, "url"), cls.library.missing(), f"{where} ({sink.name})")
        try:
            create_sink(sink, config.gateway.id)
        except SinkOptionsError as e:
            for key, message in e.problems:
                loc = ("sinks", i, *key)
                yield lines.issue(loc, message, f"{where}.{'.'.join(map(str, key))} ({sink.name})")
        except (ValueError, TypeError) as e:
            yield lines.issue(("sinks", i), str(e), f"{where} ({sink.name})")


# --------------------------------------------------------------------------
# routes


def _routes(config: Config, lines: KeyLines) -> Iterator[ConfigIssue]:
    known = {s.name for s in config.sinks}

    def unknown(names: list[str]) -> str:
        missing = ", ".join(repr(n) for n in names if n not in known)
        return f"unknown sink {missing}; sinks: {', '.join(sorted(known)) or 'none'}"

    seen: set[str] = set()
    for i, route in enumerate(config.routes):
        if route.name in seen:
            yield lines.issue(("routes", i, "name"), f"route {route.name!r} defined twice")
        seen.add(route.name)
        if route.sinks is not None and any(n not in known for n in route.sinks):
            yield lines.issue(("routes", i, "sinks"), unknown(list(route.sinks)))
        for j, spec in enumerate(route.steps):
            for step_type, params in spec.items():
                q = params.get("quarantine") if isinstance(params, dict) else None
                if isinstance(q, str) and q not in known:
                    yield lines.issue(
                        ("routes", i, "steps", j, step_type, "quarantine"), unknown([q])
                    )
    default = config.pipeline.default_sinks
    if default is not None and any(n not in known for n in default):
        yield lines.issue(("pipeline", "default_sinks"), unknown(list(default)))


def _rule_steps(config: Config, lines: KeyLines) -> Iterator[ConfigIssue]:
    """A route's ``rules`` step names configured rules, each once (docs/rules.md)."""
    from edgeway.rules.stage import rule_step_problems

    for loc, message in rule_step_problems(config.rules, config.routes):
        yield lines.issue(loc, message)


# --------------------------------------------------------------------------
# south adapters


def _adapters(config: Config, lines: KeyLines) -> Iterator[ConfigIssue]:
    from edgeway.ingest import MemoryIngest
    from edgeway.south import SECTION_LIBRARIES
    from edgeway.south.base import adapter_class, registered_sections

    for section in registered_sections():
        value = getattr(config, section, None)
        entries = value if isinstance(value, list) else ([] if value is None else [value])
        for i, entry in enumerate(entries):
            if getattr(entry, "enabled", True) is False:
                continue
            loc: Loc = (section, i) if isinstance(value, list) else (section,)
            library = SECTION_LIBRARIES.get(section)
            if library is not None and not library.installed():
                yield lines.issue(loc, library.missing())
                continue
            try:
                # Built (each type checks its settings in __init__), never run.
                adapter_class(section)(
                    entry,
                    ingest=MemoryIngest(),
                    gateway_id=config.gateway.id,
                    data_dir=Path(config.gateway.data_dir),
                )
            except (ValueError, TypeError, KeyError) as e:
                yield lines.issue(loc, str(e.args[0] if isinstance(e, KeyError) else e))


# --------------------------------------------------------------------------
# TLS files


def _tls_files(config: Config, lines: KeyLines) -> Iterator[ConfigIssue]:
    from edgeway.south.mqtt.listeners import ListenerError, TlsFileError, build_server_ssl_context

    servers: list[tuple[Loc, TlsConfig]] = [
        (("mqtt", "listeners", i, "tls"), lst.tls)
        for i, lst in enumerate(config.mqtt.listeners)
        if lst.tls is not None
    ]
    if config.http_ingest is not None and config.http_ingest.tls is not None:
        servers.append((("http_ingest", "tls"), config.http_ingest.tls))
    for loc, tls in servers:
        try:
            build_server_ssl_context(tls)
        except TlsFileError as e:
            yield lines.issue((*loc, e.key), str(e))
        except ListenerError as e:
            yield lines.issue(loc, str(e))
    for i, client in enumerate(config.mqtt_client):
        tls_c = client.tls
        if tls_c is None:
            continue
        loc = ("mqtt_client", i, "tls")
        try:
            ctx = ssl.create_default_context(cafile=str(tls_c.ca) if tls_c.ca else None)
        except (OSError, ssl.SSLError) as e:
            yield lines.issue((*loc, "ca"), f"cannot load CA {tls_c.ca}: {_reason(e)}")
            continue
        if tls_c.cert is not None and tls_c.key is not None:
            try:
                ctx.load_cert_chain(str(tls_c.cert), str(tls_c.key))
            except (OSError, ssl.SSLError) as e:
                yield lines.issue(
                    (*loc, "cert"), f"cannot load {tls_c.cert} / {tls_c.key}: {_reason(e)}"
                )
    for i, server in enumerate(config.opcua):
        sec = server.security
        for key in ("certificate", "private_key", "server_certificate"):
            path = getattr(sec, key)
            if path is not None:
                problem = _opcua_file_problem(path, key == "private_key")
                if problem:
                    yield lines.issue(("opcua", i, "security", key), problem)


def _reason(e: OSError | ssl.SSLError) -> str:
    if isinstance(e, ssl.SSLError):
        return str(e.reason or e)
    return e.strerror or str(e)


def _opcua_file_problem(path: Path, is_key: bool) -> str | None:
    """None when ``path`` holds a PEM or DER certificate (or key), else why not."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        data = path.read_bytes()
    except OSError as e:
        return f"cannot read {path}: {e.strerror or e}"
    loaders: list[Callable[[bytes], Any]]
    if is_key:
        loaders = [
            lambda d: serialization.load_pem_private_key(d, password=None),
            lambda d: serialization.load_der_private_key(d, password=None),
        ]
    else:
        loaders = [x509.load_pem_x509_certificate, x509.load_der_x509_certificate]
    for load in loaders:
        try:
            load(data)
            return None
        except (ValueError, TypeError):
            continue
    what = "an unencrypted private key" if is_key else "a certificate"
    return f"{path} is not {what} (PEM or DER)"


# --------------------------------------------------------------------------
# password hashes


def _password_hashes(config: Config, lines: KeyLines) -> Iterator[ConfigIssue]:
    import argon2
    from argon2.exceptions import InvalidHashError

    for i, user in enumerate(config.mqtt.users):
        problem = None
        try:
            argon2.extract_parameters(user.password_hash)
        except InvalidHashError:
            problem = "not a complete argon2 hash"
        else:
            # $argon2id$v=19$m=..,t=..,p=..$<salt>$<hash>: both base64, unpadded.
            salt, digest = user.password_hash.split("$")[-2:]
            try:
                for part in (salt, digest):
                    base64.b64decode(part + "=" * (-len(part) % 4), validate=True)
            except (binascii.Error, ValueError):
                problem = "salt or hash is not base64"
        if problem:
            yield lines.issue(
                ("mqtt", "users", i, "password_hash"),
                f"{problem}: no password can match it (make one with 'edgeway passwd')",
            )


_CHECKS: tuple[Callable[[Config, KeyLines], Iterator[ConfigIssue]], ...] = (
    _sinks,
    _routes,
    _rule_steps,
    _adapters,
    _tls_files,
    _password_hashes,
)
