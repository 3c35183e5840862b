"""Redis URLs (dwebsocket._redis.parse): one Redis, a Redis Cluster, a Sentinel set; each mistake named."""

from __future__ import annotations

import pytest
import redis
from django.core.checks import run_checks
from django.core.exceptions import ImproperlyConfigured
from django.test import override_settings

from dwebsocket import _redis
from dwebsocket.groups.brokers.redis import _channel, _history_key, _meta_key, _presence_key
from dwebsocket.transports.polling.redis_store import _keys, _owner_channel


def test_one_redis_urls_are_redis_pys_own():
    for url in ("redis://127.0.0.1:6379/0", "rediss://u:p@h:6380/1", "unix:///run/redis.sock"):
        target = _redis.parse(url)
        assert target.kind == "single" and target.url == url
    assert _redis.parse("rediss://h:6380/0").tls


def test_a_cluster_url_lists_its_nodes_and_credentials():
    target = _redis.parse("rediss+cluster://app:s%40cret@10.0.0.1:7000,10.0.0.2:7001,[::1]:7002/0")
    assert target.kind == "cluster" and target.tls
    assert target.nodes == (("10.0.0.1", 7000), ("10.0.0.2", 7001), ("::1", 7002))
    assert (target.username, target.password) == ("app", "s@cret")
    assert _redis.parse("redis+cluster://h:7000").nodes == (("h", 7000),)
    assert _redis.parse("redis+cluster://:pw@h:7000/").password == "pw"
    assert _redis.is_cluster("redis+cluster://h:7000") and not _redis.is_cluster("redis://h:6379/0")


def test_a_sentinel_url_names_the_sentinels_the_service_and_maybe_a_database():
    target = _redis.parse("redis+sentinel://s1:26379,s2:26379/mymaster?sentinel_password=x")
    assert target.kind == "sentinel" and not target.tls
    assert target.nodes == (("s1", 26379), ("s2", 26379))
    assert (target.service, target.db) == ("mymaster", 0)
    assert dict(target.options) == {"sentinel_password": "x"}
    target = _redis.parse("rediss+sentinel://pw@s1:26379/mymaster/3")
    assert (target.service, target.db, target.tls, target.password) == ("mymaster", 3, True, "pw")


@pytest.mark.parametrize(("url", "says"), [
    ("redis+cluster://", "is not host:port"),
    ("redis+cluster://h", "is not host:port"),
    ("redis+cluster://h:port", "is not host:port"),
    ("redis+cluster://h:70000", "is not host:port"),
    ("redis+cluster://h:7000,", "is not host:port"),
    ("redis+cluster://h:7000/1", "database 0 only"),
    ("redis+cluster://h:7000?db=1", "unknown parameter 'db'"),
    ("redis+sentinel://s1:26379", "names no service"),
    ("redis+sentinel://s1:26379/", "names no service"),
    ("redis+sentinel://s1:26379/svc/x", "only a database number"),
    ("redis+sentinel://s1:26379/svc/1/2", "only a database number"),
    ("redis+sentinel://s1:26379/svc?timeout=1", "unknown parameter 'timeout'"),
    ("redis+sentinel://s1:26379/svc#x", "no #fragment"),
    ("memcached://h:11211", "is not a Redis URL"),
])
def test_each_malformed_url_is_named(url, says):
    with pytest.raises(ImproperlyConfigured, match=says.replace("(", r"\(")):
        _redis.parse(url)


@pytest.mark.parametrize("url", ["redis+cluster://h", "redis+sentinel://s1:26379"])
def test_the_system_check_reports_a_malformed_url(url):
    with override_settings(WEBSOCKET_BROKER=url):
        found = [m for m in run_checks() if m.id == "dwebsocket.E009"]
    assert len(found) == 1 and url in found[0].msg


def test_good_urls_pass_the_checks_without_connecting():
    for url in ("redis+cluster://127.0.0.1:1,127.0.0.1:2", "redis+sentinel://127.0.0.1:1/svc/2"):
        with override_settings(WEBSOCKET_BROKER=url):
            assert [m.id for m in run_checks() if m.id and m.id.startswith("dwebsocket.E")] == []


def test_the_installed_redis_py_has_sharded_pub_sub():
    # redis-py 5.0 (the oldest supported) has it already; a cluster URL needs it.
    assert _redis.sharded_pubsub_supported(), redis.__version__


def test_clients_of_each_kind_are_made_without_connecting():
    cluster = _redis.client("redis+cluster://127.0.0.1:1", 1.0)  # nothing listens there
    with pytest.raises(redis.ConnectionError):
        cluster.ping()  # made on use, and failing as a redis-py error the breaker knows
    sentinel = _redis.client("redis+sentinel://127.0.0.1:1/svc/2", 1.0)
    assert isinstance(sentinel, redis.Redis)
    assert sentinel.connection_pool.connection_kwargs["db"] == 2
    assert sentinel.connection_pool.connection_kwargs["socket_timeout"] == 1.0
    with pytest.raises(redis.ConnectionError):
        sentinel.ping()


def test_a_group_s_keys_and_channel_share_one_hash_tag_on_a_cluster():
    from redis.crc import key_slot

    names = ("chat", "a{b}c", "}x", "{", "#", "room:1", "ünï")
    for group in names:
        keys = (_channel(group, True), _presence_key(group, True), _meta_key(group, True), _history_key(group, True))
        assert len({key_slot(k.encode()) for k in keys}) == 1, group
    # Each group its own keys, a brace in its name or not.
    assert len({_meta_key(g, True) for g in names}) == len(names)
    assert _meta_key("chat", True) == "dwebsocket:{chat}:meta" == _meta_key("chat")
    assert _meta_key("}x") == "dwebsocket:{}x}:meta"  # one Redis: today's names
    # One Redis keeps today's names, so processes of the last release still talk with these.
    assert _channel("chat") == "dwebsocket:group:chat" and _presence_key("chat") == "dwebsocket:presence:chat"
    session = _keys("abc", True)
    assert len({key_slot(k.encode()) for k in session}) == 1 and session.base == "dwebsocket:poll:{abc}"
    assert _keys("abc").base == "dwebsocket:poll:abc"
    assert _owner_channel("o1", True) == "dwebsocket:poll-owner:{o1}"
