"""PayPal: the transmission headers, RSA-SHA256 with the certificate at PAYPAL-CERT-URL.

PayPal signs ``transmission_id|transmission_time|webhook_id|crc32(body)`` (the CRC32 of the raw
body in decimal) with the private key of a certificate it publishes at the URL it names in
``PAYPAL-CERT-URL``. As PayPal's own SDKs do, the relay fetches that certificate, checks it
(issued through a chain to a trusted root, within its validity dates, subject
``messageverificationcerts.*.paypal.com``) and checks the signature with its public key.

The URL is the sender's to choose, so it is checked before anything connects to it: only
``https://`` on one of PayPal's API hosts, no port, no user info, no IP literal, a plain path.
A certificate is fetched once per URL (asynchronously, with a short timeout and a size cap) and
kept in a small cache until it expires.

Test-only keys (``test_cert_hosts``, ``test_ca_file``, ``test_cert_file``) let the tests and
``relay dev`` use a locally made CA and certificate; docs/providers.md says what each does.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import re
import ssl
import time
import uuid
import warnings
import zlib
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import certifi
import httpx
from cryptography import x509
from cryptography.exceptions import InvalidSignature as BadSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

from relay.errors import ConfigError, InvalidBody, InvalidSignature, Unavailable
from relay.providers.base import Provider, ProviderEvent, Sample, WebhookRequest, json_body
from relay.settings import ConfigTable, Secret

ID_HEADER = "paypal-transmission-id"
TIME_HEADER = "paypal-transmission-time"
SIG_HEADER = "paypal-transmission-sig"
CERT_URL_HEADER = "paypal-cert-url"
ALGO_HEADER = "paypal-auth-algo"
AUTH_ALGO = "SHA256withRSA"

# The hosts PayPal serves its message-verification certificates from (live and sandbox, the
# classic and the "api-m" names).
PAYPAL_CERT_HOSTS = frozenset(
    {"api.paypal.com", "api-m.paypal.com", "api.sandbox.paypal.com", "api-m.sandbox.paypal.com"}
)
# The certificate's subject common name, as PayPal's SDKs check it.
CN_PREFIX, CN_SUFFIX = "messageverificationcerts.", ".paypal.com"

# Where PayPal publishes them; nothing else on its hosts is ever fetched.
CERT_PATH_PREFIX = "/v1/notifications/certs/"
MAX_URL = 2048
MAX_CERT_BYTES = 64 * 1024
MAX_CHAIN = 8
FETCH_TIMEOUT = 5.0
CACHE_SIZE = 32
# The URL of the certificate `relay dev` makes (it is never fetched: test_cert_file stands in).
DEV_CERT_URL = "https://api.sandbox.paypal.com/v1/notifications/certs/CERT-relay-dev"
DEV_KEY_NAME, DEV_CERT_NAME, DEV_CA_NAME = "paypal-private.pem", "paypal-cert.pem", "paypal-ca.pem"

log = logging.getLogger("relay.config")

_PATH_RE = re.compile(r"/[A-Za-z0-9._~!$&'()*+,;=:@%/-]*")
_HOSTPORT_RE = re.compile(r"[a-z0-9.-]+(:[0-9]{1,5})?")


class CertificateError(ValueError):
    """A certificate PayPal's SDKs would not trust; the message says why."""


