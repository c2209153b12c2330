"""Config-backed authentication and ACL: passwords, anonymous and certificate
logins, lockout, ACL rules with placeholders, filter subsumption, the cache."""

from __future__ import annotations

import asyncio
import io
import itertools
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator

import argon2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeway.config import AclRule, ConfigError, MqttSection, MqttUser, parse_config
from edgeway.devices import backoff, config_auth
from edgeway.devices.auth import ConnectInfo, Principal
from edgeway.devices.config_auth import (
    ConfigAuthenticator,
    ConfigAuthoriser,
    filter_intersection,
    filter_subsumes,
    hash_password,
    passwd_main,
)

# Cheap parameters so the tests stay fast; verification uses whatever
# parameters a hash carries, so the code path is the same as in production.
CHEAP = argon2.PasswordHasher(time_cost=1, memory_cost=64, parallelism=1)


def cheap_hash(password: str) -> str:
    return CHEAP.hash(password)


def info(
    username: str | None = None,
    password: bytes | None = None,
    *,
    client_id: str = "c1",
    allow_anonymous: bool = False,
    cn: str | None = None,
) -> ConnectInfo:
    return ConnectInfo(
        client_id=client_id,
        username=username,
        password=password,
        listener="127.0.0.1:1883",
        remote="127.0.0.1:50000",
        allow_anonymous=allow_anonymous,
        cert_subject_cn=cn,
    )


def section(
    users: dict[str, str] | None = None, acl: list[dict[str, object]] | None = None
) -> MqttSection:
    return MqttSection(
        users=[MqttUser(username=u, password_hash=h) for u, h in (users or {}).items()],
        acl=[AclRule(**r) for r in (acl or [])],  # type: ignore[arg-type]
    )


@pytest.fixture
def auth() -> Iterator[ConfigAuthenticator]:
    a = ConfigAuthenticator(
        section({"alice": cheap_hash("wonderland"), "bob": cheap_hash("builder")})
    )
    yield a
    a.close()


# --------------------------------------------------------------------------
# passwords


def test_hash_password_is_argon2id_and_accepted_by_the_config() -> None:
    h = hash_password("s3cret")
    assert h.startswith("$argon2id$")
    assert argon2.PasswordHasher().verify(h, "s3cret")
    MqttUser(username="u", password_hash=h)


async def test_right_and_wrong_passwords(auth: ConfigAuthenticator) -> None:
    ok = await auth.authenticate(info("alice", b"wonderland", client_id="dev-1"))
    assert ok.allowed and ok.principal == Principal("dev-1", "alice", anonymous=False)
    bad = await auth.authenticate(info("alice", b"wrong"))
    assert not bad.allowed and bad.principal is None and bad.reason_code == 0x86
    unknown = await auth.authenticate(info("mallory", b"wonderland"))
    assert not unknown.allowed and unknown.reason_code == 0x86
    assert unknown.reason == bad.reason  # nothing tells the two apart
    no_password = await auth.authenticate(info("alice", None))
    assert not no_password.allowed and no_password.reason_code == 0x86


async def test_a_user_name_on_an_anonymous_listener_must_still_be_proved(
    auth: ConfigAuthenticator,
) -> None:
    d = await auth.authenticate(info("alice", b"wrong", allow_anonymous=True))
    assert not d.allowed and d.reason_code == 0x86
    d = await auth.authenticate(info("nobody", b"x", allow_anonymous=True))
    assert not d.allowed


async def test_anonymous_only_where_the_listener_allows_it(auth: ConfigAuthenticator) -> None:
    d = await auth.authenticate(info(None, None, allow_anonymous=True))
    assert d.allowed and d.principal == Principal("c1", None, anonymous=True)
    d = await auth.authenticate(info(None, None, allow_anonymous=False))
    assert not d.allowed and d.reason_code == 0x87


async def test_no_users_configured_anonymous_listener_ignores_the_user_name() -> None:
    a = ConfigAuthenticator(section())
    d = await a.authenticate(info("whoever", b"pw", allow_anonymous=True))
    assert d.allowed and d.principal == Principal("c1", None, anonymous=True)
    d = await a.authenticate(info("whoever", b"pw", allow_anonymous=False))
    assert not d.allowed and d.reason_code == 0x86
    a.close()


