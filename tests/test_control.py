"""The msgpack control socket: protocol robustness and the balloon device's commands.

First against ``serve_control`` in-process with handlers of our own (every
failure path of the server), then against a real ``simvirt device balloon``
process: every bad request gets ``{"ok": false, "error": ...}`` with a
message that says what is wrong, and the server keeps serving.
"""
from __future__ import annotations

import asyncio
import os
import socket
import sys
import tempfile
from pathlib import Path

import msgpack
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "devices" / "balloon"))
from balloon_testlib import BalloonProc, MiB, RawBalloon  # noqa: E402

from simvirt.control import MAX_REQUEST, ControlError, arequest, request, serve_control  # noqa: E402


# ---------------------------------------------------------------------------
# in-process server
# ---------------------------------------------------------------------------
async def _raw_exchange(path: str, data: bytes, *, shut: bool = False, timeout: float = 3.0,
                        want: int = 0) -> list:
    """Send raw bytes; return the replies received until the server closes, ``want`` arrived, or ``timeout``."""
    reader, writer = await asyncio.open_unix_connection(path)
    try:
        writer.write(data)
        await writer.drain()
        if shut:
            writer.write_eof()
        unpacker = msgpack.Unpacker(raw=False)
        out: list = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            left = deadline - loop.time()
            if left <= 0:
                break
            try:
                chunk = await asyncio.wait_for(reader.read(65536), left)
            except asyncio.TimeoutError:
                break
            if not chunk:
                break
            unpacker.feed(chunk)
            out.extend(unpacker)
            if want and len(out) >= want:
                break
        return out
    finally:
        writer.close()


def _with_server(handler, body):
    async def go():
        d = tempfile.mkdtemp(prefix="simvirt-ctl-test-")
        path = os.path.join(d, "ctl.sock")
        server = await serve_control(path, handler)
        try:
            return await asyncio.wait_for(body(path), 20)
        finally:
            server.close()
            await server.wait_closed()

    return asyncio.run(go())


def _echo_handler(calls: list):
    async def handler(req: dict):
        calls.append(req)
        cmd = req["cmd"]
        if cmd == "echo":
            return {"echo": req.get("value")}
        if cmd == "none":
            return None
        if cmd == "sync":
            return {"sync": True}
        if cmd == "refuse":
            raise ControlError("refused on purpose")
        if cmd == "valueerror":
            raise ValueError("bad value")
        if cmd == "keyerror":
            return {"x": req["missing"]}
        if cmd == "crash":
            raise RuntimeError("boom")
        if cmd == "slow":
            await asyncio.sleep(0.05)
            return {"slow": True}
        raise ControlError(f"unknown command {cmd!r}")

    return handler


def test_server_replies_and_merges_ok():
    calls: list = []

    async def body(path):
        assert await arequest(path, {"cmd": "echo", "value": [1, "two", b"3"]}) == {"ok": True, "echo": [1, "two", b"3"]}
        assert await arequest(path, {"cmd": "none"}) == {"ok": True}
        assert await arequest(path, {"cmd": "slow"}) == {"ok": True, "slow": True}
        # The blocking client, from a thread (the server runs on this loop).
        reply = await asyncio.to_thread(request, path, {"cmd": "echo", "value": 7})
        assert reply == {"ok": True, "echo": 7}

    _with_server(_echo_handler(calls), body)
    assert [c["cmd"] for c in calls] == ["echo", "none", "slow", "echo"]


def test_sync_handler_is_supported():
    async def body(path):
        assert await arequest(path, {"cmd": "anything"}) == {"ok": True, "sync": "anything"}

    _with_server(lambda req: {"sync": req["cmd"]}, body)


@pytest.mark.parametrize("cmd,needle", [("refuse", "refused on purpose"), ("valueerror", "bad value"),
                                        ("keyerror", "missing"), ("crash", "internal error: boom"),
                                        ("nonsense", "unknown command 'nonsense'")])
def test_handler_failures_become_error_replies_and_server_keeps_serving(cmd, needle):
    async def body(path):
        reply = await arequest(path, {"cmd": cmd})
        assert reply["ok"] is False
        assert needle in reply["error"]
        assert await arequest(path, {"cmd": "echo", "value": 1}) == {"ok": True, "echo": 1}

    _with_server(_echo_handler([]), body)


@pytest.mark.parametrize("req", [[1, 2], 5, "info", None, {"nocmd": 1}, {"cmd": 5}, {"cmd": b"info"}, {"cmd": None}])
def test_requests_that_are_not_maps_with_a_string_cmd(req):
    calls: list = []

    async def body(path):
        replies = await _raw_exchange(path, msgpack.packb(req, use_bin_type=True) + msgpack.packb({"cmd": "sync"}),
                                      want=2)
        assert len(replies) == 2
        assert replies[0] == {"ok": False, "error": "request must be a map with a string 'cmd'"}
        # The same connection goes on with the next request.
        assert replies[1] == {"ok": True, "sync": True}

    _with_server(_echo_handler(calls), body)
    assert [c["cmd"] for c in calls] == ["sync"]  # the bad request never reached the handler


