"""HTML form bodies, urlencoded or multipart/form-data, parsed with bounds.

A sender that signs fields of the form (Mailgun's legacy webhooks) has its form parsed before
anything is verified, so the parser must be cheap and safe on whatever anyone posts: linear in
the body (``bytes.find`` and anchored regular expressions do the scanning), never recursive (a
nested multipart part is skipped like a file, not opened), every count and size bounded, and
anything malformed a :class:`FormError`, never another exception.
"""

from __future__ import annotations

import base64
import binascii
import re
import string
from urllib.parse import unquote_to_bytes

URLENCODED = "application/x-www-form-urlencoded"
MULTIPART = "multipart/form-data"

MAX_FIELDS = 1000  # fields of a urlencoded form
MAX_PARTS = 256  # parts of a multipart form, files included
MAX_HEADER_BYTES = 65536  # the header lines of all parts together
MAX_PART_HEADER_BYTES = 8192  # the header lines of one part
MAX_PART_HEADERS = 8
MAX_PARAMS = 4  # parameters of one header (`; name="x"; filename="y"; filename*=...`)


class FormError(ValueError):
    """A body that is not a well-formed form within the bounds."""


def parse_form(
    content_type: str, body: bytes, only: frozenset[str] | None = None
) -> dict[str, str]:
    """The text fields of a form; a repeated field keeps its last value. Raises FormError.

    With `only`, the values of other fields are not decoded (nor returned): what a signature
    check needs, before the rest of an unauthenticated body is worth decoding."""
    kind, params = header_params(content_type)
    if kind == URLENCODED:
        return _urlencoded(body, only)
    if kind == MULTIPART:
        boundary = params.get("boundary")
        if boundary is None or not _BOUNDARY.fullmatch(boundary):
            raise FormError("multipart/form-data needs a valid boundary parameter")
        return _multipart(boundary.encode("ascii"), body, only)
    raise FormError(f"not a form: {kind[:40] or 'no content type'}")


def _urlencoded(body: bytes, only: frozenset[str] | None) -> dict[str, str]:
    """As urllib's parse_qsl with keep_blank_values, strictly (a `%` not followed by two hex
    digits, or a raw line break, is refused), and at C speed: parse_qsl decodes each escape in
    Python, some 300 ms for a megabyte of them."""
    if b"\r" in body or b"\n" in body:
        raise FormError("a raw line break")
    if b"%" in body:
        # Every `%` must start %XX: with hex digits read as `h`, as many "%hh" as "%".
        shape = body.translate(_HEX_SHAPE)
        if shape.count(b"%hh") != shape.count(b"%"):
            raise FormError("a `%` not followed by two hex digits")
    pairs = body.split(b"&", MAX_FIELDS)
    if len(pairs) > MAX_FIELDS:
        raise FormError(f"more than {MAX_FIELDS} fields")
    longest = 3 * max(map(len, only), default=0) if only is not None else None
    fields: dict[str, str] = {}
    for pair in pairs:
        if pair:
            raw_name, _, raw_value = pair.partition(b"=")
            if longest is not None and len(raw_name) > longest:
                continue  # escaped or not, too long to be one of `only`
            name = _unquote_plus(raw_name)
            if only is None or name in only:
                fields[name] = _unquote_plus(raw_value)
    return fields


_HEX_SHAPE = bytes(
    ord("h") if chr(c) in string.hexdigits else ord("%") if c == ord("%") else ord(".")
    for c in range(256)
)


def _unquote_plus(raw: bytes) -> str:
    if b"+" in raw:
        raw = raw.replace(b"+", b" ")
    if b"%" in raw:
        # %XX as quoted-printable's =XX, decoded by binascii (a literal `=` escaped first).
        if b"=" in raw:
            raw = raw.replace(b"=", b"=3D")
        raw = binascii.a2b_qp(raw.replace(b"%", b"="))
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise FormError("a field is not UTF-8") from None


