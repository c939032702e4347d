"""PayPal provider: signatures checked with a certificate fetched over real TLS on loopback.

A CA made here signs a PayPal-like certificate and the TLS certificate of a small https server
on 127.0.0.1, which serves the certificates and counts every request it gets. The provider
reaches it only through the test-only keys (test_cert_hosts, test_ca_file).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa

from relay.config import ConfigTable
from relay.errors import ConfigError, InvalidBody, InvalidSignature, Unavailable
from relay.providers.base import WebhookRequest
from relay.providers.paypal import (
    PayPalProvider,
    cert_url,
    generate_dev_certificate,
    issue,
    key_pem,
    make_ca,
    pem,
    sign,
    signed_message,
)
from tests.conftest import Relay, Sandbox
from tests.servers import ThreadedServer

MAPPINGS = Path(__file__).resolve().parent.parent / "mappings"
WEBHOOK_ID = "1JE4291016473214C"
CERT_PATH = "/v1/notifications/certs/CERT-360caa42-fca2a594-a5cafa77"


@dataclass
class Pki:
    ca_key: rsa.RSAPrivateKey
    ca: x509.Certificate
    key: rsa.RSAPrivateKey  # PayPal's signing key
    cert: x509.Certificate
    files: Path
    served: dict[str, bytes] = field(default_factory=dict)


class CertServer:
    """An https server on 127.0.0.1 that serves `served[path]` and records each request."""

    def __init__(self, pki: Pki):
        self.pki = pki
        self.requests: list[str] = []
        self.lock = threading.Lock()
        tls_key, tls_cert = issue(
            pki.ca_key, pki.ca, "127.0.0.1", san=[x509.IPAddress(IPv4Address("127.0.0.1"))]
        )
        (pki.files / "tls-key.pem").write_bytes(key_pem(tls_key))
        (pki.files / "tls-cert.pem").write_bytes(pem(tls_cert))
        self.server = ThreadedServer(
            self.app,
            ssl_keyfile=str(pki.files / "tls-key.pem"),
            ssl_certfile=str(pki.files / "tls-cert.pem"),
            interface="asgi3",
        )

    async def app(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        with self.lock:
            self.requests.append(scope["path"])
        body = self.pki.served.get(scope["path"])
        status = 200 if body is not None else 404
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": body or b"not found"})

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def url(self, path: str = CERT_PATH) -> str:
        return f"https://{self.host}{path}"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    files = tmp_path_factory.mktemp("pki")
    ca_key, ca = make_ca()
    key, cert = issue(ca_key, ca, "messageverificationcerts.paypal.com")
    (files / "ca.pem").write_bytes(pem(ca))
    return Pki(ca_key, ca, key, cert, files)


@pytest.fixture(scope="module")
def server(pki: Pki) -> Iterator[CertServer]:
    srv = CertServer(pki)
    pki.served[CERT_PATH] = pem(pki.cert) + pem(pki.ca)
    srv.server.start()
    yield srv
    srv.server.stop()


@pytest.fixture
def requests_seen(server: CertServer) -> Iterator[list[str]]:
    with server.lock:
        server.requests.clear()
    yield server.requests


def provider(pki: Pki, server: CertServer | None, **extra: Any) -> PayPalProvider:
    data: dict[str, Any] = {"webhook_id": WEBHOOK_ID, "test_ca_file": str(pki.files / "ca.pem")}
    if server is not None:
        data["test_cert_hosts"] = [server.host]
    data.update(extra)
    return PayPalProvider.from_config(ConfigTable(data, pki.files / "relay.toml", "sources.pp"))


def event(event_type: str = "PAYMENT.CAPTURE.COMPLETED") -> dict[str, Any]:
    body = json.loads(
        (MAPPINGS / "examples/paypal/docs-PAYMENT.CAPTURE.COMPLETED.json").read_text()
    )
    body["id"] = f"WH-{uuid.uuid4().hex[:17].upper()}"
    body["event_type"] = event_type
    return dict(body)


def signed_request(
    pki: Pki,
    url: str,
    body: bytes | None = None,
    *,
    key: rsa.RSAPrivateKey | None = None,
    webhook_id: str = WEBHOOK_ID,
    sent: float | None = None,
    received: float | None = None,
) -> WebhookRequest:
    body = json.dumps(event()).encode() if body is None else body
    now = time.time()
    headers = sign(body, key or pki.key, webhook_id, now if sent is None else sent, cert_url=url)
    return WebhookRequest(
        "POST", "https://relay.example/webhooks/paypal", headers, body, received or now
    )


def verify(p: PayPalProvider, request: WebhookRequest) -> None:
    asyncio.run(p.verify_async(request))


def refused(p: PayPalProvider, request: WebhookRequest) -> str:
    with pytest.raises(InvalidSignature) as e:
        verify(p, request)
    return e.value.reason


# --- the signed string -----------------------------------------------------------------------


def test_the_signed_string_is_the_sdks_one() -> None:
    # PayPal-Python-SDK: transmission_id|timestamp|webhook_id|str(crc32(body) & 0xffffffff)
    body = b'{"id":"WH-1","event_type":"PAYMENT.CAPTURE.COMPLETED"}'
    expected = f"tid-1|2016-09-21T22:00:46Z|{WEBHOOK_ID}|{zlib.crc32(body) & 0xFFFFFFFF}"
    assert signed_message("tid-1", "2016-09-21T22:00:46Z", WEBHOOK_ID, body) == expected.encode()
    # The CRC32 is decimal and unsigned, also when its top bit is set.
    assert zlib.crc32(b"\xff" * 3) > 2**31
    assert signed_message("a", "b", "c", b"\xff" * 3).endswith(
        str(zlib.crc32(b"\xff" * 3)).encode()
    )


# --- verification over real TLS ----------------------------------------------------------------


def test_a_valid_webhook_is_verified_and_its_certificate_fetched_once(
    pki: Pki, server: CertServer, requests_seen: list[str]
) -> None:
    p = provider(pki, server)
    verify(p, signed_request(pki, server.url()))
    verify(p, signed_request(pki, server.url()))  # cached
    assert requests_seen == [CERT_PATH]
    p.verify(signed_request(pki, server.url()))  # the sync path uses the cached certificate


def test_a_tampered_body_is_refused(pki: Pki, server: CertServer) -> None:
    p = provider(pki, server)
    request = signed_request(pki, server.url())
    tampered = replace(request, body=request.body.replace(b"2.51", b"2510.00"))
    assert tampered.body != request.body
    assert refused(p, tampered).startswith("no signature matches")
    verify(p, request)


def test_a_wrong_webhook_id_is_refused(pki: Pki, server: CertServer) -> None:
    p = provider(pki, server)
    assert refused(p, signed_request(pki, server.url(), webhook_id="8PT597110X687430LKGECATA"))


def test_a_rotated_list_of_webhook_ids_accepts_either(pki: Pki, server: CertServer) -> None:
    p = provider(pki, server, webhook_id=["OLD-ID", WEBHOOK_ID])
    verify(p, signed_request(pki, server.url()))


FOREIGN = [
    "https://api.paypal.com.evil.example/v1/notifications/certs/CERT-1",
    "https://evil.example/v1/notifications/certs/CERT-1",
    "http://api.paypal.com/v1/notifications/certs/CERT-1",
    "https://api.paypal.com:8443/v1/notifications/certs/CERT-1",
    "https://user:pw@api.paypal.com/v1/notifications/certs/CERT-1",
    "https://127.0.0.1/v1/notifications/certs/CERT-1",
    "https://[::1]/v1/notifications/certs/CERT-1",
    "https://api.paypal.com/v1/notifications/certs/CERT-1?x=1",
    "https://api.paypal.com\\@evil.example/v1/notifications/certs/CERT-1",
    "https://api.paypal.com/v1/../../evil",
    "https://api.paypal.com/v1/notifications/certs/../../oauth2/token",
    "https://api.paypal.com/v1/oauth2/token",
    "https://api.paypal.com",
    "HTTPS://api.paypal.com/v1/notifications/certs/CERT-1",
    "https://api.paypal.com/v1/notifications/certs/CERT-1 ",
    "//api.paypal.com/v1/notifications/certs/CERT-1",
    "https:api.paypal.com/v1/notifications/certs/CERT-1",
]


@pytest.mark.parametrize("url", FOREIGN)
def test_a_certificate_url_off_paypals_hosts_is_refused(url: str) -> None:
    with pytest.raises(InvalidSignature):
        cert_url(url)


@pytest.mark.parametrize(
    "url",
    [
        "https://api.paypal.com/v1/notifications/certs/CERT-360caa42-fca2a594-a5cafa77",
        "https://api.sandbox.paypal.com/v1/notifications/certs/CERT-360caa42-fca2a594-a5cafa77",
        "https://api-m.paypal.com/v1/notifications/certs/CERT-1",
        "https://api-m.sandbox.paypal.com/v1/notifications/certs/CERT-1",
        "https://API.PAYPAL.COM/v1/notifications/certs/CERT-1",
    ],
)
def test_paypals_own_certificate_urls_are_accepted(url: str) -> None:
    assert cert_url(url).lower() == url.lower()


def test_a_foreign_host_is_never_fetched(
    pki: Pki, server: CertServer, requests_seen: list[str]
) -> None:
    p = provider(pki, server)
    for url in [
        f"https://api.paypal.com.{server.host}{CERT_PATH}",
        # the same server, reached by a name the test-only list does not hold
        f"https://localhost:{server.server.port}{CERT_PATH}",
        f"http://{server.host}{CERT_PATH}",
    ]:
        refused(p, signed_request(pki, url))
    # and without the test-only key, loopback is refused like any host that is not PayPal's
    assert "not on a PayPal host" in refused(provider(pki, None), signed_request(pki, server.url()))
    assert requests_seen == []


def test_user_info_before_a_loopback_host_is_refused_with_no_connection(
    pki: Pki, server: CertServer, requests_seen: list[str]
) -> None:
    p = provider(pki, server)
    for url in [
        f"https://api.paypal.com@{server.host}{CERT_PATH}",
        f"https://api.paypal.com:443@{server.host}{CERT_PATH}",
        f"https://{server.host}@api.paypal.com{CERT_PATH}",
    ]:
        assert refused(p, signed_request(pki, url)) == "PAYPAL-CERT-URL carries user info"
    assert requests_seen == []


def test_an_expired_certificate_is_refused(
    pki: Pki, server: CertServer, requests_seen: list[str]
) -> None:
    key, cert = issue(
        pki.ca_key, pki.ca, "messageverificationcerts.paypal.com", start_days=-30, days=29
    )
    pki.served["/certs/expired"] = pem(cert) + pem(pki.ca)
    reason = refused(
        provider(pki, server), signed_request(pki, server.url("/certs/expired"), key=key)
    )
    assert reason == "the PayPal certificate is refused: it has expired"
    assert requests_seen == ["/certs/expired"]


def test_a_certificate_from_an_untrusted_ca_is_refused(pki: Pki, server: CertServer) -> None:
    other_key, other_ca = make_ca("someone else's CA")
    key, cert = issue(other_key, other_ca, "messageverificationcerts.paypal.com")
    pki.served["/certs/foreign-ca"] = pem(cert) + pem(other_ca)  # its own CA in the chain
    reason = refused(
        provider(pki, server), signed_request(pki, server.url("/certs/foreign-ca"), key=key)
    )
    assert reason == "the PayPal certificate is refused: it is not issued by a trusted CA"


def test_a_leaf_cannot_issue_another_certificate(pki: Pki, server: CertServer) -> None:
    # PayPal's own (non-CA) certificate signing a second one must not make a chain.
    key, cert = issue(pki.key, pki.cert, "messageverificationcerts.paypal.com")
    pki.served["/certs/leaf-issued"] = pem(cert) + pem(pki.cert)
    reason = refused(
        provider(pki, server), signed_request(pki, server.url("/certs/leaf-issued"), key=key)
    )
    assert "not issued by a trusted CA" in reason


def test_a_certificate_for_another_subject_is_refused(pki: Pki, server: CertServer) -> None:
    key, cert = issue(pki.ca_key, pki.ca, "www.example.com")
    pki.served["/certs/other-subject"] = pem(cert)
    reason = refused(
        provider(pki, server), signed_request(pki, server.url("/certs/other-subject"), key=key)
    )
    assert "subject is not PayPal's" in reason


def test_a_signature_by_another_key_is_refused(pki: Pki, server: CertServer) -> None:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert refused(provider(pki, server), signed_request(pki, server.url(), key=other))


@pytest.mark.parametrize("age", [-400, 400, 3600 * 24])
def test_a_stale_or_future_transmission_time_is_refused_before_any_fetch(
    pki: Pki, server: CertServer, requests_seen: list[str], age: int
) -> None:
    now = time.time()
    request = signed_request(pki, server.url(), sent=now - age, received=now)
    assert refused(provider(pki, server), request) == (
        "PAYPAL-TRANSMISSION-TIME outside the tolerance"
    )
    assert requests_seen == []
    verify(provider(pki, server, tolerance="2d"), request)


def test_missing_and_malformed_headers_are_named(pki: Pki, server: CertServer) -> None:
    p = provider(pki, server)
    good = signed_request(pki, server.url())
    for name in [
        "paypal-transmission-id",
        "paypal-transmission-time",
        "paypal-transmission-sig",
        "paypal-cert-url",
        "paypal-auth-algo",
    ]:
        headers = {k: v for k, v in good.headers.items() if k != name}
        assert refused(p, replace(good, headers=headers)) == f"missing {name.upper()} header"
    cases = {
        "paypal-auth-algo": ("SHA1withRSA", "PAYPAL-AUTH-ALGO is not SHA256withRSA"),
        "paypal-transmission-time": ("yesterday", "malformed PAYPAL-TRANSMISSION-TIME"),
        "paypal-transmission-sig": ("not base64!", "malformed PAYPAL-TRANSMISSION-SIG: not base64"),
    }
    for name, (value, reason) in cases.items():
        assert refused(p, replace(good, headers={**good.headers, name: value})) == reason


def test_a_certificate_url_that_fails_is_refused_or_retried(pki: Pki, server: CertServer) -> None:
    p = provider(pki, server)
    assert refused(p, signed_request(pki, server.url("/certs/missing"))) == (
        "the PayPal certificate URL answered 404"
    )
    pki.served["/certs/junk"] = b"<html>not a certificate</html>"
    assert refused(p, signed_request(pki, server.url("/certs/junk"))) == (
        "the PayPal certificate is refused: not a PEM certificate"
    )
    pki.served["/certs/huge"] = b"-" * (200 * 1024)
    assert refused(p, signed_request(pki, server.url("/certs/huge"))) == (
        "the PayPal certificate is too large"
    )


def test_an_unreachable_certificate_host_asks_paypal_to_retry(pki: Pki) -> None:
    from tests.servers import free_port

    port = free_port()  # nothing listens there
    p = provider(pki, None, test_cert_hosts=[f"127.0.0.1:{port}"])
    with pytest.raises(Unavailable) as e:
        verify(p, signed_request(pki, f"https://127.0.0.1:{port}{CERT_PATH}"))
    assert e.value.status == 503
    assert "retry later" in e.value.reason


def test_the_cache_is_bounded(pki: Pki, server: CertServer, requests_seen: list[str]) -> None:
    p = provider(pki, server)
    p.certs.size = 2
    for i in range(3):
        pki.served[f"/certs/c{i}"] = pem(pki.cert) + pem(pki.ca)
        verify(p, signed_request(pki, server.url(f"/certs/c{i}")))
    assert len(p.certs.entries) == 2
    verify(p, signed_request(pki, server.url("/certs/c0")))  # evicted: fetched again
    assert requests_seen == ["/certs/c0", "/certs/c1", "/certs/c2", "/certs/c0"]


def test_the_sync_verify_never_fetches(
    pki: Pki, server: CertServer, requests_seen: list[str]
) -> None:
    with pytest.raises(InvalidSignature, match="not fetched yet"):
        provider(pki, server).verify(signed_request(pki, server.url()))
    assert requests_seen == []


# --- events and config -----------------------------------------------------------------------


def test_one_event_per_body_with_id_and_event_type(pki: Pki) -> None:
    p = provider(pki, None)
    body = event("BILLING.SUBSCRIPTION.ACTIVATED")
    [ev] = p.parse(WebhookRequest("POST", "u", {}, json.dumps(body).encode(), 0.0))
    assert (ev.key, ev.type) == (body["id"], "BILLING.SUBSCRIPTION.ACTIVATED")
    for bad in [b"[]", b'{"event_type":"X"}', b'{"id":"WH-1"}', b"nope"]:
        with pytest.raises(InvalidBody):
            p.parse(WebhookRequest("POST", "u", {}, bad, 0.0))


def test_config_errors_name_the_key(pki: Pki, tmp_path: Path) -> None:
    def fails(data: dict[str, Any]) -> str:
        with pytest.raises(ConfigError) as e:
            PayPalProvider.from_config(ConfigTable(data, tmp_path / "relay.toml", "sources.pp"))
        return e.value.message

    assert "sources.pp.webhook_id: is required" in fails({})
    assert "sources.pp.tolerance" in fails({"webhook_id": "X", "tolerance": "0.5s"})
    assert "sources.pp.test_ca_file" in fails({"webhook_id": "X", "test_ca_file": "nope.pem"})
    assert "sources.pp.test_cert_hosts" in fails({"webhook_id": "X", "test_cert_hosts": ["a/b"]})
    (tmp_path / "ec.pem").write_text("junk")
    assert "sources.pp.private_key_file" in fails({"webhook_id": "X", "private_key_file": "ec.pem"})
    # unsigned (verify = "basic" ...): no webhook_id needed
    PayPalProvider.from_config(ConfigTable({}, tmp_path / "relay.toml"), signed=False)


def test_the_dev_certificate_signs_samples_that_verify(tmp_path: Path) -> None:
    settings = generate_dev_certificate(tmp_path / "dev")
    assert (tmp_path / "dev" / "paypal-private.pem").stat().st_mode & 0o077 == 0
    p = PayPalProvider.from_config(ConfigTable(settings, tmp_path / "relay.toml", "sources.pp"))
    for event_type in p.sample_types:
        sample = p.sample(event_type, "http://127.0.0.1/webhooks/paypal", time.time())
        request = WebhookRequest("POST", "u", sample.headers, sample.body, time.time())
        verify(p, request)  # with the dev certificate, nothing is fetched
        [ev] = p.parse(request)
        assert ev.type == event_type
    # the same files the next time
    again = generate_dev_certificate(tmp_path / "dev")
    assert again["test_cert_file"] == settings["test_cert_file"]
    # the dev certificate is checked like a fetched one: the sample's URL is PayPal's
    assert sample.headers["paypal-cert-url"].startswith("https://api.sandbox.paypal.com/")


def test_test_only_keys_are_warned_about(pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="relay.config"):
        provider(pki, None)
    assert "sources.pp: test-only key(s) test_ca_file set" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="relay.config"):
        PayPalProvider.from_config(ConfigTable({"webhook_id": "X"}, pki.files / "r.toml"))
    assert caplog.text == ""


def test_samples_need_a_private_key(pki: Pki) -> None:
    with pytest.raises(ConfigError, match="private_key_file"):
        provider(pki, None).sample(None, "u", time.time())


# --- end to end ------------------------------------------------------------------------------


def test_end_to_end_through_the_relay_with_the_default_mapping(
    pki: Pki,
    server: CertServer,
    sandbox: Sandbox,
    relay_factory: Callable[..., Relay],
) -> None:
    sources = f"""
