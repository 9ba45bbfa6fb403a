"""The msgpack control plane: ``simvirt ctl SOCKET COMMAND ...``.

A unix stream socket carrying msgpack maps, one request and one reply at a
time: ``{"cmd": "balloon", "size": 536870912}`` -> ``{"ok": true, ...}``;
failures are ``{"ok": false, "error": "..."}`` and never close the server.
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket
from typing import Any, Awaitable, Callable, Union

import msgpack

from simvirt.runtime import bind_unix

log = logging.getLogger(__name__)

Handler = Callable[[dict], Union[dict, Awaitable[dict]]]
MAX_REQUEST = 1 << 16


class ControlError(Exception):
    """A command the handler refuses; its message goes back to the client."""


async def serve_control(path: str, handler: Handler) -> asyncio.AbstractServer:
    """Serve msgpack requests on a unix socket only our user can connect to."""

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        unpacker = msgpack.Unpacker(raw=False, max_buffer_size=MAX_REQUEST)
        fed = consumed = 0
        try:
            while True:
                data = await reader.read(4096)
                if not data:
                    if consumed < fed:  # EOF in the middle of a request
                        writer.write(msgpack.packb({"ok": False, "error": "malformed request: truncated msgpack"}))
                        await writer.drain()
                    break
                fed += len(data)
                try:
                    unpacker.feed(data)
                    requests = []
                    for obj in unpacker:
                        requests.append(obj)
                        consumed = unpacker.tell()  # end of the last complete request
                except (msgpack.exceptions.BufferFull, ValueError, msgpack.exceptions.ExtraData) as e:
                    why = str(e) or type(e).__name__
                    writer.write(msgpack.packb({"ok": False, "error": f"malformed request: {why}"}))
                    await writer.drain()
                    break
                for req in requests:
                    reply = await _dispatch(handler, req)
                    writer.write(msgpack.packb(reply, use_bin_type=True))
                    await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    return await asyncio.start_unix_server(client, sock=bind_unix(path, backlog=16))


async def _dispatch(handler: Handler, req: Any) -> dict:
    if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
        return {"ok": False, "error": "request must be a map with a string 'cmd'"}
    try:
        out = handler(req)
        if asyncio.iscoroutine(out) or isinstance(out, asyncio.Future):
            out = await out
        reply = {"ok": True}
        reply.update(out or {})
        return reply
    except (ControlError, ValueError, KeyError, TypeError) as e:
        return {"ok": False, "error": str(e) or type(e).__name__}
    except Exception as e:  # noqa: BLE001 - report, never crash the server
        log.exception("control command %r failed", req.get("cmd"))
        return {"ok": False, "error": f"internal error: {e}"}


def request(path: str, msg: dict, timeout: float = 10.0) -> dict:
    """Blocking client: send one request, return the reply map."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(msgpack.packb(msg, use_bin_type=True))
        unpacker = msgpack.Unpacker(raw=False)
        while True:
            data = s.recv(65536)
            if not data:
                raise ConnectionError("control socket closed without a reply")
            unpacker.feed(data)
            for reply in unpacker:
                return reply


async def arequest(path: str, msg: dict, timeout: float = 10.0) -> dict:
    reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(path), timeout)
    try:
        writer.write(msgpack.packb(msg, use_bin_type=True))
        await writer.drain()
        unpacker = msgpack.Unpacker(raw=False)
        while True:
            data = await asyncio.wait_for(reader.read(65536), timeout)
            if not data:
                raise ConnectionError("control socket closed without a reply")
            unpacker.feed(data)
            for reply in unpacker:
                return reply
    finally:
        writer.close()


def impair_command(device, settings_cls, req: dict) -> dict:
    """The ``impair`` command of blk and net devices: parse strictly, replace, report what is set."""
    try:
        settings = settings_cls.from_request(req)
    except ValueError as e:
        raise ControlError(f"impair: {e}") from None
    device.set_impairment(settings)
    return {"impair": settings.as_dict()}


def balloon_handler(device) -> Handler:
    """Commands a balloon device process understands."""
    from simvirt.sizes import parse_size

    async def handle(req: dict) -> dict:
        cmd = req["cmd"]
        if cmd == "balloon":
            if "size" not in req:
                raise ControlError("balloon needs 'size' (target guest memory, e.g. 512M)")
            device.set_guest_memory(parse_size(req["size"]))
            return device.info()
        if cmd == "balloon-target-pages":
            if "pages" not in req:
                raise ControlError("balloon-target-pages needs 'pages'")
            device.set_target_pages(int(req["pages"]))
            return device.info()
        if cmd == "balloon-stats":
            return await device.fresh_stats(float(req.get("timeout", 2.0)))
        if cmd == "info":
            return device.info()
        raise ControlError(f"unknown command {cmd!r} (balloon, balloon-stats, info)")

    return handle

