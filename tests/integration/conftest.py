"""Fixtures that run the real ``edgeway run`` process for integration tests.

``start_gateway`` is a factory: each call starts ``python -m edgeway run`` as a
subprocess on a free loopback port with its own data directory, waits (bounded)
until the MQTT port accepts connections, and returns a :class:`GatewayProcess`.
Every gateway it started is stopped when the test ends (SIGTERM, then SIGKILL
after 5 s), whatever the test did. ``gateway`` is the common case: one gateway
on embedded defaults (anonymous clients allowed on the loopback listener).

Example::

    def test_something(start_gateway):
        gw = start_gateway(config_text=\"\"\"
            mqtt:
              listeners: [{bind: "127.0.0.1:{port}", allow_anonymous: false}]
              users: [{username: alice, password_hash: "$argon2id$..."}]
        \"\"\")
        client.connect(gw.host, gw.port)

In ``config_text`` the literal ``{port}`` is replaced by the chosen free port
(other braces, such as ACL placeholders, are left alone). When the config text
names ``{port}``, no ``--mqtt-listen`` flag is passed, so the file's listeners
(with their TLS and anonymous settings) are the ones that run.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from edgeway_process import GatewayLauncher, GatewayProcess, StartGateway
from mqtt_peers import PahoPeer


@pytest.fixture
def start_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StartGateway]:
    """Factory fixture: ``start_gateway(config_text=None, *, port=None, data_dir=None,
    extra_args=(), listen=None, wait=True, env=None) -> GatewayProcess``.

    - ``config_text``: YAML written to a temp file and passed with ``--config``;
      ``{port}`` in it is replaced by the port.
    - ``port``: reuse a port (restart tests, second-gateway tests); default a free one.
    - ``data_dir``: reuse a data directory (restart tests); default a fresh temp dir.
      ``False`` passes no ``--data-dir`` (embedded default ``./edgeway-data`` in
      the process's temp working directory).
    - ``listen``: pass ``--mqtt-listen 127.0.0.1:PORT`` (default: yes, unless the
      config text names ``{port}``).
    - ``wait``: wait until the port accepts; if the process exits or the port
      never opens, fail the test with the process output.

    Every gateway started is terminated at the end of the test.
    """
    launcher = GatewayLauncher(tmp_path_factory)
    try:
        yield launcher.start
    finally:
        launcher.stop_all()


@pytest.fixture(scope="module")
def shared_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """One gateway on embedded defaults shared by a whole test module (saves a
    process start per test). Tests using it must use unique topics and client
    ids (``mqtt_peers.unique``)."""
    launcher = GatewayLauncher(tmp_path_factory)
    try:
        yield launcher.start()
    finally:
        launcher.stop_all()


@pytest.fixture
def gateway(start_gateway: StartGateway) -> GatewayProcess:
    """One ``edgeway run`` on embedded defaults, listening on a free loopback port."""
    return start_gateway()


@pytest.fixture
def peers() -> Iterator[list[PahoPeer]]:
    """A list for the paho peers a test creates; each is disconnected afterwards."""
    made: list[PahoPeer] = []
    try:
        yield made
    finally:
        for p in made:
            p.disconnect()