async def test_verified_certificate_common_name_is_the_user_name(auth: ConfigAuthenticator) -> None:
    d = await auth.authenticate(info(None, None, cn="device-1", client_id="dev-1"))
    assert d.allowed and d.principal == Principal("dev-1", "device-1", anonymous=False)
    # A user name given alongside a certificate is checked as usual.
    d = await auth.authenticate(info("alice", b"wrong", cn="device-1"))
    assert not d.allowed


async def test_corrupt_stored_hash_refuses_without_crashing() -> None:
    a = ConfigAuthenticator(section({"eve": "$argon2id$v=19$m=64,t=1,p=1$garbage"}))
    d = await a.authenticate(info("eve", b"x"))
    assert not d.allowed and d.reason_code == 0x86
    d = await a.authenticate(info("nobody", b"x"))  # the dummy hash copes too
    assert not d.allowed
    a.close()


async def test_verification_runs_off_the_event_loop() -> None:
    """With production-cost hashes (~0.1 s each) the loop keeps ticking."""
    a = ConfigAuthenticator(section({"alice": hash_password("wonderland")}))
    gaps: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:
        last = time.perf_counter()
        while not done.is_set():
            await asyncio.sleep(0.002)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    t = asyncio.create_task(ticker())
    try:
        start = time.perf_counter()
        d = await a.authenticate(info("alice", b"wonderland"))
        took = time.perf_counter() - start
    finally:
        done.set()
        await t
        a.close()
    assert d.allowed
    assert took > 0.03  # it really was an expensive hash
    assert max(gaps) < took / 2


async def test_unknown_user_costs_as_much_as_a_wrong_password() -> None:
    a = ConfigAuthenticator(section({"alice": hash_password("wonderland")}), max_failures=1000)
    try:
        await a.authenticate(info("warmup", b"x"))  # builds the dummy hash once

        async def median(username: str) -> float:
            times = []
            for _ in range(3):
                start = time.perf_counter()
                d = await a.authenticate(info(username, b"wrong"))
                times.append(time.perf_counter() - start)
                assert not d.allowed
            return statistics.median(times)

        wrong = await median("alice")
        unknown = await median("mallory")
    finally:
        a.close()
    # Without the dummy hash an unknown user returns in microseconds (a ratio
    # near 0.001); the wide band keeps the test steady on a busy CI machine.
    assert 1 / 3 < unknown / wrong < 3, (unknown, wrong)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_lockout_after_repeated_failures_then_backoff() -> None:
    clock = FakeClock()
    a = ConfigAuthenticator(section({"alice": cheap_hash("pw")}), max_failures=3, clock=clock)
    try:
        for _ in range(3):
            assert (await a.authenticate(info("alice", b"bad"))).reason_code == 0x86
        # Locked for 1 s: even the right password is refused, without hashing.
        d = await a.authenticate(info("alice", b"pw"))
        assert not d.allowed and d.reason_code == 0x8A and "retry" in d.reason
        clock.now += 1.01
        assert (await a.authenticate(info("alice", b"bad"))).reason_code == 0x86
        # The 4th failure locks for 2 s.
        clock.now += 1.5
        assert (await a.authenticate(info("alice", b"pw"))).reason_code == 0x8A
        clock.now += 0.6
        assert (await a.authenticate(info("alice", b"pw"))).allowed
        # Success reset the count: one failure does not lock.
        assert (await a.authenticate(info("alice", b"bad"))).reason_code == 0x86
        assert (await a.authenticate(info("alice", b"pw"))).allowed
        # Other users are not affected by someone else's lockout.
        for _ in range(3):
            await a.authenticate(info("alice", b"bad"))
        assert (await a.authenticate(info("alice", b"pw"))).reason_code == 0x8A
        assert (await a.authenticate(info(None, None, allow_anonymous=True))).allowed
        # Unknown names lock the same way, so lockout does not reveal which exist.
        for _ in range(3):
            await a.authenticate(info("mallory", b"x"))
        assert (await a.authenticate(info("mallory", b"x"))).reason_code == 0x8A
        # Failures are forgotten after a quiet period.
        clock.now += backoff.MEMORY + 1
        assert (await a.authenticate(info("alice", b"pw"))).allowed
    finally:
        a.close()