# RFC 2046: 1 to 70 characters, the last not a space.
_BOUNDARY = re.compile(r"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]")
_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
# One `; name=value` of a header, the value a token-like word or a quoted string; anchored
# with .match at a position, so parsing a header is one pass.
_PARAM = re.compile(
    rf"[ \t]*;[ \t]*({_TOKEN})[ \t]*=[ \t]*"
    r'(?:"([^"\\\r\n]*(?:\\[^\r\n][^"\\\r\n]*)*)"|([^\x00-\x20";\\\x7f]+))[ \t]*'
)
_QUOTED_PAIR = re.compile(r"\\(.)")
# RFC 8187 ext-value: charset'language'percent-encoded
_EXT_VALUE = re.compile(
    r"([A-Za-z0-9!#$%&+^_`{}~-]+)'[A-Za-z0-9-]*'((?:%[0-9A-Fa-f]{2}|[A-Za-z0-9!#$&+.^_`|~-])*)"
)
_CHARSETS = ("utf-8", "us-ascii", "iso-8859-1")


def header_params(value: str) -> tuple[str, dict[str, str]]:
    """A header such as Content-Type as (lower-cased value, parameters); names lower-cased,
    `name*` values (RFC 8187) decoded into `name`, which they take precedence over."""
    main, sep, _ = value.partition(";")
    params: dict[str, str] = {}
    extended: dict[str, str] = {}
    pos = len(main)
    while sep and pos < len(value):
        m = _PARAM.match(value, pos)
        if m is None:
            if not value[pos:].strip(" \t;"):
                break  # a trailing `;`
            raise FormError("malformed header parameters")
        if len(params) + len(extended) >= MAX_PARAMS:
            raise FormError("too many header parameters")
        name, quoted, word = m.group(1).lower(), m.group(2), m.group(3)
        if quoted is None:
            text = word
        else:
            text = _QUOTED_PAIR.sub(r"\1", quoted) if "\\" in quoted else quoted
        if name.endswith("*"):
            name = name[:-1]
            if name in extended:
                raise FormError(f"parameter {name[:40]}* given twice")
            extended[name] = _ext_value(text)
        else:
            if name in params:
                raise FormError(f"parameter {name[:40]} given twice")
            params[name] = text
        pos = m.end()
    params.update(extended)
    return main.strip().lower(), params


def _ext_value(text: str) -> str:
    m = _EXT_VALUE.fullmatch(text)
    if m is None or m.group(1).lower() not in _CHARSETS:
        raise FormError("malformed extended parameter (charset'language'value)")
    try:
        return unquote_to_bytes(m.group(2)).decode(m.group(1).lower())
    except UnicodeDecodeError:
        raise FormError("extended parameter is not in its charset") from None


def _multipart(boundary: bytes, body: bytes, only: frozenset[str] | None) -> dict[str, str]:
    """RFC 7578 fields. Parts with a filename (attachments) or that are themselves multipart
    are skipped: the event is the text fields."""
    dash = b"--" + boundary
    delimiter = b"\r\n" + dash
    if body.startswith(dash):
        pos = len(dash)
    else:
        at = body.find(delimiter)  # after a preamble
        if at < 0:
            raise FormError("no boundary in the body")
        pos = at + len(delimiter)
    fields: dict[str, str] = {}
    parts = header_bytes = 0
    while True:
        if body.startswith(b"--", pos):
            return fields  # the close delimiter; what follows is an epilogue
        eol = body.find(b"\r\n", pos, pos + 256)
        if eol < 0 or body[pos:eol].strip(b" \t"):
            raise FormError("malformed boundary line")
        start = eol + 2
        end = body.find(delimiter, start)
        if end < 0:
            raise FormError("not a complete multipart body (no closing boundary)")
        parts += 1
        if parts > MAX_PARTS:
            raise FormError(f"more than {MAX_PARTS} parts")
        if body.startswith(b"\r\n", start):
            raise FormError("a part has no headers (no form-data name)")
        head_end = body.find(b"\r\n\r\n", start, min(end, start + MAX_PART_HEADER_BYTES + 4))
        if head_end < 0:
            raise FormError("part headers are unterminated or longer than 8 KiB")
        header_bytes += head_end - start
        if header_bytes > MAX_HEADER_BYTES:
            raise FormError("the parts' headers are longer than 64 KiB together")
        name, skip, encoding = _part(body, start, head_end)
        if not skip and (only is None or name in only):
            value = _transfer_decoded(encoding, body[head_end + 4 : end])
            try:
                fields[name] = value.decode("utf-8")
            except UnicodeDecodeError:
                raise FormError(f"field {name[:40]!r} is not UTF-8 text") from None
        pos = end + len(delimiter)


