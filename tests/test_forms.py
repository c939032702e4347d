"""The bounded form parser: what it reads, as the standard library and HTTP clients mean it,
and what it refuses, always as FormError."""

from __future__ import annotations

import contextlib
import re
from urllib.parse import parse_qsl, quote, urlencode

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.providers import forms
from relay.providers.forms import FormError, header_params, parse_form

URLENCODED = "application/x-www-form-urlencoded"
MP = "multipart/form-data; boundary=b"


def multipart(*parts: bytes, boundary: bytes = b"b") -> bytes:
    body = b"".join(b"--" + boundary + b"\r\n" + p + b"\r\n" for p in parts)
    return body + b"--" + boundary + b"--\r\n"


def field(name: str, value: bytes, extra: bytes = b"") -> bytes:
    return f'Content-Disposition: form-data; name="{name}"\r\n'.encode() + extra + b"\r\n" + value


# -- urlencoded ----------------------------------------------------------------------------

texts = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)


@settings(max_examples=300, deadline=None)
@given(pairs=st.lists(st.tuples(texts, texts), max_size=12), raw=st.booleans())
def test_urlencoded_reads_as_parse_qsl(pairs: list[tuple[str, str]], raw: bool) -> None:
    body = urlencode(pairs).encode()
    if raw:  # as some senders write it: UTF-8 and reserved characters left unescaped
        body = "&".join(f"{quote(k, safe='=+ ')}={v}" for k, v in pairs if "&" not in v).encode()
    if b"\r" in body or b"\n" in body or re.search(rb"%(?![0-9A-Fa-f]{2})", body):
        with pytest.raises(FormError):  # parse_qsl would keep these as they are
            parse_form(URLENCODED, body)
        return
    try:
        expected = dict(parse_qsl(body.decode(), keep_blank_values=True, errors="strict"))
    except (UnicodeDecodeError, ValueError):
        with pytest.raises(FormError):
            parse_form(URLENCODED, body)
        return
    assert parse_form(URLENCODED, body) == expected


@pytest.mark.parametrize(
    ("body", "fields"),
    [
        (b"a=1&b=2&a=3", {"a": "3", "b": "2"}),
        (b"a&b=&&c=x=y", {"a": "", "b": "", "c": "x=y"}),
        (b"n%C3%A9=%E2%9C%93+ok%2B", {"né": "✓ ok+"}),
        (b"x=%3D%41=", {"x": "=A="}),
        (b"", {}),
    ],
)
def test_urlencoded_fields(body: bytes, fields: dict[str, str]) -> None:
    assert parse_form(URLENCODED, body) == fields


@pytest.mark.parametrize(
    "body",
    [b"a=%zz", b"a=%4", b"a=%", b"a=%FF", b"a=\xff", b"a=1\r\nb=2", b"&" * forms.MAX_FIELDS],
    ids=["bad-escape", "short-escape", "lone-percent", "escape-not-utf8", "raw-not-utf8",
         "line-break", "too-many-fields"],
)  # fmt: skip
def test_urlencoded_refusals(body: bytes) -> None:
    with pytest.raises(FormError):
        parse_form(URLENCODED, body)


def test_only_decodes_just_those_fields() -> None:
    body = b"token=abc&timestamp=1&other=%FF&" + b"%41" * 300 + b"=x"
    assert parse_form(URLENCODED, body, frozenset({"token", "timestamp"})) == {
        "token": "abc",
        "timestamp": "1",
    }
    with pytest.raises(FormError):
        parse_form(URLENCODED, body)
    mp = multipart(field("token", b"abc"), field("other", b"\xff"))
    assert parse_form(MP, mp, frozenset({"token"})) == {"token": "abc"}
    with pytest.raises(FormError):
        parse_form(MP, mp)


# -- multipart -----------------------------------------------------------------------------

# httpx writes `"` and control characters in names as %22, %0A, ... (as browsers do), which
# the receiving side keeps as written: names here hold none.
names = st.text(
    alphabet=st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters='"'),
    min_size=1,
    max_size=20,
)