async def test_too_many_pending_verifications_is_server_busy() -> None:
    a = ConfigAuthenticator(section({"alice": hash_password("pw")}), max_pending=1)
    try:
        first, second = await asyncio.gather(
            a.authenticate(info("alice", b"pw")), a.authenticate(info("alice", b"pw"))
        )
    finally:
        a.close()
    assert first.allowed
    assert not second.allowed and second.reason_code == 0x89


def test_passwd_stdin(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("correct horse\n"))
    assert passwd_main(["--stdin"]) == 0
    out = capsys.readouterr().out.strip()
    assert argon2.PasswordHasher().verify(out, "correct horse")
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n"))
    assert passwd_main(["--stdin"]) == 1
    assert "empty password" in capsys.readouterr().err


def test_passwd_prompts_twice(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stdin", Tty())
    answers = iter(["one", "two"])
    monkeypatch.setattr(config_auth.getpass, "getpass", lambda prompt="": next(answers))
    assert passwd_main([]) == 1
    assert "do not match" in capsys.readouterr().err
    answers = iter(["same", "same"])
    assert passwd_main([]) == 0
    assert argon2.PasswordHasher().verify(capsys.readouterr().out.strip(), "same")


def test_passwd_without_tty_needs_stdin_flag(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("pw\n"))
    assert passwd_main([]) == 2
    assert "--stdin" in capsys.readouterr().err


def test_edgeway_passwd_command() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "edgeway", "passwd", "--stdin"],
        input="from the cli\n",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    assert argon2.PasswordHasher().verify(r.stdout.strip(), "from the cli")


# --------------------------------------------------------------------------
# topic filters


@pytest.mark.parametrize(
    ("outer", "inner", "expected"),
    [
        ("sensors/c1/#", "sensors/c1/+/temp", True),
        ("sensors/c1/#", "sensors/+/temp", False),
        ("sensors/c1/#", "sensors/c1", True),  # '#' also matches the parent
        ("sensors/c1/#", "sensors/c1/#", True),
        ("sensors/c1/#", "sensors/#", False),
        ("sensors/+/#", "sensors/#", False),  # "sensors" itself is not matched
        ("sensors/#", "sensors/+/#", True),
        ("sensors/+", "sensors/c1", True),
        ("sensors/+", "sensors/+", True),
        ("sensors/+", "sensors/#", False),
        ("sensors/c1", "sensors/+", False),
        ("+/+", "a/b", True),
        ("+/+", "a", False),
        ("a/+/c", "a/+/c", True),
        ("a/+/c", "a/b/+", False),
        ("#", "a/b/c", True),
        ("#", "#", True),
        ("#", "$SYS/x", False),  # wildcards at the first level skip $ topics
        ("+/x", "$SYS/x", False),
        ("$SYS/#", "$SYS/broker/+", True),
        ("#", "+/x", True),
        ("a/#", "a", True),
        ("a", "a/#", False),
    ],
)
def test_filter_subsumes(outer: str, inner: str, expected: bool) -> None:
    assert filter_subsumes(outer, inner) is expected


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ("a/#", "+/b/#", "a/b/#"),
        ("a/#", "a", "a"),
        ("a/#", "+", "a"),
        ("a/+", "a", None),
        ("a/+", "+/b", "a/b"),
        ("a/b", "a/c", None),
        ("#", "a/+/c", "a/+/c"),
        ("#", "$SYS/x", None),
        ("$SYS/#", "$SYS/+", "$SYS/+"),
        ("+/+/#", "x/#", "x/+/#"),
    ],
)
def test_filter_intersection(a: str, b: str, expected: str | None) -> None:
    assert filter_intersection(a, b) == expected
    assert filter_intersection(b, a) == expected


def reference_match(topic_filter: str, topic: str) -> bool:
    """A plain, independent implementation of MQTT matching (spec 4.7)."""
    f, t = topic_filter.split("/"), topic.split("/")
    if t[0].startswith("$") and f[0] in ("+", "#"):
        return False
    for i, level in enumerate(f):
        if level == "#":
            return True
        if i >= len(t):
            return False
        if level != "+" and level != t[i]:
            return False
    return len(f) == len(t)


LEVELS = ["a", "b", "$s"]
# Every topic of up to 5 levels over a, b, c (c appears in no filter, so it
# stands for "any other name"), with $s possible at the first level.
ALL_TOPICS = [
    "/".join(p)
    for n in range(1, 6)
    for p in itertools.product(["a", "b", "c", "$s"], repeat=n)
    if all(not x.startswith("$") for x in p[1:])
]