def cert_url(value: str, extra_hosts: Iterable[str] = ()) -> str:
    """The certificate URL as it will be fetched, or InvalidSignature without any connection.

    Only https on one of PayPal's hosts (or a test-only host:port), with no user info, port,
    query or fragment, and a plain path under /v1/notifications/certs/. The URL fetched is
    rebuilt from the parts checked.
    """
    if len(value) > MAX_URL or not value.isascii() or not value.isprintable() or " " in value:
        raise InvalidSignature("PAYPAL-CERT-URL is not a plain URL")
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError:
        raise InvalidSignature("PAYPAL-CERT-URL is not a plain URL") from None
    if parts.scheme != "https" or not value.startswith("https://"):
        raise InvalidSignature("PAYPAL-CERT-URL is not https")
    if "@" in parts.netloc or parts.username is not None or parts.password is not None:
        raise InvalidSignature("PAYPAL-CERT-URL carries user info")
    netloc = parts.netloc.lower()
    if not (netloc in PAYPAL_CERT_HOSTS or netloc in set(extra_hosts)):
        if (parts.hostname or "") in PAYPAL_CERT_HOSTS and port is not None:
            raise InvalidSignature("PAYPAL-CERT-URL names a port")
        raise InvalidSignature("PAYPAL-CERT-URL is not on a PayPal host")
    if parts.query or parts.fragment or "?" in value or "#" in value:
        raise InvalidSignature("PAYPAL-CERT-URL has a query or fragment")
    if "\\" in value or not _PATH_RE.fullmatch(parts.path) or "/../" in parts.path + "/":
        raise InvalidSignature("PAYPAL-CERT-URL has an unusual path")
    if netloc in PAYPAL_CERT_HOSTS and not parts.path.startswith(CERT_PATH_PREFIX):
        raise InvalidSignature(f"PAYPAL-CERT-URL is not under {CERT_PATH_PREFIX}")
    return f"https://{netloc}{parts.path}"


def signed_message(
    transmission_id: str, transmission_time: str, webhook_id: str, body: bytes
) -> bytes:
    """What PayPal signs: the three values and the decimal CRC32 of the raw body."""
    return f"{transmission_id}|{transmission_time}|{webhook_id}|{zlib.crc32(body)}".encode()


def parse_time(value: str) -> float:
    """PAYPAL-TRANSMISSION-TIME (ISO 8601, e.g. 2016-09-21T22:00:46Z) as unix seconds."""
    try:
        when = datetime.fromisoformat(value.strip())
    except ValueError:
        raise InvalidSignature("malformed PAYPAL-TRANSMISSION-TIME") from None
    if when.tzinfo is None:
        raise InvalidSignature("PAYPAL-TRANSMISSION-TIME has no time zone")
    return when.timestamp()


def load_pem_chain(data: bytes) -> list[x509.Certificate]:
    try:
        chain = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise CertificateError("not a PEM certificate") from None
    if not chain:
        raise CertificateError("not a PEM certificate")
    if len(chain) > MAX_CHAIN:
        raise CertificateError("too many certificates")
    return chain


def _common_name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    value = names[0].value if names else ""
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


def _in_date(cert: x509.Certificate, now: datetime) -> bool:
    return cert.not_valid_before_utc <= now <= cert.not_valid_after_utc


def _issued(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    if cert.issuer != issuer.subject:
        return False
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, BadSignature):
        return False
    return True


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return False
    return constraints.ca


def check_certificate(
    chain: Sequence[x509.Certificate], roots: Sequence[x509.Certificate], now: datetime
) -> rsa.RSAPublicKey:
    """The leaf's RSA key when the chain holds as PayPal's SDKs check it, else CertificateError.

    The first certificate is PayPal's; the others may be intermediates. Each link is signed by
    the next, every issuer is a CA, every certificate is within its dates, and the chain ends at
    one of ``roots``. The leaf's common name is messageverificationcerts.*.paypal.com.
    """
    leaf = chain[0]
    cn = _common_name(leaf).lower()
    if not (cn.startswith(CN_PREFIX) and cn.endswith(CN_SUFFIX)):
        raise CertificateError("its subject is not PayPal's message verification certificate")
    pool = list(chain[1:])
    current = leaf
    for _ in range(MAX_CHAIN + 1):
        if not _in_date(current, now):
            raise CertificateError(
                "it has expired" if now > current.not_valid_after_utc else "it is not valid yet"
            )
        root = next((r for r in roots if _issued(current, r)), None)
        if root is not None:
            if not _is_ca(root) or not _in_date(root, now):
                raise CertificateError("its root is not a valid CA")
            break
        issuer = next((c for c in pool if c is not current and _issued(current, c)), None)
        if issuer is None or not _is_ca(issuer):
            raise CertificateError("it is not issued by a trusted CA")
        pool.remove(issuer)
        current = issuer
    else:
        raise CertificateError("its chain is too long")
    key = leaf.public_key()
    if not isinstance(key, rsa.RSAPublicKey):
        raise CertificateError("its key is not RSA")
    return key


