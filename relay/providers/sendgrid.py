"""SendGrid's signed Event Webhook: ECDSA P-256 / SHA-256 over timestamp + body; batches.

The verification key is loaded once, at config time, so a bad key stops the relay at start
rather than refusing every webhook. A private key (``private_key_file``) is only for
``relay send-test`` and ``relay dev``, which sign samples the way SendGrid does.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
import secrets
import uuid
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature as BadSignature
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from relay.errors import ConfigError, InvalidBody, InvalidSignature
from relay.providers.base import (
    Provider,
    ProviderEvent,
    Sample,
    WebhookRequest,
    check_age,
    json_events,
)
from relay.settings import ConfigTable

SIGNATURE_HEADER = "X-Twilio-Email-Event-Webhook-Signature"
TIMESTAMP_HEADER = "X-Twilio-Email-Event-Webhook-Timestamp"
PRIVATE_KEY_NAME = "sendgrid-private.pem"
_ECDSA = ec.ECDSA(hashes.SHA256())


class SendGridProvider(Provider):
    kind = "sendgrid"
    # With no type, send-test posts a small batch: processed, delivered, open.
    sample_types = (
        "processed",
        "delivered",
        "open",
        "click",
        "bounce",
        "dropped",
        "deferred",
        "unsubscribe",
        "group_unsubscribe",
        "spamreport",
    )

    def __init__(
        self,
        public_key: ec.EllipticCurvePublicKey | None,
        tolerance: float = 900.0,
        private_key: ec.EllipticCurvePrivateKey | None = None,
        *,
        config_file: str | None = None,
        private_key_key: str = "private_key_file",
    ):
        self.public_key = public_key
        self.tolerance = tolerance
        self.private_key = private_key
        self._config_file = config_file  # where private_key_file would be set, for send-test
        self._private_key_key = private_key_key

    @classmethod
    def from_config(cls, table: ConfigTable, signed: bool = True) -> SendGridProvider:
        text = table.string("public_key", ... if signed else None)
        public_key = None
        if text is not None:
            try:
                public_key = load_public_key(text)
            except ValueError as e:
                table.fail("public_key", str(e))
        tolerance = table.duration("tolerance", "15m")
        path = table.path("private_key_file", None)
        private_key = None
        if path is not None:
            try:
                private_key = load_private_key(path)
            except ValueError as e:
                table.fail("private_key_file", str(e))
            pair = public_key is None or public_key_text(private_key) == public_key_text(public_key)
            if not pair:
                table.fail("private_key_file", "does not pair with public_key: samples would fail")
        return cls(
            public_key,
            tolerance,
            private_key,
            config_file=str(table.file),
            private_key_key=table.key("private_key_file"),
        )

    def verify(self, request: WebhookRequest) -> None:
        if self.public_key is None:
            raise InvalidSignature("no public_key configured")
        signature, timestamp = request.header(SIGNATURE_HEADER), request.header(TIMESTAMP_HEADER)
        if not signature:
            raise InvalidSignature(f"missing {SIGNATURE_HEADER} header")
        if not timestamp:
            raise InvalidSignature(f"missing {TIMESTAMP_HEADER} header")
        try:
            der = base64.b64decode(signature.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise InvalidSignature("malformed signature: not base64") from None
        try:
            self.public_key.verify(der, timestamp.encode() + request.body, _ECDSA)
        except BadSignature:  # also what a signature that is not DER ECDSA gives
            raise InvalidSignature("no signature matches") from None
        except (ValueError, TypeError, UnicodeEncodeError):
            raise InvalidSignature("malformed signature") from None
        check_age(timestamp, request.received_at, self.tolerance)

    def parse(self, request: WebhookRequest) -> list[ProviderEvent]:
        events = []
        for i, item in enumerate(json_events(request, "SendGrid")):
            event_id, event_type = item.get("sg_event_id"), item.get("event")
            if not isinstance(event_id, str) or not event_id:
                raise InvalidBody(f"item {i} has no sg_event_id")
            if not isinstance(event_type, str) or not event_type:
                raise InvalidBody(f"item {i} has no event type")
            events.append(ProviderEvent(key=event_id, type=event_type, data=item))
        return events

    def sample(self, event_type: str | None, url: str, now: float) -> Sample:
        if self.private_key is None:
            raise ConfigError(
                self._config_file,
                self._private_key_key,
                "is needed to sign samples (a PEM P-256 private key; `relay dev` makes one)",
            )
        types = [event_type] if event_type else ["processed", "delivered", "open"]
        body = json.dumps(sample_batch(types, now), separators=(",", ":")).encode() + b"\r\n"
        timestamp = str(int(now))
        return Sample(
            body=body,
            headers={
                "content-type": "application/json",
                SIGNATURE_HEADER.lower(): sign(self.private_key, timestamp, body),
                TIMESTAMP_HEADER.lower(): timestamp,
            },
        )


def sign(private_key: ec.EllipticCurvePrivateKey, timestamp: str, body: bytes) -> str:
    """The signature header SendGrid sends: base64 DER ECDSA over timestamp + body."""
    return base64.b64encode(private_key.sign(timestamp.encode() + body, _ECDSA)).decode()


def load_public_key(text: str) -> ec.EllipticCurvePublicKey:
    """SendGrid's verification key: base64 DER SubjectPublicKeyInfo (PEM also accepted)."""
    try:
        if text.lstrip().startswith("-----BEGIN"):
            key = serialization.load_pem_public_key(text.strip().encode())
        else:
            der = base64.b64decode("".join(text.split()), validate=True)
            key = serialization.load_der_public_key(der)
    except (ValueError, binascii.Error, UnsupportedAlgorithm):
        raise ValueError(
            "is not a SendGrid verification key (base64 DER of an EC public key, "
            "as shown in SendGrid's Mail Settings)"
        ) from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise ValueError("must be an EC P-256 (secp256r1) key, as SendGrid's are")
    return key


