"""Bad input never stops the daemon: garbage, truncated, oversized, wrong-version frames, bad
tokens, and fuzzed messages get an error reply or a closed connection, and others keep being served."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.server.conftest import hello, raw_connect, read_reply

from kvtier.config import Config
from kvtier.server.process import DaemonProcess
from kvtier.server.service import CacheService
from kvtier.tiers.remote import RemoteTier
from kvtier.wire import protocol as P

FUZZ = settings(deadline=None, derandomize=True, suppress_health_check=list(HealthCheck), database=None)


def _alive(d: DaemonProcess) -> None:
    """The daemon process runs and answers a fresh, well-behaved client."""
    assert d.proc is not None and d.proc.poll() is None, d.log_tail()
    s = raw_connect(d.port)
    try:
        assert isinstance(hello(s), P.Welcome)
        s.sendall(P.encode_frame(P.Ping()))
        assert isinstance(read_reply(s), P.Pong)
    finally:
        s.close()


def _error_or_closed(s) -> P.Message | None:  # type: ignore[no-untyped-def]
    r = read_reply(s)
    assert r is None or isinstance(r, P.Error), r
    return r


@pytest.mark.parametrize("n", [1, 11, 12, 13, 100, 4096, 70000])
def test_random_bytes_on_the_socket(daemon: DaemonProcess, n: int) -> None:
    bystander = raw_connect(daemon.port)
    assert isinstance(hello(bystander), P.Welcome)
    s = raw_connect(daemon.port)
    try:
        s.sendall(os.urandom(n))
        if n >= P.PREFIX.size:
            _error_or_closed(s)
    except (BrokenPipeError, ConnectionResetError):
        pass  # closed on us mid-send: allowed
    finally:
        s.close()
    bystander.sendall(P.encode_frame(P.Ping()))  # a client connected before is unaffected
    assert isinstance(read_reply(bystander), P.Pong)
    bystander.close()
    _alive(daemon)


def test_oversized_truncated_and_wrong_version(daemon: DaemonProcess) -> None:
    s = raw_connect(daemon.port)  # a header length far past the pre-handshake limit: refused unread
    s.sendall(P.PREFIX.pack(P.MAGIC, 1 << 31, 0))
    r = _error_or_closed(s)
    assert r is not None and "header length" in r.message
    s.close()
    s = raw_connect(daemon.port)  # a payload before the handshake
    s.sendall(P.PREFIX.pack(P.MAGIC, 10, 1 << 30))
    assert _error_or_closed(s) is not None
    s.close()
    s = raw_connect(daemon.port)  # a frame cut short, then the client vanishes
    s.sendall(P.encode_frame(P.Hello(P.PROTOCOL_VERSION))[:15])
    s.close()
    s = raw_connect(daemon.port)
    s.sendall(P.encode_frame(P.Hello(P.PROTOCOL_VERSION + 7)))
    r = _error_or_closed(s)
    assert r is not None and "version" in r.message
    s.close()
    _alive(daemon)


def test_invalid_request_is_answered_and_connection_stays(daemon: DaemonProcess) -> None:
    s = raw_connect(daemon.port)
    assert isinstance(hello(s), P.Welcome)
    bad = P.Reserve([P.PutItem(b"k" * 16, P.ItemMeta(b"", 1, [2, 2], "complex64"))])
    s.sendall(P.encode_frame(bad))
    r = read_reply(s)
    assert isinstance(r, P.Error) and r.code == "invalid" and "complex64" in r.message
    huge = P.Put([P.PutItem(b"k" * 16, P.ItemMeta(b"", 1, [64], "float32"), 0)])  # 256 B claimed, none sent
    s.sendall(P.encode_frame(huge))
    r = read_reply(s)
    assert isinstance(r, P.Error) and "overruns" in r.message
    s.sendall(P.encode_frame(P.Ping()))
    assert isinstance(read_reply(s), P.Pong)
    # past a bound (too many keys): a decode error names it, and the connection is closed
    body = msgspec.msgpack.encode({"t": "prefix", "keys": [b"k" * 16] * (P.MAX_KEYS + 1)})
    s.sendall(P.PREFIX.pack(P.MAGIC, len(body), 0) + body)
    r = _error_or_closed(s)
    assert r is not None and "length" in r.message
    s.close()
    _alive(daemon)


def test_fuzzed_frames_on_a_real_socket(daemon: DaemonProcess) -> None:
    @settings(FUZZ, max_examples=300)
    @given(st.binary(max_size=300), st.integers(0, 2))
    def run(junk: bytes, how: int) -> None:
        s = raw_connect(daemon.port, timeout_s=3.0)
        try:
            if how == 0:  # raw junk
                s.sendall(junk)
            elif how == 1:  # a well-formed prefix around a junk header
                s.sendall(P.PREFIX.pack(P.MAGIC, max(1, len(junk)), 0) + junk)
            else:  # junk after a good handshake
                assert isinstance(hello(s), P.Welcome)
                s.sendall(P.PREFIX.pack(P.MAGIC, max(1, len(junk)), 0) + (junk or b"\x00"))
            if how:
                _error_or_closed(s)
        except (BrokenPipeError, ConnectionResetError):
            pass
        finally:
            s.close()

    run()
    _alive(daemon)


@settings(FUZZ, max_examples=6_000)
@given(st.binary(max_size=200))
def test_decoder_fuzz_only_raises_protocol_error(data: bytes) -> None:
    with contextlib.suppress(P.ProtocolError):
        P.decode_header(data)


_keys = st.lists(st.binary(min_size=16, max_size=16), max_size=8)
_meta = st.builds(
    P.ItemMeta,
    st.binary(max_size=8),
    st.integers(0, 1 << 20),
    st.lists(st.integers(0, 1 << 31), max_size=8),
    st.sampled_from([*P.KV_DTYPES, "complex64", "", "float"]),
)
_item = st.builds(P.PutItem, st.binary(min_size=16, max_size=16), _meta, st.integers(0, 1 << 20))
_messages = st.one_of(
    st.builds(P.Prefix, _keys),
    st.builds(P.Contains, _keys),
    st.builds(P.Get, _keys, st.booleans()),
    st.builds(P.Reserve, st.lists(_item, max_size=4)),
    st.builds(P.Commit, st.lists(st.integers(0, 50), max_size=4)),
    st.builds(P.Put, st.lists(_item, max_size=4)),
    st.builds(P.Remove, _keys),
    st.builds(P.Stats),
    st.builds(P.Release, st.lists(st.integers(0, 50), max_size=4)),
    st.builds(P.Hello, st.integers()),
)


def test_service_fuzz_answers_or_raises_protocol_error(tmp_path: Path) -> None:
    """4k well-typed but arbitrary requests against the real request handlers (with the 6k of
    the decoder fuzz and the socket fuzz: > 10k cases per run)."""
    svc = CacheService(
        Config.load(env={}, cpu__max_bytes="4MiB"), shm_dir=str(tmp_path), max_payload_bytes=1 << 22
    )
    session = svc.new_session("fuzz")

    @settings(FUZZ, max_examples=4_000)
    @given(_messages, st.binary(max_size=512))
    def run(msg: P.Message, payload: bytes) -> None:
        if isinstance(msg, P.Release):
            svc.release(session, msg.leases)
            return
        try:
            reply, _, after = svc.handle(session, msg, bytearray(payload))
        except P.ProtocolError:
            return
        for cb in after:
            cb()
        assert not isinstance(reply, P.Error)

    try:
        run()
        svc.end_session(session)
        svc.cpu.pool.check_invariants()
        assert svc.cpu.pool.used_bytes == svc.cpu.stats().bytes_used
    finally:
        svc.close()


def test_auth_token_required_and_compared(tmp_path: Path) -> None:
    tok = tmp_path / "token"
    tok.write_text("s3cret-token\n")
    with DaemonProcess("--cpu-size", "8MiB", "--auth-token-file", str(tok)) as d:
        for token in ("", "wrong", "s3cret-token-and-more"):
            s = raw_connect(d.port)
            r = hello(s, token)
            assert isinstance(r, P.Error) and r.code == "auth", r
            assert read_reply(s) is None  # closed after refusing
            s.close()
        s = raw_connect(d.port)
        assert isinstance(hello(s, "s3cret-token"), P.Welcome)
        s.close()
        bad = RemoteTier(d.url, token="nope", timeout_s=2.0)  # refused: a miss, never an exception
        assert bad.get(b"k" * 16) is None and bad.prefix_contains([b"k" * 16]) == 0
        assert bad.stats().errors >= 1
        bad.close()
        good = RemoteTier(d.url, token_file=str(tok))
        assert good.prefix_contains([b"k" * 16]) == 0 and good.stats().errors == 0
        good.close()


def test_non_loopback_bind_without_token_is_refused() -> None:
    t0 = time.monotonic()
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "kvtier.cli",
            "server",
            "--host",
            "0.0.0.0",
            "--port",
            "0",
            "--http-port",
            "0",
            "--cpu-size",
            "1MiB",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2, r.stderr
    assert "non-loopback" in r.stderr and "--auth-token-file" in r.stderr
    assert time.monotonic() - t0 < 60
