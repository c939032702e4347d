"""The provider interface: what every webhook sender implements.

A provider knows one sender's scheme: it verifies the raw bytes and headers, splits the body
into events, and gives each event a dedupe key and a type. It can also make a realistic signed
sample, for ``relay send-test``. Adding a provider is one module and one registry line in
``relay/providers/__init__.py``.
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from relay.errors import InvalidBody
from relay.settings import ConfigTable

# Headers that carry credentials: never stored, never shown to mapping templates.
CREDENTIAL_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie"})


class Headers(dict[str, str]):
    """A request's headers, names lower-cased, that remember which ones were looked up: those
    the relay and the provider read (signature, timestamp, id, content type) are always among
    the headers stored with the webhook, which keeps only a bounded set of the others."""

    __slots__ = ("read",)

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.read: set[str] = set()

    def get(self, name: str, default: Any = None) -> Any:
        self.read.add(name)
        return super().get(name, default)


@dataclass(frozen=True)
class WebhookRequest:
    """One received webhook, before anything decoded it."""

    method: str
    url: str  # as the relay received it: scheme://host[:port]/path[?query]
    headers: Mapping[str, str]  # names lower-cased; a repeated header keeps its last value
    body: bytes
    received_at: float  # unix seconds

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())

    @property
    def content_type(self) -> str:
        return (self.header("content-type") or "").split(";")[0].strip().lower()


@dataclass(frozen=True)
class ProviderEvent:
    """One provider event out of a webhook."""

    key: str  # the dedupe key, unique per source inside the dedupe window
    type: str  # what mapping rules match `on` against
    data: Mapping[str, Any]  # what templates see at top level (and as `event`)
    token: Token | None = None  # a signed single-use token that vouches for this event only


@dataclass(frozen=True)
class Token:
    """A value the signature covers but the event does not (Mailgun's token). The store binds
    it to the first event it came with and refuses it on any other, until `expires_at` (when
    the signature's own age check refuses it) has passed."""

    value: str
    expires_at: float


@dataclass(frozen=True)
class Sample:
    """A realistic webhook for send-test: body, content type and signed headers."""

    body: bytes
    headers: dict[str, str] = field(default_factory=dict)


class Verifier(Protocol):
    def verify(self, request: WebhookRequest) -> None:
        """Raise InvalidSignature(reason) unless the request is authentic and fresh."""


class Provider(ABC):
    kind: ClassVar[str]
    sample_types: ClassVar[tuple[str, ...]] = ()  # event types send-test knows, default first

    @classmethod
    @abstractmethod
    def from_config(cls, table: ConfigTable, signed: bool = True) -> Provider:
        """Read this provider's own keys of a [sources.NAME] table.

        With ``signed`` false the source is verified otherwise (Basic auth, a token, or not at
        all), so the provider's signing keys are optional; ``verify`` is then never called.
        """

    @abstractmethod
    def verify(self, request: WebhookRequest) -> None:
        """Raise InvalidSignature(reason) unless the request is authentic and fresh."""

    @abstractmethod
    def parse(self, request: WebhookRequest) -> list[ProviderEvent]:
        """Split a verified body into events. Raise InvalidBody(reason)."""

    def sample(self, event_type: str | None, url: str, now: float) -> Sample:
        """A realistic signed webhook of that type (send-test)."""
        raise NotImplementedError(f"{self.kind} cannot make samples")


# A \uD800-\uDFFF escape: half of a surrogate pair, or a lone surrogate.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


class LoneSurrogate(ValueError):
    """JSON text with a `\\ud800`-`\\udfff` escape that pairs with nothing. json.loads makes a
    str of it that no UTF-8 encoder takes: the store could never keep the event, and every
    retry of the webhook would fail the same way."""


def loads(body: bytes) -> Any:
    """JSON text as Python values. Raises ValueError (LoneSurrogate for text that is not
    Unicode); only bodies holding a surrogate escape, or not in UTF-8, pay for that check."""
    value = json.loads(body)
    if _SURROGATE_ESCAPE.search(body) or json.detect_encoding(body) != "utf-8":
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise LoneSurrogate("a JSON string holds a lone surrogate (not Unicode text)") from None
    return value


def json_body(request: WebhookRequest) -> Any:
    """The body as JSON, or InvalidBody."""
    try:
        return loads(request.body)
    except LoneSurrogate as e:
        raise InvalidBody(str(e)) from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise InvalidBody(f"body is not JSON: {e}") from None


def json_events(request: WebhookRequest, sender: str) -> list[dict[str, Any]]:
    """A body that is a JSON array of event objects (SendGrid, HubSpot), or InvalidBody."""
    body = json_body(request)
    if not isinstance(body, list):
        raise InvalidBody(f"a {sender} webhook is a JSON array of events")
    for i, item in enumerate(body):
        if not isinstance(item, dict):
            raise InvalidBody(f"event {i} is not an object")
    return body


def no_match(tried: int) -> str:
    """The precise reason for a signature that matched none of the secrets."""
    return f"no signature matched, {tried} secret{'s' if tried != 1 else ''} tried"


def check_age(timestamp: str | None, now: float, tolerance: float, *, scale: float = 1.0) -> float:
    """Parse a timestamp header and refuse it when outside the tolerance. Returns seconds."""
    from relay.errors import InvalidSignature

    if not timestamp:
        raise InvalidSignature("missing timestamp")
    try:
        ts = float(timestamp) / scale
    except ValueError:
        raise InvalidSignature("malformed timestamp") from None
    if ts != ts:  # NaN
        raise InvalidSignature("timestamp outside the tolerance", "timestamp is not a number")
    if abs(now - ts) > tolerance:  # too old or too far ahead
        age = now - ts
        if abs(age) == float("inf"):
            when = "out of range"
        else:
            when = f"{int(age)} s old" if age > 0 else f"{int(-age)} s in the future"
        raise InvalidSignature(
            "timestamp outside the tolerance",
            f"timestamp {when}, tolerance {tolerance:g} s",
        )
    return ts