def load_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """A PEM P-256 private key from a file; ValueError says what is wrong with it."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ValueError(f"{path} is not an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise ValueError(f"{path} is not an EC P-256 (secp256r1) private key")
    return key


def public_key_text(key: ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey) -> str:
    """A key's public half as SendGrid shows it: base64 DER SubjectPublicKeyInfo."""
    public = key.public_key() if isinstance(key, ec.EllipticCurvePrivateKey) else key
    der = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(der).decode()


def generate_keypair(directory: Path) -> tuple[str, Path]:
    """A P-256 key pair for development, kept in ``directory/sendgrid-private.pem`` (0600).

    Reuses the file when it is there, so a dev setup keeps its public key across runs.
    Returns (public key as base64 DER, private key path).
    """
    path = Path(directory) / PRIVATE_KEY_NAME
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        # Written whole under a temporary name, then linked into place: a reader never sees a
        # half-written key, and if two processes race, the first link wins and both use it.
        tmp = path.with_name(f".{PRIVATE_KEY_NAME}.{secrets.token_hex(6)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(pem)
                f.flush()
                os.fsync(f.fileno())
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    try:
        key = load_private_key(path)
    except ValueError as e:
        raise ConfigError(path, None, f"{e}; delete it to make a new one") from None
    return public_key_text(key), path


def _event_id() -> str:
    return base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")


def sample_batch(types: list[str], now: float) -> list[dict[str, Any]]:
    """Realistic SendGrid events of those types, one message's story, oldest first."""
    message = secrets.token_urlsafe(16)[:22]
    common: dict[str, Any] = {
        "email": "alice@example.com",
        "smtp-id": f"<{message}@geopod-ismtpd-3-0>",
        "sg_message_id": f"{message}.recvd-5f4b9c6d8-x2qkp-1-6630F2A1-B.0",
        "category": ["newsletter", "spring-release"],
        # custom args arrive as extra top-level keys
        "visitor_id": str(uuid.uuid4()),
        "campaign_id": "spring-2024",
    }
    start = int(now) - 5 * (len(types) - 1)
    return [
        {
            **common,
            **_sample_fields(t),
            "event": t,
            "sg_event_id": _event_id(),
            "timestamp": start + 5 * i,
        }
        for i, t in enumerate(types)
    ]


_BROWSER = {
    "useragent": "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 "
    "(KHTML, like Gecko) Chrome/124.0.0.0 Safari/537.36",
    "ip": "203.0.113.7",
}


def _sample_fields(event_type: str) -> dict[str, Any]:
    if event_type == "delivered":
        return {"response": "250 2.0.0 OK  1714550000 x12si1234567qkb.123 - gsmtp", "tls": 1}
    if event_type == "open":
        return {**_BROWSER, "sg_machine_open": False}
    if event_type == "click":
        return {
            **_BROWSER,
            "url": "https://example.com/pricing?utm_source=newsletter",
            "url_offset": {"index": 0, "type": "html"},
        }
    if event_type == "bounce":
        return {
            "type": "bounce",
            "status": "5.1.1",
            "reason": "550 5.1.1 The email account that you tried to reach does not exist.",
            "bounce_classification": "Invalid Address",
            "tls": 1,
        }
    if event_type == "dropped":
        return {"reason": "Bounced Address", "status": "5.0.0"}
    if event_type == "deferred":
        return {"response": "421 4.7.0 Try again later", "attempt": "2", "tls": 1}
    if event_type in ("unsubscribe", "spamreport"):
        return {}
    if event_type == "group_unsubscribe":
        return {**_BROWSER, "asm_group_id": 42}
    return {}