[sources.paypal]
provider = "paypal"
webhook_id = "{WEBHOOK_ID}"
mapping = "{MAPPINGS / "paypal.toml"}"
test_cert_hosts = ["{server.host}"]
test_ca_file = "{pki.files / "ca.pem"}"
"""
    relay = relay_factory(sandbox, sources=sources)
    body = (MAPPINGS / "examples/paypal/PAYMENT.CAPTURE.COMPLETED.visitor.json").read_bytes()
    headers = sign(body, pki.key, WEBHOOK_ID, time.time(), cert_url=server.url())
    answer = relay.post("paypal", body, headers)
    assert answer.json() == {"ok": True, "accepted": 1, "duplicates": 0}, answer.text
    again = relay.post("paypal", body, sign(body, pki.key, WEBHOOK_ID, cert_url=server.url()))
    assert again.json() == {"ok": True, "accepted": 0, "duplicates": 1}

    [track] = sandbox.wait_for(1)
    assert track["name"] == "purchase"
    assert track["visitor_id"] == "550e8400-e29b-41d4-a716-446655440000"
    assert track["payload"]["amount"] == "49.99"
    assert track["payload"]["order_id"] == "5O190127TN364715T"

    # refused: the gateway's usual 401 with the reason
    tampered = relay.post("paypal", body.replace(b"49.99", b"0.01"), headers)
    assert tampered.status_code == 401
    assert tampered.json()["error"] == "invalid_signature"
    assert tampered.json()["message"].startswith("no signature matches")
    foreign = sign(body, pki.key, WEBHOOK_ID, cert_url=f"https://api.paypal.com@{server.host}/x")
    answer = relay.post("paypal", body, foreign)
    assert (answer.status_code, answer.json()["error"]) == (401, "invalid_signature")
    assert WEBHOOK_ID not in answer.text
    time.sleep(0.5)
    assert len(sandbox.events()) == 1


def test_send_test_paypal_in_a_dev_setup(
    sandbox: Sandbox, relay_factory: Callable[..., Relay], tmp_path: Path
) -> None:
    from click.testing import CliRunner

    from relay.cli import main

    settings = generate_dev_certificate(tmp_path / "dev")
    lines = "\n".join(f"{k} = {json.dumps(v)}" for k, v in settings.items())
    sources = f"""
