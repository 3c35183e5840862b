"""System checks: each mistake in the settings gets a message that names the fix."""

from __future__ import annotations

import pytest
from django.core.checks import run_checks
from django.test import override_settings


def dwebsocket_messages():
    return sorted((m.id, m.msg) for m in run_checks() if m.id and m.id.startswith("dwebsocket."))


# -- system checks ------------------------------------------------------------


def test_default_settings_pass_the_checks():
    assert dwebsocket_messages() == []


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("WEBSOCKET_MAX_MESSAGE_SIZE", -1),
        ("WEBSOCKET_MAX_MESSAGE_SIZE", "1MB"),
        ("WEBSOCKET_MAX_QUEUE", None),
        ("WEBSOCKET_MAX_QUEUE", 1.5),
        ("WEBSOCKET_PING_INTERVAL", 0),
        ("WEBSOCKET_PING_TIMEOUT", "20"),
        ("WEBSOCKET_CLOSE_TIMEOUT", None),
        ("WEBSOCKET_BROADCAST_QUEUE", 0),
        ("WEBSOCKET_HISTORY_SIZE", -1),
        ("WEBSOCKET_HISTORY_SIZE", "100"),
        ("WEBSOCKET_HISTORY_SIZE", 1.5),
        ("WEBSOCKET_HISTORY_SIZE", None),
        ("WEBSOCKET_HISTORY_TTL", 0),
        ("WEBSOCKET_HISTORY_TTL", None),
        ("WEBSOCKET_HISTORY_TTL", "300"),
        ("WEBSOCKET_OUTAGE_BUFFER", -1),
        ("WEBSOCKET_OUTAGE_BUFFER", "1000"),
        ("WEBSOCKET_OUTAGE_BUFFER", None),
        ("WEBSOCKET_OUTAGE_BUFFER", True),
    ],
)
def test_wrong_setting_values_are_reported(setting, value):
    with override_settings(**{setting: value}):
        messages = dwebsocket_messages()
    assert len(messages) == 1
    check_id, text = messages[0]
    assert check_id == "dwebsocket.E001"
    assert text.startswith(f"{setting} must be a positive")


@pytest.mark.parametrize("setting", ["WEBSOCKET_MAX_MESSAGE_SIZE", "WEBSOCKET_PING_INTERVAL", "WEBSOCKET_PING_TIMEOUT"])
def test_none_turns_a_limit_off(setting):
    with override_settings(**{setting: None}):
        assert dwebsocket_messages() == []


@pytest.mark.parametrize("setting", ["WEBSOCKET_HISTORY_SIZE", "WEBSOCKET_OUTAGE_BUFFER"])
def test_a_count_of_0_turns_its_feature_off_and_is_no_mistake(setting):
    with override_settings(**{setting: 0}):
        assert dwebsocket_messages() == []


def test_allowed_origins_must_be_a_list_of_strings():
    with override_settings(WEBSOCKET_ALLOWED_ORIGINS="https://example.com"):
        assert [m[0] for m in dwebsocket_messages()] == ["dwebsocket.E002"]


def test_allowed_origins_with_a_star_is_a_warning_that_names_the_risk():
    with override_settings(WEBSOCKET_ALLOWED_ORIGINS=["https://app.example.com", "*"]):
        messages = dwebsocket_messages()
    assert [m[0] for m in messages] == ["dwebsocket.W002"]
    assert "every web site" in messages[0][1]
    with override_settings(WEBSOCKET_ALLOWED_ORIGINS=["https://app.example.com"]):
        assert dwebsocket_messages() == []


def test_missing_middleware_is_a_warning():
    from django.conf import settings

    middleware = [m for m in settings.MIDDLEWARE if "dwebsocket" not in m]
    with override_settings(MIDDLEWARE=middleware):
        assert [m[0] for m in dwebsocket_messages()] == ["dwebsocket.W001"]


# -- origins ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "value", "check_id"),
    [
        ("WEBSOCKET_BROADCAST_OVERFLOW", "block", "dwebsocket.E003"),
        ("WEBSOCKET_BROKER", "redis", "dwebsocket.E004"),
        ("WEBSOCKET_BROKER", None, "dwebsocket.E004"),
    ],
)
def test_wrong_broker_settings_are_reported(setting, value, check_id):
    with override_settings(**{setting: value}):
        assert [m[0] for m in dwebsocket_messages()] == [check_id]


def test_deploy_check_reports_an_unreachable_redis():
    from tests.servers import free_port

    with override_settings(WEBSOCKET_BROKER=f"redis://127.0.0.1:{free_port()}/0"):
        assert dwebsocket_messages() == []  # the normal checks do not connect
        deploy = [m for m in run_checks(include_deployment_checks=True) if m.id == "dwebsocket.E005"]
    assert len(deploy) == 1 and "cannot be reached" in deploy[0].msg

