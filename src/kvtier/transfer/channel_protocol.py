"""The PD transfer channel's control messages: typed msgspec/msgpack in length-prefixed frames.

A channel carries no KV bytes itself: the producer hands the consumer *handles* to memory that
already holds a chunk's KV (a CUDA IPC handle to a device allocation, or the name of a host
shared-memory block), the consumer maps that memory, copies what it needs and says ``Done``, and
the producer lets the memory go. Exchange, over one local (Unix) socket per consumer::

    consumer                              producer
    Hello(version, host, device, accept)  ->
                                          <- Hello(version, host, device, accept)
    Fetch(req, [chunk digests])           ->
                                          <- Offer(req, [Item(key, handle, dtype, shape, ...)])
    (map, copy, unmap)
    Done(req)                             ->   (the offered memory may be freed from now on)

``Offer.items`` is the leading run of the asked keys the producer holds (possibly empty): a
hole ends it, as everywhere in kvtier, and the consumer takes the rest from the tiers.

Invariants: nothing is unpickled (msgspec decodes a closed union of ``Struct``s, every list,
string and bytes field bounded by ``msgspec.Meta``); a frame's length is checked before its
body is read (``MAX_FRAME_BYTES``); a wrong version or an undecodable frame is a
``ChannelProtocolError`` and the connection is dropped, which the consumer treats as "peer
unreachable": the tier path.
"""

from __future__ import annotations

import socket
import struct
from typing import Annotated, Literal

import msgspec

from kvtier.errors import KVTierError

CHANNEL_VERSION = 1
MAX_FRAME_BYTES = 1 << 20
MAX_KEYS = 4096
PREFIX = struct.Struct("<I")

Str = Annotated[str, msgspec.Meta(max_length=256)]
Key = Annotated[bytes, msgspec.Meta(max_length=64)]
Dims = Annotated[list[Annotated[int, msgspec.Meta(ge=0)]], msgspec.Meta(max_length=8)]
HandleKind = Literal["cuda", "shm"]


class ChannelProtocolError(KVTierError, ValueError):
    """A channel frame that is not a valid message of this version (the connection is dropped)."""


class ChannelClosedError(KVTierError, ConnectionError):
    """The channel's peer closed the connection."""


class ChannelItemError(KVTierError, ValueError):
    """An offered item that does not describe memory this side can map safely."""


class Hello(msgspec.Struct, tag="hello", tag_field="t"):
    """Who is at this end: protocol version, host identity, device, and handle kinds it maps."""

    version: int
    host: Str
    device: Str
    """``cuda:<index>`` or ``cpu``."""
    accept: Annotated[list[HandleKind], msgspec.Meta(max_length=4)]


class Fetch(msgspec.Struct, tag="fetch", tag_field="t"):
    req: int
    keys: Annotated[list[Key], msgspec.Meta(max_length=MAX_KEYS)]


class CudaHandle(msgspec.Struct, tag="cuda", tag_field="k"):
    """What ``torch.UntypedStorage._share_cuda_()`` exports (the fields of torch's own
    ``rebuild_cuda_tensor``), sent as data instead of a pickle."""

    device: int
    handle: Annotated[bytes, msgspec.Meta(max_length=256)]
    size_bytes: Annotated[int, msgspec.Meta(ge=0)]
    offset_bytes: Annotated[int, msgspec.Meta(ge=0)]
    ref_counter_handle: Annotated[bytes, msgspec.Meta(max_length=1024)]
    ref_counter_offset: Annotated[int, msgspec.Meta(ge=0)]
    event_handle: Annotated[bytes, msgspec.Meta(max_length=256)] | None
    event_sync_required: bool


class ShmHandle(msgspec.Struct, tag="shm", tag_field="k"):
    """A host shared-memory block (``multiprocessing.shared_memory``) holding the tensor's bytes."""

    name: Str
    size_bytes: Annotated[int, msgspec.Meta(ge=0)]


class Item(msgspec.Struct):
    """One chunk's KV: a strided tensor view into the memory ``handle`` names."""

    key: Key
    handle: CudaHandle | ShmHandle
    dtype: Str
    shape: Dims
    stride: Dims
    offset: Annotated[int, msgspec.Meta(ge=0)]
    """Element offset of the view in that memory."""


class Offer(msgspec.Struct, tag="offer", tag_field="t"):
    req: int
    items: Annotated[list[Item], msgspec.Meta(max_length=MAX_KEYS)]


class Done(msgspec.Struct, tag="done", tag_field="t"):
    req: int


class Refuse(msgspec.Struct, tag="refuse", tag_field="t"):
    """The producer will not offer to this consumer (another host, no common handle kind)."""

    reason: Annotated[str, msgspec.Meta(max_length=1024)]


Message = Hello | Fetch | Offer | Done | Refuse

_ENC = msgspec.msgpack.Encoder()
_DEC = msgspec.msgpack.Decoder(Message)


def encode(msg: Message) -> bytes:
    body = _ENC.encode(msg)
    if len(body) > MAX_FRAME_BYTES:
        raise ChannelProtocolError(f"channel message of {len(body)} bytes exceeds {MAX_FRAME_BYTES}")
    return PREFIX.pack(len(body)) + body


def decode(body: bytes) -> Message:
    try:
        return _DEC.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise ChannelProtocolError(f"bad channel frame: {e}") from None


def send(sock: socket.socket, msg: Message) -> None:
    sock.sendall(encode(msg))


def recv(sock: socket.socket) -> Message:
    """The next message; ``ConnectionError`` on EOF, ``ChannelProtocolError`` on a bad frame."""
    (n,) = PREFIX.unpack(_exact(sock, PREFIX.size))
    if n > MAX_FRAME_BYTES:
        raise ChannelProtocolError(f"channel frame of {n} bytes exceeds {MAX_FRAME_BYTES}")
    return decode(_exact(sock, n))


def _exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:])
        if not k:
            raise ChannelClosedError("channel peer closed the connection")
        got += k
    return bytes(buf)