[sources.paypal]
provider = "paypal"
mapping = "{MAPPINGS / "paypal.toml"}"
{lines}
"""
    relay = relay_factory(sandbox, sources=sources)
    expected = {
        None: "purchase",
        "PAYMENT.CAPTURE.REFUNDED": "refund_issued",
        "BILLING.SUBSCRIPTION.ACTIVATED": "subscription_started",
        "BILLING.SUBSCRIPTION.CANCELLED": "subscription_canceled",
        "CUSTOMER.DISPUTE.CREATED": "dispute_opened",
    }
    for n, event_type in enumerate(expected, start=1):
        args = ["send-test", "paypal", *([event_type] if event_type else [])]
        args += ["--config", str(relay.config_path), "--url", f"{relay.url}/webhooks/paypal"]
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
        assert result.output.splitlines()[-1].startswith("200 "), result.output
        assert settings["webhook_id"] not in result.output
        arrived = sandbox.wait_for(n)
        assert sorted(t["name"] for t in arrived) == sorted(list(expected.values())[:n])


def test_dev_mode_writes_a_paypal_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from relay.config import load_config
    from relay.devmode import write_dev_config

    monkeypatch.chdir(tmp_path)
    path = write_dev_config(8080, tmp_path / ".relay-dev")
    config = load_config(path)
    source = config.sources["paypal"]
    assert isinstance(source.provider, PayPalProvider)
    sample = source.provider.sample(None, "u", time.time())
    verify(source.provider, WebhookRequest("POST", "u", sample.headers, sample.body, time.time()))
    assert datetime.now(UTC).year >= 2024