@st.composite
def filters(draw: st.DrawFn) -> str:
    n = draw(st.integers(1, 4))
    levels = [draw(st.sampled_from([*LEVELS, "+"])) for _ in range(n)]
    levels = [lvl if i == 0 or not lvl.startswith("$") else "a" for i, lvl in enumerate(levels)]
    if draw(st.booleans()):
        levels.append("#")
    return "/".join(levels)


@settings(max_examples=300, deadline=None)
@given(filters(), filters())
def test_subsumption_and_intersection_agree_with_matching(a: str, b: str) -> None:
    in_a = {t for t in ALL_TOPICS if reference_match(a, t)}
    in_b = {t for t in ALL_TOPICS if reference_match(b, t)}
    assert filter_subsumes(a, b) == (in_b <= in_a)
    inter = filter_intersection(a, b)
    if inter is None:
        assert not (in_a & in_b)
    else:
        assert {t for t in ALL_TOPICS if reference_match(inter, t)} == in_a & in_b


# --------------------------------------------------------------------------
# ACL

ALICE = Principal("c1", "alice")
BOB = Principal("c2", "bob")
ANON = Principal("anon-1", None, anonymous=True)


def test_no_rules_allows_everything_but_publishing_to_dollar_topics() -> None:
    z = ConfigAuthoriser(section())
    for p in (ALICE, ANON):
        assert z.may_publish(p, "devices/x/telemetry")
        assert z.may_subscribe(p, "#")
        assert z.may_subscribe(p, "$SYS/#")
        assert not z.may_publish(p, "$SYS/broker/uptime")
        assert not z.may_publish(p, "$anything")


def test_rules_default_deny_and_placeholders() -> None:
    z = ConfigAuthoriser(
        section(acl=[{"username": "*", "topic": "sensors/{client_id}/#"}, {"topic": "public/+"}])
    )
    assert z.may_publish(ALICE, "sensors/c1/temp")
    assert z.may_publish(ALICE, "sensors/c1")
    assert not z.may_publish(ALICE, "sensors/c2/temp")
    assert not z.may_publish(ALICE, "other")
    assert z.may_subscribe(ALICE, "sensors/c1/+/temp")
    assert z.may_subscribe(ALICE, "sensors/c1/#")
    # Wider filters are granted (they reach sensors/c1/...); what they must
    # not see is refused per topic name at delivery.
    assert z.may_subscribe(ALICE, "sensors/+/temp")
    assert z.may_subscribe(ALICE, "sensors/#")
    assert z.may_subscribe(ALICE, "#")
    assert not z.may_subscribe(ALICE, "sensors/c2/temp")
    assert not z.may_subscribe(ALICE, "sensors/c2/#")
    assert not z.may_subscribe(ALICE, "other/#")
    # "*" means an authenticated user: anonymous clients get only the second rule.
    anon_c1 = Principal("c1", None, anonymous=True)
    assert not z.may_publish(anon_c1, "sensors/c1/temp")
    assert z.may_publish(anon_c1, "public/x")
    assert not z.may_publish(anon_c1, "public/x/y")


def test_username_placeholder_and_matchers() -> None:
    z = ConfigAuthoriser(
        section(
            acl=[
                {"username": "dashboard", "topic": "devices/#", "access": "subscribe"},
                {"client_id": "gw-*", "topic": "gateways/{client_id}/status", "access": "publish"},
                {"topic": "users/{username}/#"},
            ]
        )
    )
    dash = Principal("browser-17", "dashboard")
    assert z.may_subscribe(dash, "devices/+/telemetry")
    assert not z.may_publish(dash, "devices/x/telemetry")  # subscribe-only rule
    gw = Principal("gw-7", "someone")
    assert z.may_publish(gw, "gateways/gw-7/status")
    assert not z.may_subscribe(gw, "gateways/gw-7/status")  # publish-only rule
    assert not z.may_publish(Principal("gx-7", "someone"), "gateways/gx-7/status")
    assert z.may_publish(BOB, "users/bob/inbox")
    assert not z.may_publish(BOB, "users/alice/inbox")
    assert not z.may_publish(ANON, "users/None/inbox")