def load_roots(path: Path | None) -> list[x509.Certificate]:
    """Trusted roots: the test-only CA file, else the Mozilla bundle (certifi)."""
    data = path.read_bytes() if path is not None else Path(certifi.where()).read_bytes()
    with warnings.catch_warnings():  # a few old roots have serial numbers RFC 5280 disallows
        warnings.simplefilter("ignore")
        return x509.load_pem_x509_certificates(data)


@dataclass
class _Cached:
    chain: list[x509.Certificate]
    key: rsa.RSAPublicKey
    not_after: datetime


class CertificateCache:
    """Checked PayPal certificates by URL: bounded, least recently used out first."""

    def __init__(
        self,
        roots: list[x509.Certificate] | None = None,
        *,
        tls: ssl.SSLContext | None = None,
        size: int = CACHE_SIZE,
        timeout: float = FETCH_TIMEOUT,
        max_bytes: int = MAX_CERT_BYTES,
    ):
        self._roots = roots
        self.tls = tls
        self.size = size
        self.timeout = timeout
        self.max_bytes = max_bytes
        self.entries: OrderedDict[str, _Cached] = OrderedDict()
        self.fetches = 0
        self._lock: asyncio.Lock | None = None
        self._lock_loop: asyncio.AbstractEventLoop | None = None

    @property
    def roots(self) -> list[x509.Certificate]:
        """The trusted roots; the default bundle is read the first time one is needed."""
        if self._roots is None:
            self._roots = load_roots(None)
        return self._roots

    def cached(self, url: str, now: datetime) -> rsa.RSAPublicKey | None:
        entry = self.entries.get(url)
        if entry is None:
            return None
        if now > entry.not_after:
            del self.entries[url]
            return None
        self.entries.move_to_end(url)
        return entry.key

    def put(self, url: str, chain: list[x509.Certificate], now: datetime) -> rsa.RSAPublicKey:
        key = check_certificate(chain, self.roots, now)
        not_after = min(c.not_valid_after_utc for c in chain)
        self.entries[url] = _Cached(chain, key, not_after)
        self.entries.move_to_end(url)
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)
        return key

    def _fetch_lock(self) -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        if self._lock is None or self._lock_loop is not loop:
            self._lock, self._lock_loop = asyncio.Lock(), loop
        return self._lock

    async def get(self, url: str, now: datetime) -> rsa.RSAPublicKey:
        """The checked key of the certificate at ``url`` (already checked by cert_url)."""
        key = self.cached(url, now)
        if key is not None:
            return key
        async with self._fetch_lock():  # one fetch at a time; a second asker finds it cached
            key = self.cached(url, now)
            if key is not None:
                return key
            data = await self._download(url)
            try:
                return self.put(url, load_pem_chain(data), now)
            except CertificateError as e:
                raise InvalidSignature(f"the PayPal certificate is refused: {e}") from None

    async def _download(self, url: str) -> bytes:
        self.fetches += 1
        verify: ssl.SSLContext | bool = self.tls if self.tls is not None else True
        try:
            async with (
                httpx.AsyncClient(
                    verify=verify, timeout=self.timeout, follow_redirects=False, trust_env=False
                ) as client,
                client.stream("GET", url, headers={"accept": "*/*"}) as response,
            ):
                if response.status_code >= 500 or response.status_code == 429:
                    raise Unavailable(
                        f"PayPal's certificate host answered {response.status_code}; retry later"
                    )
                if response.status_code != 200:
                    raise InvalidSignature(
                        f"the PayPal certificate URL answered {response.status_code}"
                    )
                data = bytearray()
                async for chunk in response.aiter_bytes():
                    data += chunk
                    if len(data) > self.max_bytes:
                        raise InvalidSignature("the PayPal certificate is too large")
                return bytes(data)
        except httpx.HTTPError as e:
            raise Unavailable(
                f"PayPal's certificate could not be fetched ({type(e).__name__}); retry later"
            ) from None