# The headers nearly every sender writes, read by one match (anything else: _part_headers).
_SIMPLE_PART = re.compile(
    rb'content-disposition:[ \t]*form-data;[ \t]*name="([^"\\\r\n]*)"'
    rb'(;[ \t]*filename="[^"\\\r\n]*")?[ \t]*'
    rb"(?:\r\ncontent-type:[ \t]*([!#$%&'*+.^_`|~0-9A-Za-z/-]*)(?:[ \t]*;[^\r\n]*)?)?",
    re.IGNORECASE,
)


def _part(body: bytes, start: int, head_end: int) -> tuple[str, bool, str | None]:
    """(name, skipped: a file or a nested multipart, transfer encoding) of a part's headers."""
    simple = _SIMPLE_PART.fullmatch(body, start, head_end)
    if simple is None:
        return _general_part(body[start:head_end])
    try:
        name = simple.group(1).decode("utf-8")  # raw UTF-8, as browsers write names
    except UnicodeDecodeError:
        raise FormError("a field name is not UTF-8") from None
    kind = (simple.group(3) or b"").lower()
    return name, simple.group(2) is not None or kind.startswith(b"multipart/"), None


def _general_part(head: bytes) -> tuple[str, bool, str | None]:
    # Bytes that are not UTF-8 stay escaped; only a name holding one is refused (a file's
    # name is never used).
    headers = _part_headers(head.decode("utf-8", "surrogateescape"))
    disposition, params = header_params(headers.get("content-disposition", ""))
    name = params.get("name")
    if disposition != "form-data" or name is None:
        raise FormError("a part is not a named form-data field")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise FormError("a field name is not UTF-8") from None
    kind, _ = header_params(headers.get("content-type", "text/plain"))
    skip = "filename" in params or kind.startswith("multipart/")
    return name, skip, headers.get("content-transfer-encoding")


def _part_headers(block: str) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in block.split("\r\n"):
        name, colon, value = line.partition(":")
        name = name.lower()
        if not colon or not _HEADER_NAME.fullmatch(name):
            raise FormError("malformed part header (folded lines are not accepted)")
        if name in headers:
            raise FormError(f"part header {name[:40]} given twice")
        if len(headers) >= MAX_PART_HEADERS:
            raise FormError("too many part headers")
        headers[name] = value.strip(" \t")
    return headers


_HEADER_NAME = re.compile(_TOKEN)


def _transfer_decoded(encoding: str | None, value: bytes) -> bytes:
    """RFC 7578 deprecates Content-Transfer-Encoding; old senders still write one."""
    kind = (encoding or "binary").strip().lower()
    if kind in ("binary", "8bit", "7bit"):
        return value
    if kind == "base64":
        try:
            return base64.b64decode(value.translate(None, b" \t\r\n"), validate=True)
        except (binascii.Error, ValueError):
            raise FormError("a base64 part is not valid base64") from None
    if kind == "quoted-printable":
        return binascii.a2b_qp(value)
    raise FormError(f"unknown transfer encoding {kind[:40]!r}")