@settings(max_examples=200, deadline=None)
@given(
    data=st.dictionaries(names, st.text(alphabet=st.characters(blacklist_categories=("Cs",))),
                         max_size=8),
    with_file=st.booleans(),
)  # fmt: skip
def test_multipart_reads_what_httpx_writes(data: dict[str, str], with_file: bool) -> None:
    """httpx writes a multipart body only when there is a file (else it urlencodes)."""
    files = {"attachment-1": ("message.eml", b"\x00\xff raw", "message/rfc822")}
    built = httpx.Request("POST", "http://x/", data=data, files=files)
    assert built.headers["content-type"].startswith("multipart/form-data; boundary=")
    assert parse_form(built.headers["content-type"], built.read()) == data
    if with_file:  # and the same fields urlencoded
        plain = httpx.Request("POST", "http://x/", data=data)
        assert parse_form(URLENCODED, plain.read()) == data


def test_multipart_as_mailgun_writes_it() -> None:
    from tests.conftest import MAPPINGS

    body = (MAPPINGS / "examples/mailgun/legacy-bounced.multipart").read_bytes()
    content_type = "multipart/form-data; boundary=----MailgunFormBoundary7MA4YWxkTrZu0gW"
    fields = parse_form(content_type, body)
    assert fields["event"] == "bounced"
    assert "attachment-1" not in fields
    assert {"timestamp", "token", "signature"} <= set(fields)


@pytest.mark.parametrize(
    ("part", "fields"),
    [
        (field("a", b"1"), {"a": "1"}),
        (b"content-disposition:form-data;name=a\r\n\r\n1", {"a": "1"}),
        (b"Content-Disposition: form-data; name=\"a\\\"b\"\r\n\r\n1", {'a"b': "1"}),
        (b"Content-Disposition: form-data; name*=utf-8''n%C3%A9\r\n\r\n1", {"né": "1"}),
        (b"Content-Disposition: form-data; name=\"x\"; name*=UTF-8'en'%E2%9C%93\r\n\r\n1",
         {"✓": "1"}),
        ('Content-Disposition: form-data; name="né"\r\n\r\n1'.encode(), {"né": "1"}),
        (field("a", b"aGkh\r\nISE=", b"Content-Transfer-Encoding: base64\r\n"), {"a": "hi!!!"}),
        (field("a", b"caf=C3=A9", b"Content-Transfer-Encoding: quoted-printable\r\n"),
         {"a": "café"}),
        (field("a", b"x", b"Content-Type: text/plain; charset=utf-8\r\n"), {"a": "x"}),
        (field("a", b""), {"a": ""}),
        (b'Content-Disposition: form-data; name="f"; filename="m.eml"\r\n\r\n\xff', {}),
        (b"Content-Disposition: form-data; name=\"f\"; filename*=utf-8''m.eml\r\n\r\n\xff", {}),
        (field("f", b"--c\r\n\r\nx\r\n--c--", b"Content-Type: multipart/mixed; boundary=c\r\n"),
         {}),
    ],
    ids=["plain", "lower-case-unquoted", "escaped-quote", "rfc8187-name", "name-star-wins",
         "raw-utf8-name", "base64", "quoted-printable", "charset", "empty", "file",
         "file-star", "nested-skipped"],
)  # fmt: skip
def test_multipart_parts(part: bytes, fields: dict[str, str]) -> None:
    assert parse_form(MP, multipart(part)) == fields