class PayPalProvider(Provider):
    kind = "paypal"
    sample_types = (
        "PAYMENT.CAPTURE.COMPLETED",
        "PAYMENT.CAPTURE.REFUNDED",
        "BILLING.SUBSCRIPTION.ACTIVATED",
        "BILLING.SUBSCRIPTION.CANCELLED",
        "CUSTOMER.DISPUTE.CREATED",
    )

    def __init__(
        self,
        webhook_ids: tuple[Secret, ...],
        tolerance: float = 300.0,
        *,
        certs: CertificateCache | None = None,
        test_hosts: tuple[str, ...] = (),
        pinned: list[x509.Certificate] | None = None,
        private_key: rsa.RSAPrivateKey | None = None,
        config_file: str | None = None,
        private_key_key: str = "private_key_file",
    ):
        self.webhook_ids = webhook_ids
        self.tolerance = tolerance
        self.certs = certs if certs is not None else CertificateCache()
        self.test_hosts = test_hosts
        self.pinned = pinned
        self.private_key = private_key
        self._config_file = config_file
        self._private_key_key = private_key_key

    @classmethod
    def from_config(cls, table: ConfigTable, signed: bool = True) -> PayPalProvider:
        webhook_ids = table.secrets("webhook_id", ... if signed else ())
        tolerance: float = table.duration("tolerance", "5m")
        if tolerance < 1:
            table.fail("tolerance", "must be at least 1s (PayPal's times are whole seconds)")
        hosts = table.strings("test_cert_hosts", ())
        for host in hosts:
            if not _HOSTPORT_RE.fullmatch(host):
                table.fail("test_cert_hosts", f"must hold host or host:port names, not {host!r}")
        ca_file = table.path("test_ca_file", None)
        roots: list[x509.Certificate] | None = None  # None: the default bundle, when needed
        tls: ssl.SSLContext | None = None
        if ca_file is not None:
            try:
                roots = load_roots(ca_file)
                tls = ssl.create_default_context(cafile=str(ca_file))
            except (OSError, ValueError, ssl.SSLError) as e:
                table.fail("test_ca_file", f"cannot be read as PEM certificates: {e}")
            if not roots:
                table.fail("test_ca_file", "holds no certificate")
        pinned = None
        cert_file = table.path("test_cert_file", None)
        if cert_file is not None:
            try:
                pinned = load_pem_chain(cert_file.read_bytes())
            except (OSError, CertificateError) as e:
                table.fail("test_cert_file", f"cannot be read as a PEM certificate: {e}")
        private_key = None
        key_file = table.path("private_key_file", None)
        if key_file is not None:
            try:
                loaded = serialization.load_pem_private_key(key_file.read_bytes(), None)
            except (OSError, ValueError, TypeError) as e:
                table.fail("private_key_file", f"cannot be read as a PEM private key: {e}")
            if not isinstance(loaded, rsa.RSAPrivateKey):
                table.fail("private_key_file", "is not an RSA private key")
            private_key = loaded
        used = [k for k in ("test_cert_hosts", "test_ca_file", "test_cert_file") if k in table]
        if used:
            log.warning(
                "%s: test-only key(s) %s set: this source trusts certificates that are not "
                "PayPal's (for tests and relay dev only)",
                table.prefix or "paypal",
                ", ".join(used),
            )
        return cls(
            webhook_ids,
            tolerance,
            certs=CertificateCache(roots, tls=tls),
            test_hosts=tuple(h.lower() for h in hosts),
            pinned=pinned,
            private_key=private_key,
            config_file=str(table.file),
            private_key_key=table.key("private_key_file"),
        )

    # --- verification -------------------------------------------------------------------------

    def _checked(self, request: WebhookRequest) -> tuple[str, str, bytes, str]:
        """The headers checked without any connection: (id, time, signature, cert URL)."""
        if not self.webhook_ids:
            raise InvalidSignature("no webhook_id configured")
        values = {}
        for name in (ID_HEADER, TIME_HEADER, SIG_HEADER, CERT_URL_HEADER, ALGO_HEADER):
            value = request.header(name)
            if not value:
                raise InvalidSignature(f"missing {name.upper()} header")
            values[name] = value
        if values[ALGO_HEADER].strip() != AUTH_ALGO:
            raise InvalidSignature(f"PAYPAL-AUTH-ALGO is not {AUTH_ALGO}")
        url = cert_url(values[CERT_URL_HEADER].strip(), self.test_hosts)
        sent = parse_time(values[TIME_HEADER])
        if abs(request.received_at - sent) > self.tolerance:
            raise InvalidSignature("PAYPAL-TRANSMISSION-TIME outside the tolerance")
        try:
            signature = base64.b64decode(values[SIG_HEADER].strip(), validate=True)
        except (binascii.Error, ValueError):
            raise InvalidSignature("malformed PAYPAL-TRANSMISSION-SIG: not base64") from None
        return values[ID_HEADER], values[TIME_HEADER], signature, url

    def _now(self, request: WebhookRequest) -> datetime:
        return datetime.fromtimestamp(request.received_at, UTC)

    def _check_signature(
        self, key: rsa.RSAPublicKey, request: WebhookRequest, tid: str, ttime: str, sig: bytes
    ) -> None:
        for webhook_id in self.webhook_ids:
            message = signed_message(tid, ttime, webhook_id.reveal(), request.body)
            try:
                key.verify(sig, message, padding.PKCS1v15(), hashes.SHA256())
            except BadSignature:
                continue
            except (ValueError, TypeError):
                raise InvalidSignature("malformed PAYPAL-TRANSMISSION-SIG") from None
            return
        raise InvalidSignature("no signature matches (body, transmission or webhook_id differ)")

    def _pinned_key(self, now: datetime) -> rsa.RSAPublicKey:
        assert self.pinned is not None
        try:
            return check_certificate(self.pinned, self.certs.roots, now)
        except CertificateError as e:
            raise InvalidSignature(f"the PayPal certificate is refused: {e}") from None

    async def verify_async(self, request: WebhookRequest) -> None:
        """Verify, fetching the certificate first when it is not cached. What the relay calls."""
        tid, ttime, sig, url = self._checked(request)
        now = self._now(request)
        if self.pinned is not None:
            key = self._pinned_key(now)
        else:
            key = await self.certs.get(url, now)
        self._check_signature(key, request, tid, ttime, sig)

    def verify(self, request: WebhookRequest) -> None:
        """Verify with a certificate already cached (this one never connects anywhere)."""
        tid, ttime, sig, url = self._checked(request)
        now = self._now(request)
        if self.pinned is not None:
            key = self._pinned_key(now)
        else:
            cached = self.certs.cached(url, now)
            if cached is None:
                raise InvalidSignature("the PayPal certificate is not fetched yet")
            key = cached
        self._check_signature(key, request, tid, ttime, sig)

    # --- events -------------------------------------------------------------------------------

    def parse(self, request: WebhookRequest) -> list[ProviderEvent]:
        body = json_body(request)
        if not isinstance(body, dict):
            raise InvalidBody("a PayPal event is a JSON object")
        event_id, event_type = body.get("id"), body.get("event_type")
        if not isinstance(event_id, str) or not event_id:
            raise InvalidBody("the event has no id")
        if not isinstance(event_type, str) or not event_type:
            raise InvalidBody("the event has no event_type")
        return [ProviderEvent(key=event_id, type=event_type, data=body)]

    def sample(self, event_type: str | None, url: str, now: float) -> Sample:
        if self.private_key is None or not self.webhook_ids:
            raise ConfigError(
                self._config_file,
                self._private_key_key,
                "is needed to sign samples (an RSA key of a test certificate; `relay dev` "
                "makes one)",
            )
        event = sample_event(event_type or self.sample_types[0], now)
        body = json.dumps(event, separators=(",", ":")).encode()
        return Sample(
            body=body, headers=sign(body, self.private_key, self.webhook_ids[0].reveal(), now)
        )


