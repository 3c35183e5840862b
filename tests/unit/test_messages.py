"""Messages and their checks (a leaf every layer uses)."""

from __future__ import annotations

import pytest

from dwebsocket.messages import Frame, check_close_code, check_message, message_size


@pytest.mark.parametrize("code", [999, 1004, 1005, 1006, 1015, 2000, 5000])
def test_close_codes_a_server_may_not_send_are_refused(code):
    with pytest.raises(ValueError, match="close code"):
        check_close_code(code, "")


def test_close_reason_must_fit_in_a_frame():
    check_close_code(1000, "x" * 123)
    with pytest.raises(ValueError, match="123 bytes"):
        check_close_code(1000, "é" * 62)


def test_broadcast_frame_is_built_once_and_matches_wsproto():
    frame = Frame("hi")
    assert frame.data == b"\x81\x02hi"
    assert frame.data is frame.data
    assert Frame(b"\x00" * 200).data[:4] == b"\x82\x7e\x00\xc8"
    assert (Frame("é").size, Frame(b"ab").size) == (2, 2)


def test_message_size_is_utf8_bytes():
    assert message_size("abc") == 3 and message_size("é") == 2 and message_size(b"\x00") == 1


def test_check_message_takes_str_and_bytes_like_and_names_the_fix():
    assert check_message("a") == "a" and check_message(bytearray(b"b")) == b"b"
    assert check_message(memoryview(b"c")) == b"c"
    with pytest.raises(TypeError, match="json.dumps"):
        check_message(1)



@pytest.mark.parametrize("text", ["\ud800", "ok \udfff", "é\ud83d", "\udcff" * 3])
def test_text_that_utf8_cannot_encode_is_refused_at_the_call_naming_the_fix(text):
    # A lone surrogate (from surrogateescape decoding, or a JSON "\ud800" escape)
    # passed the check before and failed later, in the thread writing it.
    with pytest.raises(ValueError, match="lone surrogate") as refused:
        check_message(text)
    assert "valid Unicode" in str(refused.value) and "send bytes" in str(refused.value)
    assert check_message("\ud83d\ude00".encode("utf-16", "surrogatepass").decode("utf-16")) == "😀"


def test_a_close_reason_that_utf8_cannot_encode_is_refused():
    with pytest.raises(ValueError, match="A close reason must be valid Unicode"):
        check_close_code(1000, "bye \ud800")