def test_first_matching_rule_wins_with_deny() -> None:
    z = ConfigAuthoriser(
        section(acl=[{"topic": "sensors/secret/#", "allow": False}, {"topic": "sensors/#"}])
    )
    assert not z.may_publish(ALICE, "sensors/secret/x")
    assert z.may_publish(ALICE, "sensors/public")
    assert z.may_subscribe(ALICE, "sensors/public/+")
    # Overlapping the deny rule is no reason to refuse: the secret topics are
    # dropped per message at delivery (the topic name is refused below).
    assert z.may_subscribe(ALICE, "sensors/#")
    assert z.may_subscribe(ALICE, "sensors/+/x")
    assert not z.may_subscribe(ALICE, "sensors/secret/x")
    # Wholly inside the deny rule: refused at SUBSCRIBE.
    assert not z.may_subscribe(ALICE, "sensors/secret")
    assert not z.may_subscribe(ALICE, "sensors/secret/+/y")

    z = ConfigAuthoriser(
        section(
            acl=[
                {"topic": "sensors/a/#"},
                {"topic": "sensors/#", "allow": False},
                {"topic": "#"},
            ]
        )
    )
    assert z.may_subscribe(ALICE, "sensors/a/+")
    assert z.may_subscribe(ALICE, "sensors/+")  # reaches sensors/a
    assert not z.may_subscribe(ALICE, "sensors/b")
    assert not z.may_subscribe(ALICE, "sensors/b/#")  # wholly denied
    assert z.may_subscribe(ALICE, "other/#")
    assert z.may_subscribe(ALICE, "+/a/#")
    # Topic names (the delivery check): the first matching rule decides.
    assert z.may_subscribe(ALICE, "sensors/a/x")
    assert not z.may_subscribe(ALICE, "sensors/x")
    assert z.may_subscribe(ALICE, "other/x")


def test_filter_covered_only_by_several_deny_rules_is_granted_but_reads_nothing() -> None:
    z = ConfigAuthoriser(
        section(
            acl=[{"topic": "a", "allow": False}, {"topic": "a/+/#", "allow": False}, {"topic": "#"}]
        )
    )
    # Neither deny rule covers "a/#" alone: granted (documented), and every
    # topic it can match is refused at delivery.
    assert z.may_subscribe(ALICE, "a/#")
    for topic in ("a", "a/x", "a/x/y"):
        assert not z.may_subscribe(ALICE, topic)
    assert not z.may_subscribe(ALICE, "a/x/#")  # one deny rule covers it: refused
    assert z.may_subscribe(ALICE, "b")


def test_wildcard_rules_do_not_reach_dollar_topics() -> None:
    z = ConfigAuthoriser(section(acl=[{"topic": "#"}]))
    assert z.may_publish(ALICE, "a/b")
    assert not z.may_publish(ALICE, "$SYS/x")
    assert not z.may_subscribe(ALICE, "$SYS/#")
    z = ConfigAuthoriser(section(acl=[{"topic": "$SYS/#", "access": "subscribe"}, {"topic": "#"}]))
    assert z.may_subscribe(ALICE, "$SYS/broker/+")
    assert not z.may_publish(ALICE, "$SYS/broker/x")


@pytest.mark.parametrize("client_id", ["+", "#", "a/b", "c1/#", "", "x\x00y"])
def test_wildcards_in_client_id_do_not_widen_access(client_id: str) -> None:
    z = ConfigAuthoriser(section(acl=[{"topic": "devices/{client_id}/#"}]))
    evil = Principal(client_id, "mallory")
    assert not z.may_publish(evil, "devices/other/telemetry")
    assert not z.may_publish(evil, f"devices/{client_id}/telemetry")
    assert not z.may_subscribe(evil, "devices/+/#")
    assert not z.may_subscribe(evil, "devices/#")
    assert not z.may_subscribe(evil, f"devices/{client_id}/#")


def test_unsafe_value_makes_deny_rules_fail_closed() -> None:
    z = ConfigAuthoriser(
        section(
            acl=[{"topic": "devices/{client_id}/admin", "allow": False}, {"topic": "devices/#"}]
        )
    )
    assert z.may_publish(Principal("ok", "u"), "devices/other/admin")
    assert not z.may_publish(Principal("ok", "u"), "devices/ok/admin")
    # "a/b" cannot be placed in one level: the deny rule applies to everything.
    assert not z.may_publish(Principal("a/b", "u"), "devices/a/b/admin")
    assert not z.may_publish(Principal("a/b", "u"), "devices/x")