def test_pipelined_requests_get_replies_in_order():
    async def body(path):
        data = b"".join(msgpack.packb({"cmd": "echo", "value": i}) for i in range(20))
        replies = await _raw_exchange(path, data, want=20)
        assert [r["echo"] for r in replies] == list(range(20))

    _with_server(_echo_handler([]), body)


def test_request_split_across_writes():
    async def body(path):
        reader, writer = await asyncio.open_unix_connection(path)
        data = msgpack.packb({"cmd": "echo", "value": "x" * 10000})
        for i in range(0, len(data), 7):
            writer.write(data[i:i + 7])
            await writer.drain()
        unpacker = msgpack.Unpacker(raw=False)
        while True:
            unpacker.feed(await asyncio.wait_for(reader.read(65536), 5))
            got = list(unpacker)
            if got:
                break
        writer.close()
        assert got == [{"ok": True, "echo": "x" * 10000}]

    _with_server(_echo_handler([]), body)


@pytest.mark.parametrize("garbage", [b"\xc1", b"\xc1\x81\xa3cmd\xa4info", b"\xd9\x05ab\xff\xfe\xfd"])
def test_malformed_msgpack_gets_an_error_and_the_server_keeps_serving(garbage):
    async def body(path):
        replies = await _raw_exchange(path, garbage)
        assert len(replies) == 1, replies
        assert replies[0]["ok"] is False
        assert "malformed" in replies[0]["error"]
        assert await arequest(path, {"cmd": "echo", "value": 2}) == {"ok": True, "echo": 2}

    _with_server(_echo_handler([]), body)


def test_map_with_non_string_keys_is_refused():
    async def body(path):
        replies = await _raw_exchange(path, msgpack.packb({1: 2}))
        assert len(replies) == 1 and replies[0]["ok"] is False and "malformed" in replies[0]["error"]
        assert await arequest(path, {"cmd": "echo", "value": 5}) == {"ok": True, "echo": 5}

    _with_server(_echo_handler([]), body)


def test_oversized_request_is_refused():
    async def body(path):
        replies = await _raw_exchange(path, msgpack.packb({"cmd": "echo", "value": "y" * (MAX_REQUEST + 10)}))
        assert len(replies) == 1 and replies[0]["ok"] is False and "malformed" in replies[0]["error"]
        assert await arequest(path, {"cmd": "echo", "value": 3}) == {"ok": True, "echo": 3}

    _with_server(_echo_handler([]), body)


def test_truncated_request_then_eof_gets_an_error_reply():
    """Half a msgpack map and then end-of-file is a malformed request, and it must be answered."""

    async def body(path):
        whole = msgpack.packb({"cmd": "echo", "value": "abc"})
        replies = await _raw_exchange(path, whole[:5], shut=True)
        assert replies and replies[0]["ok"] is False, f"no error reply for a truncated request: {replies}"
        assert await arequest(path, {"cmd": "echo", "value": 4}) == {"ok": True, "echo": 4}

    _with_server(_echo_handler([]), body)


def test_serve_control_replaces_a_stale_socket_file():
    async def go():
        d = tempfile.mkdtemp(prefix="simvirt-ctl-test-")
        path = os.path.join(d, "ctl.sock")
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(path)
        stale.close()  # the file stays behind
        server = await serve_control(path, lambda req: {"fresh": True})
        try:
            assert await arequest(path, {"cmd": "x"}) == {"ok": True, "fresh": True}
        finally:
            server.close()
            await server.wait_closed()

    asyncio.run(go())


def test_client_errors_on_missing_socket():
    with pytest.raises(FileNotFoundError):
        request("/nonexistent/simvirt-ctl.sock", {"cmd": "info"}, timeout=1)

    async def go():
        with pytest.raises(FileNotFoundError):
            await arequest("/nonexistent/simvirt-ctl.sock", {"cmd": "info"}, timeout=1)

    asyncio.run(go())


# ---------------------------------------------------------------------------
# the balloon device's control socket
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def device():
    dev = BalloonProc(metrics=False)
    yield dev
    dev.stop()


def _raw_sync(path: str, data: bytes, timeout: float = 2.0) -> list:
    out: list = []
    with socket.socket(socket.AF_UNIX) as so:
        so.settimeout(timeout)
        so.connect(path)
        so.sendall(data)
        unpacker = msgpack.Unpacker(raw=False)
        try:
            while True:
                chunk = so.recv(65536)
                if not chunk:
                    break
                unpacker.feed(chunk)
                out.extend(unpacker)
                if out:
                    break
        except socket.timeout:
            pass
    return out