def sign(
    body: bytes,
    private_key: rsa.RSAPrivateKey,
    webhook_id: str,
    now: float | None = None,
    *,
    cert_url: str = DEV_CERT_URL,
    transmission_id: str | None = None,
) -> dict[str, str]:
    """The headers PayPal would send with body, signed with a test certificate's key."""
    when = datetime.fromtimestamp(time.time() if now is None else now, UTC)
    ttime = when.strftime("%Y-%m-%dT%H:%M:%SZ")
    tid = transmission_id or str(uuid.uuid1())
    sig = private_key.sign(
        signed_message(tid, ttime, webhook_id, body), padding.PKCS1v15(), hashes.SHA256()
    )
    return {
        "content-type": "application/json",
        "paypal-transmission-id": tid,
        "paypal-transmission-time": ttime,
        "paypal-transmission-sig": base64.b64encode(sig).decode(),
        "paypal-cert-url": cert_url,
        "paypal-auth-algo": AUTH_ALGO,
    }


def _pid(n: int = 17) -> str:
    return uuid.uuid4().hex[:n].upper()


def sample_event(event_type: str, now: float | None = None) -> dict[str, Any]:
    """A PayPal event of that type, shaped as the bodies in PayPal's documentation."""
    when = datetime.fromtimestamp(time.time() if now is None else now, UTC)
    stamp = when.strftime("%Y-%m-%dT%H:%M:%SZ")
    visitor = str(uuid.uuid4())
    resource: dict[str, Any]
    resource_type = event_type.split(".")[1].lower() if "." in event_type else "event"
    if event_type == "PAYMENT.CAPTURE.COMPLETED":
        resource_type = "capture"
        resource = {
            "id": _pid(),
            "status": "COMPLETED",
            "amount": {"currency_code": "USD", "value": "49.99"},
            "final_capture": True,
            "custom_id": visitor,
            "invoice_id": f"INV-{_pid(8)}",
            "seller_receivable_breakdown": {
                "gross_amount": {"currency_code": "USD", "value": "49.99"},
                "paypal_fee": {"currency_code": "USD", "value": "2.04"},
                "net_amount": {"currency_code": "USD", "value": "47.95"},
            },
            "supplementary_data": {"related_ids": {"order_id": _pid()}},
            "create_time": stamp,
            "update_time": stamp,
        }
    elif event_type == "PAYMENT.CAPTURE.REFUNDED":
        resource_type = "refund"
        resource = {
            "id": _pid(),
            "status": "COMPLETED",
            "amount": {"currency_code": "USD", "value": "49.99"},
            "custom_id": visitor,
            "seller_payable_breakdown": {
                "gross_amount": {"currency_code": "USD", "value": "49.99"},
                "total_refunded_amount": {"currency_code": "USD", "value": "49.99"},
            },
            "links": [
                {
                    "href": f"https://api.sandbox.paypal.com/v2/payments/captures/{_pid()}",
                    "rel": "up",
                    "method": "GET",
                }
            ],
            "create_time": stamp,
            "update_time": stamp,
        }
    elif event_type.startswith("BILLING.SUBSCRIPTION."):
        resource_type = "subscription"
        status = "CANCELLED" if event_type.endswith("CANCELLED") else "ACTIVE"
        resource = {
            "id": f"I-{_pid(12)}",
            "plan_id": f"P-{_pid(24)}",
            "status": status,
            "custom_id": visitor,
            "quantity": "1",
            "start_time": stamp,
            "status_update_time": stamp,
            "billing_info": {
                "last_payment": {
                    "amount": {"currency_code": "USD", "value": "14.99"},
                    "time": stamp,
                },
                "failed_payments_count": 0,
            },
            "subscriber": {"payer_id": _pid(13), "email_address": "buyer@example.com"},
            "create_time": stamp,
            "update_time": stamp,
        }
    elif event_type.startswith("CUSTOMER.DISPUTE."):
        resource_type = "dispute"
        resource = {
            "dispute_id": f"PP-D-{_pid(5)}",
            "reason": "MERCHANDISE_OR_SERVICE_NOT_RECEIVED",
            "status": "OPEN",
            "dispute_amount": {"currency_code": "USD", "value": "49.99"},
            "dispute_life_cycle_stage": "INQUIRY",
            "disputed_transactions": [{"seller_transaction_id": _pid(), "custom": visitor}],
            "create_time": stamp,
            "update_time": stamp,
        }
    else:
        resource = {"id": _pid(), "create_time": stamp}
    return {
        "id": f"WH-{_pid()}-{_pid()}",
        "event_version": "1.0",
        "create_time": when.strftime("%Y-%m-%dT%H:%M:%S.000Z"),
        "resource_type": resource_type,
        "resource_version": "2.0",
        "event_type": event_type,
        "summary": f"{event_type} (a sample from relay send-test)",
        "resource": resource,
    }