def test_username_deny_rule_does_not_apply_to_anonymous() -> None:
    z = ConfigAuthoriser(
        section(acl=[{"topic": "users/{username}/#", "allow": False}, {"topic": "public/#"}])
    )
    assert z.may_publish(ANON, "public/x")
    assert not z.may_publish(ALICE, "users/alice/x")
    assert z.may_publish(ALICE, "public/x")


def test_decisions_are_cached_per_principal_and_bounded() -> None:
    z = ConfigAuthoriser(section(acl=[{"topic": "sensors/{client_id}/#"}]), cache_max=10)
    for i in range(100):
        assert z.may_publish(ALICE, f"sensors/c1/{i}")
        assert not z.may_publish(BOB, f"sensors/c1/{i}")
        assert z.may_subscribe(BOB, f"sensors/c2/{i}/+")
    assert z.cache_size() <= 20
    # Repeated questions still get the right answers after evictions.
    assert z.may_publish(ALICE, "sensors/c1/0") and not z.may_publish(BOB, "sensors/c1/0")
    # Long topics are decided but never cached.
    before = z.cache_size()
    long_topic = "sensors/c1/" + "x" * 1000
    assert z.may_publish(ALICE, long_topic)
    assert z.cache_size() == before


def test_cache_hit_is_fast() -> None:
    rules = [{"topic": f"zone{i}/{{client_id}}/#"} for i in range(50)]
    z = ConfigAuthoriser(section(acl=rules))
    p = Principal("dev-1", "u")
    assert z.may_publish(p, "zone49/dev-1/t")
    start = time.perf_counter()
    for _ in range(10_000):
        z.may_publish(p, "zone49/dev-1/t")
    per_call = (time.perf_counter() - start) / 10_000
    assert per_call < 20e-6  # a dict lookup, not a walk over 50 rules


def test_bad_acl_topics_are_config_errors() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config('mqtt:\n  acl:\n    - {topic: "a/#/b"}\n    - {topic: "x/{device}"}\n')
    text = str(err.value)
    assert "<config>:3: mqtt.acl[0].topic: '#' must be a whole level and the last one" in text
    assert "<config>:4: mqtt.acl[1].topic: unknown placeholder '{device}'" in text
    with pytest.raises(ConfigError, match="'\\+' must be a whole level"):
        parse_config('mqtt: {acl: [{topic: "a+/b"}]}')
    # Bypassing pydantic validation still cannot build a broken authoriser.
    with pytest.raises(ValueError, match=r"mqtt.acl\[0\].topic"):
        ConfigAuthoriser([AclRule.model_construct(topic="a/#/b", access="all", allow=True)])


def test_require_client_cert_without_ca_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"require_client_cert needs tls\.ca"):
        parse_config(
            "mqtt:\n  listeners:\n    - bind: 127.0.0.1:8883\n"
            "      tls: {cert: s.pem, key: s.key, require_client_cert: true}\n"
        )


def test_group_device_and_device_id_template_rules() -> None:
    z = ConfigAuthoriser(
        section(
            acl=[
                {"device": "boiler-*", "topic": "plant/boilers/#", "access": "publish"},
                {"group": "hall-a", "topic": "halls/a/#"},
                {"device": "*", "topic": "devices/{device_id}/#"},
            ]
        )
    )
    boiler = Principal("c", "boiler-3", groups=frozenset({"hall-a"}))
    pump = Principal("c", "pump-1")
    assert z.may_publish(boiler, "plant/boilers/3")
    assert not z.may_publish(pump, "plant/boilers/3")
    assert z.may_publish(boiler, "halls/a/temp") and not z.may_publish(pump, "halls/a/temp")
    assert z.may_publish(pump, "devices/pump-1/telemetry")
    assert not z.may_publish(pump, "devices/boiler-3/telemetry")
    # Anonymous clients have no device id: the template does not apply.
    assert not z.may_publish(ANON, "devices/None/telemetry")
    # Groups changed (a new principal): decisions follow after invalidate().
    z.invalidate()
    assert not z.may_publish(Principal("c", "boiler-3"), "halls/a/temp")


def test_username_and_device_together_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="username or device"):
        parse_config('mqtt: {acl: [{username: a, device: b, topic: "x"}]}')
