"""The long-polling wire format (transports/polling/wire.py), as dwebsocket.js speaks it."""

from __future__ import annotations

import base64
import json

import pytest

from dwebsocket.transports.polling import wire
from dwebsocket.transports.polling.wire import Close, WireError

EVERY_BYTE = bytes(range(256))
MESSAGES = ["", "hello", "héllo ✓ \U0001f600", "\x00 nul", b"", b"\x00\x01", b"\xff\xfe\xfd", b"\xc3\x28", EVERY_BYTE]
MESSAGE_IDS = ["empty-text", "text", "unicode", "nul-text", "empty-bytes", "bytes", "not-utf8", "bad-utf8", "every-byte"]


def send_body(items: object) -> bytes:
    """A send body as dwebsocket.js flush() builds it: JSON.stringify({messages: batch})."""
    return json.dumps({"messages": items}).encode()


# -- messages -------------------------------------------------------------------


@pytest.mark.parametrize("message", MESSAGES, ids=MESSAGE_IDS)
def test_a_message_round_trips_through_json(message):
    item = json.loads(json.dumps(wire.encode(message)))  # as it crosses the network
    decoded = wire.decode(item)
    assert decoded == message
    assert type(decoded) is type(message)  # text stays text, bytes stay bytes


def test_text_goes_as_it_is_and_bytes_in_standard_padded_base64():
    assert wire.encode("a\x00é") == {"text": "a\x00é"}
    # dwebsocket.js decodes with atob(): the standard alphabet with padding, never the URL-safe one.
    assert wire.encode(b"\xfb\xff") == {"binary": "+/8="}
    assert wire.encode(b"\x00") == {"binary": "AA=="}
    assert wire.encode(EVERY_BYTE) == {"binary": base64.b64encode(EVERY_BYTE).decode("ascii")}


def test_binary_that_is_not_utf8_survives_a_send_body():
    # What btoa() of an ArrayBuffer gives: standard base64 of the raw bytes.
    body = send_body([{"binary": base64.b64encode(b"\xc3\x28\xff").decode()}, {"text": "after"}])
    assert wire.parse_send(body) == [b"\xc3\x28\xff", "after"]


def test_text_wins_when_an_item_has_both_keys_as_in_dwebsocket_js():
    # dwebsocket.js: item.text !== undefined ? item.text : fromBase64(item.binary)
    assert wire.decode({"text": "t", "binary": "AA=="}) == "t"


@pytest.mark.parametrize(
    "item",
    [None, "text", ["text"], 1, {}, {"text": 1}, {"text": None}, {"binary": 1}, {"binary": None}, {"msg": "x"}],
    ids=repr,
)
def test_an_item_that_is_no_message_is_a_wire_error_that_says_what_a_message_is(item):
    with pytest.raises(WireError, match=r'a message is \{"text": str\} or \{"binary": base64\}'):
        wire.decode(item)


@pytest.mark.parametrize("data", ["***", "AAE", "AA=A", "AA==AA==x", "-_8="], ids=repr)
def test_bad_base64_is_a_wire_error_that_says_so(data):
    with pytest.raises(WireError, match="bad base64 in a binary message"):
        wire.decode({"binary": data})


def test_wire_error_is_a_value_error():
    assert issubclass(WireError, ValueError)


# -- request bodies ----------------------------------------------------------------


def test_a_send_body_gives_its_messages_in_order():
    assert wire.parse_send(send_body([wire.encode(m) for m in MESSAGES])) == MESSAGES
    assert wire.parse_send(send_body([])) == []


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"{not json", "the body is not JSON"),
        (b"\xff\xfe\xfa", "the body is not JSON"),  # not UTF-8 either
        (b"[]", "the body is not a JSON object"),
        (b'"messages"', "the body is not a JSON object"),
        (b"null", "the body is not a JSON object"),
        (b"", 'a send body is {"messages": [...]}'),  # no body: no messages key
        (b"{}", 'a send body is {"messages": [...]}'),
        (b'{"messages": null}', 'a send body is {"messages": [...]}'),
        (b'{"messages": {"text": "a"}}', 'a send body is {"messages": [...]}'),
        (b'{"messages": "a"}', 'a send body is {"messages": [...]}'),
        (b'{"messages": [{"text": "a"}, {"text": 2}]}', 'a message is {"text": str} or {"binary": base64}'),
        (b'{"messages": [{"text": "a"}, "b"]}', 'a message is {"text": str} or {"binary": base64}'),
        (b'{"messages": [{"binary": "***"}]}', "bad base64 in a binary message"),
        # JSON escapes a browser never writes for text, which would be lone surrogates
        (b'{"messages": [{"text": "\\ud800"}]}', "lone surrogate"),
        (b'{"messages": [{"text": "a"}, {"text": "x\\udc00y"}]}', "lone surrogate"),
    ],
    ids=repr,
)
def test_a_malformed_send_body_is_a_wire_error_that_says_why(body, why):
    with pytest.raises(WireError) as caught:
        wire.parse_send(body)
    message = str(caught.value)
    assert message.startswith("malformed send request: ")
    assert why in message


def test_a_close_body_gives_its_code_and_reason():
    # dwebsocket.js close(): {code: code || 1000, reason: reason || ""}
    assert wire.parse_close(json.dumps({"code": 4001, "reason": "bye ✓"}).encode()) == Close(4001, "bye ✓")
    assert wire.parse_close(b'{"code": 1000, "reason": ""}') == Close(1000, "")


