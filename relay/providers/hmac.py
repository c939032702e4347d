"""Generic HMAC: a sender's signature scheme described in config alone.

Most senders sign with one HMAC over the body (sometimes with a timestamp) and put it in one
header; they differ only in the details this provider reads from config: header name,
algorithm, encoding, prefix, what is signed, and where the event id and type are. Shopify,
Intercom, Typeform, Calendly and Close are all expressible; see docs/providers-generic.md.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import string
import uuid
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from relay.errors import InvalidBody, InvalidSignature
from relay.providers.base import (
    LoneSurrogate,
    Provider,
    ProviderEvent,
    Sample,
    WebhookRequest,
    check_age,
    loads,
    no_match,
)
from relay.settings import ConfigTable, Secret

ALGORITHMS = ("sha1", "sha256", "sha512")
TEMPLATE_FIELDS = ("timestamp", "body", "id", "method", "url")


def config_url(table: ConfigTable, name: str) -> str | None:
    """An optional absolute http(s) URL from config."""
    url: str | None = table.string(name, None)
    if url is not None and not url.startswith(("http://", "https://")):
        table.fail(name, f"must be an http:// or https:// URL, not {url!r}")
    return url


def called_url(public_url: str | None, request_url: str) -> str:
    """The URL the sender called: ``public_url`` (behind a proxy) or the one received.

    A ``public_url`` without a query string gets the request's: proxies pass it through, and
    senders sign the whole URL they called.
    """
    if public_url is None:
        return request_url
    if "?" in public_url:
        return public_url
    query = urlsplit(request_url).query
    return f"{public_url}?{query}" if query else public_url


def _template(table: ConfigTable, name: str, text: str) -> tuple[tuple[str, str | None], ...]:
    """Split a `signed` template into (literal, field) pairs; fields from TEMPLATE_FIELDS."""
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as e:
        table.fail(name, f"is not a valid template: {e}")
    parts: list[tuple[str, str | None]] = []
    for literal, field, spec, conversion in parsed:
        if field is not None and (field not in TEMPLATE_FIELDS or spec or conversion):
            known = ", ".join("{" + f + "}" for f in TEMPLATE_FIELDS)
            table.fail(name, f"unknown placeholder {{{field}}}: use {known}")
        parts.append((literal, field))
    return tuple(parts)


def _path(table: ConfigTable, name: str, value: str) -> tuple[str, ...]:
    parts = tuple(value.split("."))
    if not all(parts):
        table.fail(name, f"{value!r} is not a dotted path such as 'id' or 'event.id'")
    return parts


def _nonempty(table: ConfigTable, name: str) -> str | None:
    value: str | None = table.string(name, None)
    if value is not None and not value.strip():
        table.fail(name, "is empty")
    return value.strip() if value is not None else None


def _header(table: ConfigTable, name: str) -> str | None:
    value = _nonempty(table, name)
    return value.lower() if value is not None else None


def _lookup(data: Any, path: tuple[str, ...]) -> Any:
    for part in path:
        if not isinstance(data, Mapping) or part not in data:
            return None
        data = data[part]
    return data


def _decode_key(secret: Secret, encoding: str) -> bytes:
    text = secret.reveal()
    if encoding == "hex":
        return bytes.fromhex(text)
    if encoding == "base64":
        return base64.b64decode(text, validate=True)
    return text.encode()


class HmacProvider(Provider):
    kind = "hmac"

    def __init__(
        self,
        *,
        secrets: tuple[Secret, ...],
        signature_header: str | None,
        algorithm: str = "sha256",
        encoding: str = "hex",
        prefix: str = "",
        signed: tuple[tuple[str, str | None], ...] = (("", "body"),),
        timestamp_header: str | None = None,
        signature_key: str | None = None,
        timestamp_key: str | None = None,
        timestamp_unit: str = "s",
        tolerance: float = 300.0,
        key_encoding: str = "utf8",
        public_url: str | None = None,
        id_header: str | None = None,
        id_field: tuple[str, ...] | None = None,
        type_header: str | None = None,
        type_fields: tuple[tuple[str, ...], ...] = (),
        type_constant: str | None = None,
        by_signature: bool = True,
    ):
        self.secrets = secrets
        self.signature_header = signature_header
        self.algorithm = algorithm
        self.encoding = encoding
        self.prefix = prefix
        self.signed = signed
        self.timestamp_header = timestamp_header
        self.signature_key = signature_key
        self.timestamp_key = timestamp_key
        self.timestamp_unit = timestamp_unit
        self.tolerance = tolerance
        self.key_encoding = key_encoding
        self.public_url = public_url
        self.id_header = id_header
        self.id_field = id_field
        self.type_header = type_header
        self.type_fields = type_fields
        self.type_constant = type_constant
        # An id header outside `signed` cannot be trusted: the body is the dedupe key then.
        # Basic auth or a token (by_signature false) vouches for every header of the request.
        self.id_signed = not by_signature or id_header is None or any(f == "id" for _, f in signed)

    @property
    def timestamped(self) -> bool:
        return self.timestamp_header is not None or self.timestamp_key is not None

    @classmethod
    def from_config(cls, table: ConfigTable, signed: bool = True) -> HmacProvider:
        secrets = table.secrets("secret", ... if signed else ())
        signature_header = _header(table, "signature_header")
        if signed and signature_header is None:
            table.fail("signature_header", "is required: the header that carries the signature")
        key_encoding = table.string("key_encoding", "utf8", choices=("utf8", "hex", "base64"))
        for secret in secrets:
            try:
                _decode_key(secret, key_encoding)
            except (ValueError, binascii.Error):
                table.fail("secret", f"is not valid {key_encoding} (see key_encoding)")
        prefix = table.string("prefix", "")
        signature_key = _nonempty(table, "signature_key")
        timestamp_key = _nonempty(table, "timestamp_key")
        timestamp_header = _header(table, "timestamp_header")
        if prefix and signature_key:
            table.fail("prefix", "cannot be used with signature_key (the key names the value)")
        if timestamp_key and not signature_key:
            table.fail("timestamp_key", "needs signature_key (a 't=...,v1=...' header has both)")
        if timestamp_key and timestamp_header:
            table.fail("timestamp_header", "use timestamp_header or timestamp_key, not both")
        template = _template(table, "signed", table.string("signed", "{body}"))
        fields = {field for _, field in template if field}
        timestamped = timestamp_header is not None or timestamp_key is not None
        if "timestamp" in fields and not timestamped:
            table.fail("signed", "uses {timestamp}: set timestamp_header or timestamp_key")
        if timestamped and "timestamp" not in fields:
            table.fail("signed", "must include {timestamp}: an unsigned timestamp proves nothing")
        if signed and "body" not in fields:
            table.fail(
                "signed",
                "must include {body}: a signature that does not cover the body lets anyone "
                "change it",
            )

        id_header = _header(table, "id_header")
        id_field = _nonempty(table, "id_field")
        if id_header and id_field is not None:
            table.fail("id_field", "use id_header or id_field, not both")
        if "id" in fields and not id_header:
            table.fail("signed", "uses {id}: set id_header")

        type_header = _header(table, "type_header")
        type_field: tuple[str, ...] | None = table.strings("type_field", None)
        type_constant = _nonempty(table, "type")
        if sum(x is not None for x in (type_header, type_field, type_constant)) > 1:
            table.fail("type", "use one of type_header, type_field or type")
        if type_field == ():
            table.fail("type_field", "must be a dotted path or a list of them (joined with '.')")

        return cls(
            secrets=secrets,
            signature_header=signature_header,
            algorithm=table.string("algorithm", "sha256", choices=ALGORITHMS),
            encoding=table.string("encoding", "hex", choices=("hex", "base64")),
            prefix=prefix,
            signed=template,
            timestamp_header=timestamp_header,
            signature_key=signature_key,
            timestamp_key=timestamp_key,
            timestamp_unit=table.string("timestamp_unit", "s", choices=("s", "ms")),
            tolerance=table.duration("tolerance", "5m"),
            key_encoding=key_encoding,
            public_url=config_url(table, "public_url"),
            id_header=id_header,
            id_field=_path(table, "id_field", id_field) if id_field is not None else None,
            type_header=type_header,
            type_fields=tuple(_path(table, "type_field", f) for f in type_field or ()),
            type_constant=type_constant,
            by_signature=signed,
        )

    # -- signing -------------------------------------------------------------------------

    def _message(
        self, body: bytes, method: str, url: str, timestamp: str | None, msg_id: str | None
    ) -> bytes:
        values = {
            "body": body,
            "method": method.upper().encode(),
            "url": called_url(self.public_url, url).encode(),
            "timestamp": (timestamp or "").encode(),
            "id": (msg_id or "").encode(),
        }
        return b"".join(literal.encode() + (values[f] if f else b"") for literal, f in self.signed)

    def _digest(self, secret: Secret, message: bytes) -> str:
        digest = hmac.new(_decode_key(secret, self.key_encoding), message, self.algorithm).digest()
        return digest.hex() if self.encoding == "hex" else base64.b64encode(digest).decode()

    def _header_value(self, signature: str, timestamp: str | None) -> str:
        if not self.signature_key:
            return self.prefix + signature
        pairs = [f"{self.timestamp_key}={timestamp}"] if self.timestamp_key else []
        return ",".join([*pairs, f"{self.signature_key}={signature}"])

    def _read_header(self, raw: str) -> tuple[list[str], str | None]:
        """The signatures and the timestamp a signature header holds."""
        if not self.signature_key:
            if not raw.startswith(self.prefix):
                raise InvalidSignature(f"malformed signature header (expected {self.prefix!r})")
            return [raw[len(self.prefix) :].strip()], None
        pairs = [part.strip().partition("=") for part in raw.split(",")]
        signatures = [v.strip() for k, sep, v in pairs if sep and k.strip() == self.signature_key]
        timestamps = [v.strip() for k, sep, v in pairs if sep and k.strip() == self.timestamp_key]
        if not signatures:
            raise InvalidSignature(f"malformed signature header (no {self.signature_key}=)")
        return signatures, timestamps[0] if timestamps else None

    def verify(self, request: WebhookRequest) -> None:
        assert self.signature_header is not None  # required when signatures are checked
        raw = request.header(self.signature_header)
        if not raw:
            raise InvalidSignature(f"missing {self.signature_header} header")
        given, timestamp = self._read_header(raw.strip())
        if self.timestamp_header:
            timestamp = request.header(self.timestamp_header)
        if self.timestamped:
            scale = 1000.0 if self.timestamp_unit == "ms" else 1.0
            check_age(timestamp, request.received_at, self.tolerance, scale=scale)
        msg_id = request.header(self.id_header) if self.id_header else None
        if any(f == "id" for _, f in self.signed) and not msg_id:
            raise InvalidSignature(f"missing {self.id_header} header")
        message = self._message(request.body, request.method, request.url, timestamp, msg_id)
        if self.encoding == "hex":
            given = [g.lower() for g in given]
        for secret in self.secrets:
            expected = self._digest(secret, message).encode()
            # Compare with every given signature, so timing says nothing about which one.
            if sum(hmac.compare_digest(expected, g.encode("utf-8", "replace")) for g in given):
                return
        raise InvalidSignature("no signature matches", no_match(len(self.secrets)))

    # -- events --------------------------------------------------------------------------

    def parse(self, request: WebhookRequest) -> list[ProviderEvent]:
        try:
            parsed = loads(request.body)
        except LoneSurrogate as e:
            raise InvalidBody(str(e)) from None
        except (UnicodeDecodeError, ValueError, RecursionError):
            parsed = None
        if isinstance(parsed, dict):
            data: dict[str, Any] = parsed
        elif self.id_field or self.type_fields:
            raise InvalidBody("the body must be a JSON object (id_field or type_field reads it)")
        else:
            data = {"body": request.body.decode("utf-8", "replace")}
        key, kind = self._id(request, data), self._type(request, data)
        return [ProviderEvent(key=key, type=kind, data=data)]

    def _id(self, request: WebhookRequest, data: dict[str, Any]) -> str:
        """The dedupe key, from signed bytes only: an id (or a type) in a header that the
        signature does not cover could be rewritten on a replayed body, which would count
        again. The body's SHA-256 then stands in for the id."""
        if self.id_header and self.id_signed:
            value = request.header(self.id_header)
            if not value:
                raise InvalidBody(f"missing {self.id_header} header")
            return value
        if self.id_field:
            found = _lookup(data, self.id_field)
            if isinstance(found, bool) or not isinstance(found, str | int) or found == "":
                raise InvalidBody(f"the body has no {'.'.join(self.id_field)}")
            return str(found)
        return hashlib.sha256(request.body).hexdigest()

    def _type(self, request: WebhookRequest, data: dict[str, Any]) -> str:
        if self.type_header:
            value = request.header(self.type_header)
            if not value:
                raise InvalidBody(f"missing {self.type_header} header")
            return value
        if self.type_fields:
            parts = []
            for path in self.type_fields:
                part = _lookup(data, path)
                if not isinstance(part, str) or not part:
                    raise InvalidBody(f"the body has no {'.'.join(path)} (a string)")
                parts.append(part)
            return ".".join(parts)
        return self.type_constant or "webhook"

    def sample(self, event_type: str | None, url: str, now: float) -> Sample:
        """A small JSON body signed and labelled as this config says the sender does."""
        kind = event_type or self.type_constant or "webhook"
        msg_id = f"evt_{uuid.uuid4().hex[:24]}"
        body_data: dict[str, Any] = {
            "id": msg_id,
            "type": kind,
            "created_at": int(now),
            "data": {"message": "relay send-test"},
        }
        if self.id_field:
            _put(body_data, self.id_field, msg_id)
        if self.type_fields:
            pieces = kind.split(".", len(self.type_fields) - 1)
            pieces += ["test"] * (len(self.type_fields) - len(pieces))
            for path, piece in zip(self.type_fields, pieces, strict=True):
                _put(body_data, path, piece)
        body = json.dumps(body_data, separators=(",", ":")).encode()
        headers = {"content-type": "application/json"}
        if self.id_header:
            headers[self.id_header] = msg_id
        if self.type_header:
            headers[self.type_header] = kind
        timestamp = str(int(now * 1000) if self.timestamp_unit == "ms" else int(now))
        if self.timestamp_header:
            headers[self.timestamp_header] = timestamp
        if self.secrets and self.signature_header:
            message = self._message(body, "POST", url, timestamp, msg_id)
            signature = self._digest(self.secrets[0], message)
            headers[self.signature_header] = self._header_value(signature, timestamp)
        return Sample(body=body, headers=headers)


def _put(data: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for part in path[:-1]:
        child = data.get(part)
        if not isinstance(child, dict):
            child = data[part] = {}
        data = child
    data[path[-1]] = value
