"""``edgeway simulate --provision-key``: every simulated device enrols with
the key (MQTT devices over MQTT with gmqtt, HTTP and CoAP devices with POST
/provision), then sends with its own credentials to a gateway that refuses
anonymous devices; a second run with the kept credentials enrols nobody."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from edgeway.config import CoapSection, HttpIngestSection, ListenerConfig, MqttSection
from edgeway.devices.provisioning import ProvisioningKeys
from edgeway.gateway import Gateway
from edgeway.sim.cloud import CloudReceiver
from sim_gateway import devices_seen, gateway_config, running, wait_until


async def _simulate(gw: Gateway, key: str, creds: Path, duration: float) -> tuple[int, str]:
    ports = {a.section: a.port for a in gw.adapters}  # type: ignore[attr-defined]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "edgeway", "simulate", "--protocol", "mixed", "--devices", "5",
        "--prefix", "enr", "--rate", "5", "--duration", str(duration), "--interval", "1",
        "--mqtt-target", f"127.0.0.1:{gw.listeners[0].bound[1]}",
        "--http-target", f"127.0.0.1:{ports['http_ingest']}",
        "--coap-target", f"127.0.0.1:{ports['coap']}",
        "--provision-key", key, "--credentials-file", str(creds),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 90)
    assert proc.returncode is not None
    return proc.returncode, out.decode() + err.decode()


async def test_simulated_devices_enrol_then_use_their_own_credentials(
    tmp_path: Path, cloud: CloudReceiver
) -> None:
    data = tmp_path / "gw"
    keys = ProvisioningKeys.open(data)
    secret = keys.add(
        "sim", groups=["simulated"], template={"kinds": ["mqtt", "http", "coap"]},
        id_pattern="enr-*", max_uses=5,
    )  # fmt: skip
    keys.close()
    cfg = gateway_config(data, cloud)
    cfg.mqtt = MqttSection(listeners=[ListenerConfig(bind="127.0.0.1:0")])  # credentials only
    cfg.http_ingest = HttpIngestSection(listen="127.0.0.1:0")  # no anonymous posts
    cfg.coap = CoapSection(listen="127.0.0.1:0", allow_anonymous=False, probe_interval=60)
    creds = tmp_path / "creds.json"
    async with running(Gateway(cfg)) as gw:
        code, text = await _simulate(gw, f"sim:{secret}", creds, 3)
        assert code == 0, text
        assert "3 mqtt devices enrolled over mqtt" in text, text
        assert "1 coap devices enrolled over http" in text and "1 http devices enrolled" in text
        names = {
            "enr-mqtt-0000",
            "enr-mqtt-0001",
            "enr-mqtt-0002",
            "enr-coap-0000",
            "enr-http-0000",
        }
        await wait_until(lambda: devices_seen(cloud) >= names)
        assert creds.stat().st_mode & 0o777 == 0o600
        assert gw.access is not None and gw.access.provisioner is not None
        assert gw.access.provisioner.stats.enrolled == 5
        assert gw.devices is not None
        for name in names:
            dev = await gw.devices.registry.get(name)
            assert dev is not None and dev.registered and dev.groups == ("simulated",)
        # Again, with the kept credentials: the key is used up, nobody enrols.
        code, text = await _simulate(gw, f"sim:{secret}", creds, 2)
        assert code == 0, text
        assert "enrolled" not in text
        # Without kept credentials the used-up key refuses (and simulate says so).
        code, text = await _simulate(gw, f"sim:{secret}", tmp_path / "none.json", 1)
        assert code == 1 and "used up" in text, text
