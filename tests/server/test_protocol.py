"""The sans-I/O codec: byte sequences in, parsed start-up packets and messages out; no sockets."""

from __future__ import annotations

import struct

import pytest

from dpgateway.server import protocol as p


def startup(code: int, body: bytes = b"") -> bytes:
    return struct.pack("!ii", len(body) + 8, code) + body


def params(**kv: str) -> bytes:
    return b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in kv.items()) + b"\0"


def test_startup_3_0_with_parameters() -> None:
    reader = p.FrontendReader()
    reader.feed(startup(p.PROTOCOL_3_0, params(user="alice", database="dpgateway")))
    assert reader.next_startup() == p.Startup(0, {"user": "alice", "database": "dpgateway"})
    assert reader.buffered == 0


def test_startup_arrives_byte_by_byte() -> None:
    reader = p.FrontendReader()
    data = startup(p.PROTOCOL_3_0, params(user="bob"))
    for byte in data[:-1]:
        reader.feed(bytes([byte]))
        assert reader.next_startup() is None
    reader.feed(data[-1:])
    assert reader.next_startup() == p.Startup(0, {"user": "bob"})


def test_protocol_3_2_and_pq_options_are_reported_for_negotiation() -> None:
    event = p.parse_startup(struct.pack("!i", (3 << 16) | 2) + params(user="a", **{"_pq_.foo": "1"}))
    assert event == p.Startup(2, {"user": "a"}, ("_pq_.foo",))
    assert p.negotiate_protocol_version(0, ["_pq_.foo"]) == b"v" + struct.pack("!iii", 4 + 8 + 9, 0, 1) + b"_pq_.foo\0"


@pytest.mark.parametrize(
    ("code", "body", "expected"),
    [
        (p.SSL_REQUEST_CODE, b"", p.SSLRequest()),
        (p.GSSENC_REQUEST_CODE, b"", p.GSSENCRequest()),
        (p.CANCEL_REQUEST_CODE, struct.pack("!i", 42) + b"KEY!", p.CancelRequest(42, b"KEY!")),
        (p.CANCEL_REQUEST_CODE, struct.pack("!i", 7) + bytes(32), p.CancelRequest(7, bytes(32))),
    ],
)
def test_special_startup_codes(code: int, body: bytes, expected: object) -> None:
    reader = p.FrontendReader()
    reader.feed(startup(code, body))
    assert reader.next_startup() == expected


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (struct.pack("!i", 4) + bytes(4), "invalid length of startup packet: 4"),
        (struct.pack("!i", 1 << 30), "invalid length of startup packet"),
        (struct.pack("!i", -8), "invalid length of startup packet"),
        (startup(p.PROTOCOL_3_0, b"user\0alice"), "invalid startup packet layout"),
        (startup(p.PROTOCOL_3_0, b"user\0alice\0"), "invalid startup packet layout"),
        (startup(p.PROTOCOL_3_0, b"user\0\xff\0\0"), "invalid byte sequence"),
        (startup(p.SSL_REQUEST_CODE, b"xx"), "encryption request"),
        (startup(p.CANCEL_REQUEST_CODE, b"abc"), "cancel request"),
        (startup(p.CANCEL_REQUEST_CODE, bytes(300)), "cancel request"),
    ],
)
def test_malformed_startup_is_a_protocol_violation(data: bytes, match: str) -> None:
    reader = p.FrontendReader()
    reader.feed(data)
    with pytest.raises(p.ProtocolViolation, match=match):
        reader.next_startup()


def test_unsupported_major_version_is_0A000() -> None:
    with pytest.raises(p.UnsupportedProtocol, match=r"unsupported frontend protocol 2\.0") as info:
        p.parse_startup(struct.pack("!i", 2 << 16) + params(user="a"))
    assert info.value.sqlstate == "0A000"


def test_messages_are_framed_and_split_across_feeds() -> None:
    reader = p.FrontendReader()
    data = p.message(b"Q", b"SELECT 1\0") + p.message(b"S")
    reader.feed(data[:7])
    assert reader.next_message() is None
    reader.feed(data[7:])
    assert reader.next_message() == p.Message(b"Q", b"SELECT 1\0")
    assert reader.next_message() == p.Message(b"S", b"")
    assert reader.next_message() is None


def test_oversized_message_is_refused_from_its_header() -> None:
    reader = p.FrontendReader(max_message=100)
    reader.feed(b"Q" + struct.pack("!i", 101))  # only the header: the body is never awaited
    with pytest.raises(p.ProtocolViolation, match="larger than the limit of 100"):
        reader.next_message()