def _assert_still_serving(device) -> None:
    assert device.alive
    assert device.ctl({"cmd": "info"})["ok"] is True


def test_device_malformed_msgpack(device):
    replies = _raw_sync(device.control_path, b"\xc1\xc1\xc1")
    assert len(replies) == 1 and replies[0]["ok"] is False and "malformed" in replies[0]["error"]
    _assert_still_serving(device)


def test_device_non_map_request(device):
    for req in ([1, 2, 3], "balloon", 42):
        reply = _raw_sync(device.control_path, msgpack.packb(req))[0]
        assert reply == {"ok": False, "error": "request must be a map with a string 'cmd'"}
    _assert_still_serving(device)


def test_device_unknown_command(device):
    reply = device.ctl({"cmd": "deflate-everything"})
    assert reply["ok"] is False
    assert "unknown command 'deflate-everything'" in reply["error"]
    assert "balloon" in reply["error"] and "info" in reply["error"]  # it says what is supported
    _assert_still_serving(device)


def test_device_balloon_without_size(device):
    reply = device.ctl({"cmd": "balloon"})
    assert reply["ok"] is False and "size" in reply["error"]
    _assert_still_serving(device)


def test_device_balloon_before_any_guest_connects(device):
    reply = device.ctl({"cmd": "balloon", "size": 16 * MiB})
    assert reply["ok"] is False and "no guest" in reply["error"]
    _assert_still_serving(device)


@pytest.fixture
def guest(device):
    r = RawBalloon(device.socket_path, ram=32 * MiB)
    yield r
    r.close()


@pytest.mark.parametrize("size,needle", [
    (64 * MiB, "must be in (0, 33554432]"),  # more than the guest has
    (32 * MiB + 4096, "must be in (0, 33554432]"),
    (0, "must be in (0, 33554432]"),
    ("0M", "must be in (0, 33554432]"),
    (-4096, "negative size"),
    ("12Q", "invalid size '12Q'"),
    ("", "invalid size"),
    (None, "invalid size"),
    (1.5, "invalid size"),
    ([16], "invalid size"),
])
def test_device_balloon_bad_sizes(device, guest, size, needle):
    before = device.info()["target_pages"]
    reply = device.ctl({"cmd": "balloon", "size": size})
    assert reply["ok"] is False
    assert needle in reply["error"], reply["error"]
    assert device.info()["target_pages"] == before  # nothing changed
    assert guest.config()[0] == before
    _assert_still_serving(device)


def test_device_balloon_boolean_size_is_refused(device, guest):
    """``size: true`` is not a size; it must not be read as "leave the guest 1 byte"."""
    assert device.ctl({"cmd": "balloon", "size": 32 * MiB})["ok"]
    reply = device.ctl({"cmd": "balloon", "size": True})
    assert reply["ok"] is False, f"boolean size accepted: target now {reply.get('target_pages')} pages"
    assert device.info()["target_pages"] == 0


@pytest.mark.parametrize("size,pages", [(32 * MiB, 0), ("16M", 4096), (8 * MiB, 6144), ("1", 8191), (4095, 8191)])
def test_device_balloon_good_sizes(device, guest, size, pages):
    reply = device.ctl({"cmd": "balloon", "size": size})
    assert reply["ok"] is True, reply
    assert reply["target_pages"] == pages
    assert guest.config()[0] == pages


def test_device_target_pages_errors(device, guest):
    for req, needle in [({"cmd": "balloon-target-pages"}, "pages"),
                        ({"cmd": "balloon-target-pages", "pages": -1}, "out of range"),
                        ({"cmd": "balloon-target-pages", "pages": 8193}, "exceeds guest RAM"),
                        ({"cmd": "balloon-target-pages", "pages": "zz"}, "zz")]:
        reply = device.ctl(req)
        assert reply["ok"] is False and needle in reply["error"], (req, reply)
    _assert_still_serving(device)


def test_device_balloon_stats_with_bad_timeout(device):
    reply = device.ctl({"cmd": "balloon-stats", "timeout": "soon"})
    assert reply["ok"] is False and "soon" in reply["error"]
    _assert_still_serving(device)


def test_device_many_bad_requests_on_one_connection_then_good_one(device):
    data = (b"".join(msgpack.packb(r) for r in ({"cmd": "x"}, {"cmd": "balloon"}, [1], {"cmd": "info"})))
    out: list = []
    with socket.socket(socket.AF_UNIX) as so:
        so.settimeout(5)
        so.connect(device.control_path)
        so.sendall(data)
        unpacker = msgpack.Unpacker(raw=False)
        while len(out) < 4:
            chunk = so.recv(65536)
            assert chunk, f"connection closed after {len(out)} replies"
            unpacker.feed(chunk)
            out.extend(unpacker)
    assert [r["ok"] for r in out] == [False, False, False, True]
    assert "ram_bytes" in out[3]
