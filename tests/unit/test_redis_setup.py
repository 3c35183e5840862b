"""The one Redis set-up of a process (dwebsocket._redis): clients and their timeouts."""

from __future__ import annotations

import asyncio
import gc
import weakref

from dwebsocket import _redis

URL = "redis://127.0.0.1:1/0"  # never connected to: making a client does not connect


def test_quick_commands_have_a_timeout_and_blocking_ones_outlast_their_wait():
    quick = _redis.client(URL).connection_pool.connection_kwargs
    assert quick["socket_timeout"] == _redis.COMMAND_TIMEOUT
    blocking = _redis.blocking_client(URL, 25.0).connection_pool.connection_kwargs
    assert blocking["socket_timeout"] > 25.0  # a 25 s BLPOP is not cut by the socket
    assert _redis.client(URL) is _redis.client(URL)  # one per process
    # What a caller waits for is short: a hung Redis holds a broadcast or a
    # group_size() for this long at most (then the broker's breaker opens).
    for timeout in (_redis.PUBLISH_TIMEOUT, _redis.PRESENCE_TIMEOUT):
        kwargs = _redis.client(URL, timeout).connection_pool.connection_kwargs
        assert kwargs["socket_timeout"] == timeout <= 1.0
        assert kwargs["socket_connect_timeout"] <= timeout


def test_each_event_loop_gets_its_own_asyncio_client_and_it_goes_with_the_loop():
    async def get():
        return _redis.aclient(URL, 5.0)

    by_loop_id: dict[int, object] = {}
    clients = []  # kept alive, so that no two of them share an id
    for _ in range(20):
        loop = asyncio.new_event_loop()
        client = loop.run_until_complete(get())
        assert loop.run_until_complete(get()) is client  # one per loop
        assert client.connection_pool.connection_kwargs["socket_timeout"] > 5.0
        # A new loop often gets the address, so the id, of one that is gone: it
        # must get a client of its own all the same.
        assert by_loop_id.get(id(loop)) is not client
        by_loop_id[id(loop)] = client
        clients.append(client)
        ref = weakref.ref(loop)
        loop.close()
        del loop
        gc.collect()
        assert ref() is None  # the client kept for it does not keep the loop alive
