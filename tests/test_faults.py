"""The fault-injection proxy does what the resilience tests rely on."""

from __future__ import annotations

import socket
import time

import pytest
import redis

from embedded.redis_server import RedisServer
from tests.faults import FaultyProxy, restart


def _client(proxy: FaultyProxy, timeout_s: float = 1.0) -> redis.Redis:
    return redis.Redis.from_url(proxy.url(), socket_timeout=timeout_s, socket_connect_timeout=1)


def test_it_forwards_and_delays(proxy: FaultyProxy) -> None:
    client = _client(proxy)
    assert client.ping()
    proxy.delay(0.3)
    started = time.monotonic()
    assert client.ping()
    assert time.monotonic() - started >= 0.5  # the request and its answer, 0.3 s each


def test_a_blackhole_answers_nothing_and_sends_no_reset(proxy: FaultyProxy) -> None:
    client = _client(proxy, timeout_s=0.5)
    assert client.ping()
    proxy.blackhole()
    with pytest.raises(redis.TimeoutError):  # a timeout, not a reset
        client.ping()
    fresh = redis.Redis.from_url(proxy.url(), socket_timeout=0.5, socket_connect_timeout=0.5)
    with pytest.raises(redis.TimeoutError):  # new connections hang too
        fresh.ping()
    proxy.heal()
    assert _client(proxy).ping()


def test_stale_connections_answer_nothing_while_new_ones_pass(proxy: FaultyProxy) -> None:
    client = _client(proxy, timeout_s=0.5)
    assert client.ping()
    assert proxy.go_stale() == 1
    with pytest.raises(redis.TimeoutError):  # silence: no reset, no close
        client.ping()
    assert _client(proxy).ping()  # a new connection gets through


def test_reset_and_refuse_break_connections_at_once(proxy: FaultyProxy) -> None:
    raw = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    raw.sendall(b"PING\r\n")
    assert raw.recv(64) == b"+PONG\r\n"
    assert proxy.reset() == 1
    with pytest.raises(ConnectionResetError):  # an RST, not a clean close
        raw.sendall(b"PING\r\n")
        raw.recv(64)
    raw.close()
    proxy.refuse()
    started = time.monotonic()
    with pytest.raises(redis.ConnectionError):
        _client(proxy, timeout_s=5).ping()
    assert time.monotonic() - started < 2
    proxy.heal()
    assert _client(proxy).ping()


def test_a_restarted_server_with_appendonly_keeps_its_data(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    with RedisServer(tmp_path_factory.mktemp("aof"), appendonly=True) as server:
        client = redis.Redis.from_url(server.url)
        client.set("kept", "yes")
        restart(server, down_s=0.2)
        assert client.get("kept") == b"yes"
        client.close()
