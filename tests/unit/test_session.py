"""The dwebsocket.v1 session protocol's pieces: negotiation, resume, headers, dedupe and the replay order."""

from __future__ import annotations

import json
from dataclasses import dataclass

from dwebsocket.messages import Frame
from dwebsocket.session import Resume, Session, answer, parse_resume, split_offer, take_resume


@dataclass(frozen=True)
class Pos:
    epoch: str
    seq: int


class Recorder:
    """A transport that records what it is offered, in order."""

    def __init__(self) -> None:
        self.sent: list[object] = []

    def offer(self, frame: Frame) -> bool:
        self.sent.append(frame.message)
        return True


def test_negotiation_strips_and_restores_the_prefix() -> None:
    assert split_offer(["dwebsocket.v1+chat", "dwebsocket.v1+x", "dwebsocket.v1"]) == (True, ["chat", "x"])
    assert split_offer(["chat"]) == (False, ["chat"])
    assert split_offer([]) == (False, [])
    assert split_offer(["dwebsocket.v1+chat", "chat"]) == (True, ["chat"])
    assert answer("chat") == "dwebsocket.v1+chat" and answer(None) == "dwebsocket.v1"


def test_a_resume_is_read_leniently() -> None:
    resume = parse_resume(json.dumps({"p": {"a": "e1:3", "b": "bad", "c": "e:-1", "d": 7}, "x": ["i1", 2, "i2"]}))
    assert resume.positions == {"a": ("e1", 3)} and resume.ids == ["i1", "i2"]
    assert parse_resume("{not json") == Resume()
    assert parse_resume("[1]") == Resume()
    assert parse_resume(json.dumps({"x": ["i"] * 100})).ids == ["i"] * 16
    assert parse_resume(json.dumps({"c": "0123456789abcdef"})).client == "0123456789abcdef"
    assert parse_resume(json.dumps({"c": "short"})).client is None  # guessable
    assert parse_resume(json.dumps({"c": "p" * 65})).client is None
    many = {f"g{i}": "e:1" for i in range(500)}
    assert len(parse_resume(json.dumps({"p": many})).positions) == 200
    assert parse_resume(json.dumps({"p": {"x" * 201: "e:1"}})).positions == {}
    assert parse_resume(json.dumps({"c": 5})).client is None


def test_take_resume_leaves_the_rest_of_the_query() -> None:
    value = "dwebsocket.v1=" + "%7B%22p%22%3A%7B%22g%22%3A%22e%3A1%22%7D%7D"
    resume, rest = take_resume(f"a=1&{value}&b=2")
    assert rest == "a=1&b=2" and resume is not None and resume.positions == {"g": ("e", 1)}
    assert take_resume("a=1") == (None, "a=1")
    assert take_resume("dwebsocket=open&b=2") == (None, "dwebsocket=open&b=2")


def test_inbound_strips_the_empty_header_and_keeps_the_type() -> None:
    session, transport = Session("me", None), Recorder()
    assert session.inbound("\nhello\nworld", transport) == ("hello\nworld", None)
    assert session.inbound(b"\n\x00", transport) == (b"\x00", None)
    assert session.inbound('{"t":"later"}\n', transport) is None  # a header: not for the view
    assert session.inbound('{"n":1}\nnumbered', transport) is None  # numbered, but this client said no id
    assert session.inbound("no header", transport) == ("no header", None)
    assert transport.sent == []
    numbering = Session("me", Resume(client="page-0123456789ab"))
    assert numbering.inbound('{"n":7}\nseven', transport) == ("seven", 7)
    assert numbering.inbound(b'{"n":8}\n\x08', transport) == (b"\x08", 8)
    for bad in ('{"n":0}\nx', '{"n":true}\nx', '{"n":"1"}\nx', '{"n":1\nx', b'\xff\nx'):
        assert numbering.inbound(bad, transport) is None


def test_a_ping_is_answered_at_once() -> None:
    session, transport = Session("me", None), Recorder()
    assert session.inbound('{"t":"ping"}\n', transport) is None
    assert session.inbound(b'{"t":"ping"}\n', transport) is None
    assert transport.sent == ['{"t":"pong"}\n', '{"t":"pong"}\n']


def test_broadcasts_carry_group_and_position_and_are_sent_once() -> None:
    session, transport = Session("me", None), Recorder()
    one = Frame("hi", "lobby", Pos("e", 1))
    assert session.offer(one, transport)
    assert session.offer(one, transport)  # the same position again: taken, not sent
    session.offer(Frame("ho", "lobby", Pos("e", 2)), transport)
    session.offer(Frame("new epoch", "lobby", Pos("f", 1)), transport)
    session.offer(Frame(b"\x01", "lobby", None), transport)
    assert transport.sent == [
        '{"g":"lobby","p":"e:1"}\nhi', '{"g":"lobby","p":"e:2"}\nho', '{"g":"lobby","p":"f:1"}\nnew epoch',
        b'{"g":"lobby"}\n\x01',
    ]


def test_a_recovery_sends_the_replay_then_joined_then_what_was_held_without_duplicates() -> None:
    session, transport = Session("me", Resume({"lobby": ("e", 2)}, ["old"])), Recorder()
    assert session.hold("lobby") == ("e", 2)
    session.offer(Frame("live 4", "lobby", Pos("e", 4)), transport)  # both live and in the history read
    session.offer(Frame("live 5", "lobby", Pos("e", 5)), transport)  # after the read
    assert transport.sent == []
    entries = [(Pos("e", 3), "three", None), (Pos("e", 4), "live 4", "old")]  # 4 excluded the old connection
    session.recovered("lobby", transport, ("e", 2), entries, Pos("e", 4), True)
    assert transport.sent == [
        '{"g":"lobby","p":"e:3"}\nthree',
        '{"t":"joined","g":"lobby","r":true,"p":"e:4"}\n',
        '{"g":"lobby","p":"e:5"}\nlive 5',
    ]
    session.offer(Frame("live 5", "lobby", Pos("e", 5)), transport)
    assert len(transport.sent) == 3


def test_joined_says_what_could_not_be_recovered() -> None:
    fresh, transport = Session("me", None), Recorder()
    fresh.hold("g")
    fresh.recovered("g", transport, None, [], Pos("e", 9), None)
    fresh.hold("h")
    fresh.recovered("h", transport, None, [], None, None)  # no history
    away = Session("me", Resume({"g": ("e", 1)}))
    away.hold("g")
    away.recovered("g", transport, ("e", 1), [], None, False)  # history off or unreachable
    assert [json.loads(m.rstrip("\n")) for m in transport.sent] == [  # type: ignore[union-attr]
        {"t": "joined", "g": "g", "r": None, "p": "e:9"},
        {"t": "joined", "g": "h", "r": None},
        {"t": "joined", "g": "g", "r": False},  # the client keeps the position it has
    ]