def test_preamble_padding_epilogue_and_quoted_boundary() -> None:
    body = b"preamble\r\n--a b \t\r\n" + field("x", b"1") + b"\r\n--a b--\r\nepilogue"
    assert parse_form('multipart/form-data; boundary="a b"', body) == {"x": "1"}


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("multipart/form-data", multipart(field("a", b"1"))),
        ("multipart/form-data; boundary=" + "b" * 71, b""),
        ("multipart/form-data; boundary=b; boundary=c", multipart(field("a", b"1"))),
        (MP, b"no boundary at all"),
        (MP, b"--b\r\n" + field("a", b"1")),
        (MP, b"--bX\r\n" + field("a", b"1") + b"\r\n--b--"),
        (MP, multipart(b"\r\nno headers")),
        (MP, multipart(b"Content-Type: text/plain\r\n\r\nx")),
        (MP, multipart(b"Content-Disposition: attachment; name=\"a\"\r\n\r\nx")),
        (MP, multipart(b"Content-Disposition: form-data; name*\r\n\r\nx")),
        (MP, multipart(b"Content-Disposition: form-data; name*=\r\n\r\nx")),
        (MP, multipart(b"Content-Disposition: form-data; name*=latin-9''x\r\n\r\nx")),
        (MP, multipart(b"Content-Disposition: form-data; name=\"a\r\n\r\nx")),
        (MP, multipart(b"Content-Disposition: form-data; name=a; name=b\r\n\r\nx")),
        (MP, multipart(b"Content-Disposition: form-data; name=a garbage\r\n\r\nx")),
        (MP, multipart(b"Content-Disposition: form-data;\r\n name=a\r\n\r\nx")),
        (MP, multipart(field("a", b"x", b"Content-Type: text/plain\r\n" * 2))),
        (MP, multipart(field("a", b"x", b"X-A: 1\r\n" * forms.MAX_PART_HEADERS))),
        (MP, multipart(b"Content-Disposition: form-data" + b"; p=1" * 4 + b"; name=a\r\n\r\nx")),
        (MP, multipart(b'Content-Disposition: form-data; name="\xff"\r\n\r\nx')),
        (MP, multipart(field("a", b"\xff"))),
        (MP, multipart(field("a", b"!!!", b"Content-Transfer-Encoding: base64\r\n"))),
        (MP, multipart(field("a", b"x", b"Content-Transfer-Encoding: x-gzip\r\n"))),
        (MP, multipart(field("a", b"x", b"X-L: " + b"y" * forms.MAX_PART_HEADER_BYTES + b"\r\n"))),
        (MP, multipart(*[field("f", b"x")] * (forms.MAX_PARTS + 1))),
        (MP, multipart(*[field("f", b"x", b"X-A: " + b"y" * 6000 + b"\r\n")] * 12)),
        ("text/plain", b"a=1"),
    ],
    ids=["no-boundary", "boundary-too-long", "boundary-twice", "garbage", "truncated",
         "not-a-delimiter", "part-without-headers", "part-without-disposition",
         "not-form-data", "name-star-without-value", "name-star-empty", "unknown-charset",
         "unterminated-quote", "name-twice", "junk-after-parameter", "folded-header",
         "header-twice", "too-many-headers", "too-many-parameters", "name-not-utf8",
         "value-not-utf8", "bad-base64", "unknown-transfer-encoding", "part-headers-too-long",
         "too-many-parts", "all-headers-too-long", "not-a-form"],
)  # fmt: skip
def test_multipart_refusals(content_type: str, body: bytes) -> None:
    with pytest.raises(FormError):
        parse_form(content_type, body)


def test_deep_nesting_is_never_opened() -> None:
    """3,000 multiparts inside each other: the outer part is skipped whole, no recursion."""
    depth = 3000
    head = b"".join(
        b'--b%d\r\nContent-Disposition: form-data; name="f%d"\r\n'
        b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n" % (i, i, i + 1)
        for i in range(depth)
    )
    tail = b"".join(b"\r\n--b%d--\r\n" % i for i in reversed(range(depth)))
    assert parse_form("multipart/form-data; boundary=b0", head + b"x" + tail) == {}


def test_header_params() -> None:
    assert header_params('Multipart/Form-Data; Boundary="x y"; charset=utf-8;') == (
        "multipart/form-data",
        {"boundary": "x y", "charset": "utf-8"},
    )
    assert header_params("text/plain") == ("text/plain", {})


@settings(max_examples=400, deadline=None)
@given(
    body=st.binary(max_size=400),
    prefix=st.sampled_from([b"", b"--b\r\n", b"--b\r\nContent-Disposition: form-data; name="]),
    content_type=st.sampled_from([MP, URLENCODED, 'multipart/form-data; boundary="b"']),
)
def test_any_body_is_fields_or_a_form_error(body: bytes, prefix: bytes, content_type: str) -> None:
    with contextlib.suppress(FormError):
        parse_form(content_type, prefix + body)