def test_a_close_body_without_code_or_reason_is_a_normal_close():
    assert wire.parse_close(b"") == Close(1000, "")
    assert wire.parse_close(b"{}") == Close(1000, "")
    assert wire.parse_close(b'{"reason": "r"}') == Close(1000, "r")
    assert wire.parse_close(b'{"code": 4002}') == Close(4002, "")


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"{not json", "the body is not JSON"),
        (b"[1000]", "the body is not a JSON object"),
        (b'{"code": "abc"}', "the code is not an integer: 'abc'"),
        (b'{"code": null}', "the code is not an integer: None"),
        (b'{"code": [1000]}', "the code is not an integer: [1000]"),
        (b'{"code": 1e400}', "the code is not an integer: inf"),
        (b'{"code": 1000, "reason": "\\ud800"}', "The reason must be valid Unicode"),
    ],
    ids=repr,
)
def test_a_malformed_close_body_is_a_wire_error_that_says_why(body, why):
    with pytest.raises(WireError) as caught:
        wire.parse_close(body)
    message = str(caught.value)
    assert message.startswith("malformed close request: ")
    assert why in message


def test_an_open_body_gives_the_offered_subprotocols_in_order():
    # dwebsocket.js start(): {protocols: owner._protocols}
    assert wire.parse_open(b'{"protocols": ["chat.v2", "chat"]}') == ["chat.v2", "chat"]
    assert wire.parse_open(b'{"protocols": []}') == []


def test_an_open_body_may_offer_one_subprotocol_as_a_string_as_for_websocket():
    # dwebsocket.js documents `protocols` "as for WebSocket", and new WebSocket(url, "chat")
    # offers "chat"; the polling transport sends {"protocols": "chat"} as it is.
    assert wire.parse_open(b'{"protocols": "chat"}') == ["chat"]


@pytest.mark.parametrize("body", [b"", b"{}", b"{nope", b"[]", b'{"protocols": null}', b'{"protocols": {"a": 1}}'])
def test_an_open_body_that_offers_nothing_readable_offers_nothing(body):
    assert wire.parse_open(body) == []


# -- answers -------------------------------------------------------------------------


def test_the_open_answer_has_what_dwebsocket_js_reads():
    # sid = opened.sid; typeof opened.timeout === "number" (seconds); opened.subprotocol || ""
    answer = json.loads(json.dumps(wire.open_answer("S1d", "chat", 25.0)))
    assert answer == {"sid": "S1d", "subprotocol": "chat", "timeout": 25.0}
    assert isinstance(answer["timeout"], (int, float))
    assert json.loads(json.dumps(wire.open_answer("S", None, 1.5))) == {"sid": "S", "subprotocol": None, "timeout": 1.5}


def test_a_poll_answer_has_the_messages_then_null_or_the_close():
    # batch.messages.forEach(...item.text !== undefined ? item.text : fromBase64(item.binary));
    # if (batch.close) finish(batch.close.code, batch.close.reason, true)
    items = [wire.encode("a"), wire.encode(b"\x00\xff")]
    answer = json.loads(json.dumps(wire.batch(items, None)))
    assert answer == {"messages": [{"text": "a"}, {"binary": "AP8="}], "close": None}
    assert [wire.decode(item) for item in answer["messages"]] == ["a", b"\x00\xff"]
    closing = json.loads(json.dumps(wire.batch([], Close(1013, "too slow"))))
    assert closing == {"messages": [], "close": {"code": 1013, "reason": "too slow"}}


def test_an_error_answer_is_an_object_with_the_error():
    assert json.loads(json.dumps(wire.error("unknown session"))) == {"error": "unknown session"}


def test_the_actions_are_those_dwebsocket_js_sends():
    assert set(wire.ACTIONS) == {"open", "poll", "send", "close"}


def test_a_close_goes_on_the_wire_as_code_and_reason():
    assert Close(4000, "r").info() == {"code": 4000, "reason": "r"}


# -- queued items ------------------------------------------------------------------------


@pytest.mark.parametrize("message", MESSAGES, ids=MESSAGE_IDS)
def test_a_queued_message_round_trips(message):
    item = wire.encode(message)
    raw = wire.dump_item(item)
    assert isinstance(raw, str)
    assert wire.load_item(raw) == item
    assert wire.load_item(raw.encode()) == item  # Redis answers bytes
    assert wire.decode(wire.load_item(raw)) == message


def test_the_closing_item_round_trips():
    raw = wire.dump_item(Close(1013, "too slow ✓"))
    assert json.loads(raw) == {"close": {"code": 1013, "reason": "too slow ✓"}}
    assert wire.load_item(raw) == Close(1013, "too slow ✓")
    assert wire.load_item(raw.encode()) == Close(1013, "too slow ✓")
    assert wire.load_item('{"close": {"code": 1000}}') == Close(1000, "")


@pytest.mark.parametrize(
    "raw",
    [
        "not json",
        b"\xff\xfe\xfa",
        "[]",
        "null",
        "{}",
        '{"text": 1}',
        '{"binary": null}',
        '{"close": null}',
        '{"close": {"reason": "no code"}}',
        '{"close": {"code": "1000"}}',
        '{"close": {"code": 1000, "reason": 5}}',
    ],
    ids=repr,
)
def test_what_is_no_queued_item_is_a_wire_error(raw):
    with pytest.raises(WireError, match="a queued item is not JSON|not a queued item"):
        wire.load_item(raw)