def test_message_length_below_four_is_refused() -> None:
    reader = p.FrontendReader()
    reader.feed(b"Q" + struct.pack("!i", 3))
    with pytest.raises(p.ProtocolViolation, match="invalid message length 3"):
        reader.next_message()


def test_parse_bind_describe_execute_close_bodies() -> None:
    parse = b"s1\0SELECT $1\0" + struct.pack("!hi", 1, 23)
    assert p.parse_parse(parse) == p.Parse("s1", "SELECT $1", (23,))
    bind = b"p1\0s1\0" + struct.pack("!hh", 1, 1) + struct.pack("!hi", 2, 4) + struct.pack("!i", 7)
    bind += struct.pack("!i", -1) + struct.pack("!hh", 1, 1)
    assert p.parse_bind(bind) == p.Bind("p1", "s1", (1,), (struct.pack("!i", 7), None), (1,))
    assert p.parse_describe(b"P\0") == p.Describe("P", "")
    assert p.parse_execute(b"p1\0" + struct.pack("!i", 5)) == p.Execute("p1", 5)
    assert p.parse_close(b"S" + b"s1\0") == p.Close("S", "s1")


@pytest.mark.parametrize(
    ("parser", "body", "match"),
    [
        (p.parse_query, b"SELECT 1", "unterminated string"),
        (p.parse_query, b"SELECT 1\0extra", "longer than its fields"),
        (p.parse_parse, b"s\0q\0" + struct.pack("!h", 2) + bytes(4), "shorter than its fields"),
        (p.parse_bind, b"\0\0" + struct.pack("!h", -1), "negative count"),
        (p.parse_bind, b"\0\0" + struct.pack("!hhh", 0, 1, 0) + struct.pack("!i", 9), "shorter than its fields"),
        (p.parse_bind, b"\0\0" + struct.pack("!hhhh", 1, 2, 0, 0), "format codes must be 0"),
        (p.parse_describe, b"X\0", "invalid DESCRIBE message subtype"),
        (p.parse_close, b"Q\0", "invalid CLOSE message subtype"),
    ],
)
def test_truncated_or_invalid_bodies(parser, body: bytes, match: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(p.ProtocolViolation, match=match):
        parser(body)


def test_format_codes_expand() -> None:
    assert p.formats_for((), 3, "parameter") == (0, 0, 0)
    assert p.formats_for((1,), 2, "parameter") == (1, 1)
    assert p.formats_for((0, 1), 2, "parameter") == (0, 1)
    with pytest.raises(p.ProtocolViolation, match="2 result formats but 3 results"):
        p.formats_for((0, 1), 3, "result")


def test_backend_messages_bytes() -> None:
    assert p.auth_ok() == b"R\0\0\0\x08\0\0\0\0"
    assert p.ready_for_query("I") == b"Z\0\0\0\x05I"
    assert p.command_complete("SELECT 1") == b"C\0\0\0\x0dSELECT 1\0"
    assert p.parameter_status("a", "b") == b"S\0\0\0\x08a\0b\0"
    assert p.data_row([b"12", None]) == b"D\0\0\0\x10\0\x02\0\0\0\x0212\xff\xff\xff\xff"
    assert p.auth_sasl(["SCRAM-SHA-256"]) == b"R" + struct.pack("!ii", 23, 10) + b"SCRAM-SHA-256\0\0"
    field = p.Field("n", 20, 8)
    assert p.row_description([field]) == b"T" + struct.pack("!ih", 4 + 2 + 2 + 18, 1) + b"n\0" + struct.pack(
        "!ihihih", 0, 0, 20, 8, -1, 0
    )


def test_error_and_notice_fields() -> None:
    error = p.error_response("42501", "no", hint="do this")
    assert error.startswith(b"E") and b"SERROR\0VERROR\0C42501\0Mno\0Hdo this\0\0" in error
    notice = p.notice_response("spent", detail="d")
    assert notice.startswith(b"N") and b"SNOTICE\0VNOTICE\0C00000\0Mspent\0Dd\0\0" in notice
    fatal = p.error_response("28P01", "x", severity="FATAL")
    assert fatal.startswith(b"E") and b"SFATAL\0" in fatal


@pytest.mark.parametrize("detail", ["", "95% accuracy: n ±18", "nul\0inside", "é"])
def test_notice_response_is_the_notice_encoded(detail: str) -> None:
    """notice_response builds its bytes directly: the same as the Notice it stands for."""
    for text in ("dp: spent epsilon 1, delta 0", "", "x\0y"):
        expected = p.Notice("NOTICE", "00000", text, detail).encode()
        assert p.notice_response(text, detail=detail) == expected
        assert (
            p.notice_response(text, detail=detail, sqlstate="01000")
            == p.Notice("NOTICE", "01000", text, detail).encode()
        )