# --- a local CA and certificate, for relay dev and the tests ---------------------------------


def make_ca(common_name: str = "relay test CA") -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
    """A self-signed CA, valid for ten years."""
    from datetime import timedelta

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def issue(
    ca_key: rsa.RSAPrivateKey,
    ca_cert: x509.Certificate,
    common_name: str = "messageverificationcerts.sandbox.paypal.com",
    *,
    days: float = 365,
    start_days: float = -1,
    san: Sequence[x509.GeneralName] = (),
) -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
    """A leaf certificate signed by the CA (valid from ``start_days`` for ``days``)."""
    from datetime import timedelta

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + timedelta(days=start_days))
        .not_valid_after(now + timedelta(days=start_days + days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(san)), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def generate_dev_certificate(directory: Path) -> dict[str, str]:
    """For `relay dev`: a local CA and a PayPal-like certificate, kept in ``directory``.

    Returns the source settings: a webhook id, the signing key (for send-test), the test-only
    CA the relay trusts and the certificate it uses in place of fetching one.
    """
    directory = Path(directory)
    key_path, cert_path, ca_path = (
        directory / DEV_KEY_NAME,
        directory / DEV_CERT_NAME,
        directory / DEV_CA_NAME,
    )
    if not (key_path.is_file() and cert_path.is_file() and ca_path.is_file()):
        directory.mkdir(parents=True, exist_ok=True)
        ca_key, ca_cert = make_ca("relay dev PayPal CA")
        key, cert = issue(ca_key, ca_cert, days=3650)
        ca_path.write_bytes(pem(ca_cert))
        cert_path.write_bytes(pem(cert))
        key_path.touch(0o600)
        key_path.write_bytes(key_pem(key))
    return {
        "webhook_id": f"WH-DEV-{_pid(16)}",
        "private_key_file": str(key_path.resolve()),
        "test_ca_file": str(ca_path.resolve()),
        "test_cert_file": str(cert_path.resolve()),
    }
