"""The kvtier daemon's wire protocol: versioned msgspec/msgpack messages in length-prefixed frames.

Transport: plain asyncio TCP sockets, not ZMQ. Why: the protocol is strict request/reply per
connection (one engine, one socket), which TCP gives directly; asyncio is in the standard library
(pyzmq is not installed and would add a C dependency to every engine host); a socket per client
makes "this client died" observable (EOF/RST), which is what the daemon reaps leases and
reservations on; and length-prefixed frames let the daemon check a size *before* reading a byte
of body, which ZMQ (whole-message delivery) does not.

Frame::

    magic b"KVT1" | u32 header_len | u32 payload_len | header (msgpack) | payload (raw bytes)

* ``header`` is one msgspec ``Struct`` of the ``Message`` union, tagged by ``"t"``; decoding is
  typed and bounded (``msgspec.Meta`` limits on every list, bytes and string), so a malformed or
  oversized message is a ``ProtocolError`` naming the problem, never arbitrary objects.
  Nothing is unpickled, ever.
* ``payload`` carries KV bytes when they cannot travel by shared memory (a client on another
  host). Its layout is described by the header's items (offset/nbytes into the payload).
* Before the handshake a frame may be at most ``MAX_HELLO_BYTES``; after it, the header at most
  ``MAX_HEADER_BYTES`` and the payload at most the negotiated ``max_payload_bytes``.

Handshake: the client's first frame is ``Hello`` (protocol version, auth token, whether it wants
shared memory). The daemon answers ``Welcome`` (its pool segment's path, size and nonce) or
``Error`` + close (wrong version, wrong token). The client proves it shares the daemon's host by
opening the segment and finding the nonce in its header page; otherwise KV goes over the socket.
"""

from __future__ import annotations

import struct
from typing import Annotated, Literal

import msgspec

from kvtier.errors import KVTierError

PROTOCOL_VERSION = 1
MAGIC = b"KVT1"
PREFIX = struct.Struct(">4sII")
MAX_HELLO_BYTES = 4096
MAX_HEADER_BYTES = 4 << 20
DEFAULT_MAX_PAYLOAD_BYTES = 1 << 30
MAX_KEYS = 4096
"""Keys per request; a client splits larger batches."""
MAX_TOKENS_PER_CHUNK = 1 << 20
MAX_DIMS = 8
MAX_DIM = 1 << 31

KV_DTYPES = {
    "float16": 2,
    "bfloat16": 2,
    "float32": 4,
    "float64": 8,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "int8": 1,
    "uint8": 1,
}
"""Element sizes of the dtypes a chunk may have (torch names without the ``torch.`` prefix)."""

Key = Annotated[bytes, msgspec.Meta(min_length=16, max_length=16)]
Keys = Annotated[list[Key], msgspec.Meta(max_length=MAX_KEYS)]
Ids = Annotated[list[int], msgspec.Meta(max_length=MAX_KEYS)]
Fingerprint = Annotated[bytes, msgspec.Meta(max_length=64)]
Shape = Annotated[list[Annotated[int, msgspec.Meta(ge=0, le=MAX_DIM)]], msgspec.Meta(max_length=MAX_DIMS)]
DType = Annotated[str, msgspec.Meta(max_length=16)]
NonNeg = Annotated[int, msgspec.Meta(ge=0, le=1 << 62)]
ShortStr = Annotated[str, msgspec.Meta(max_length=256)]


class ProtocolError(KVTierError, ValueError):
    """A frame or message that breaks the protocol (the connection is answered and/or closed)."""


class _Msg(msgspec.Struct, tag_field="t", forbid_unknown_fields=True, omit_defaults=True):
    pass


# -- handshake -----------------------------------------------------------------------------------
class Hello(_Msg, tag="hello"):
    version: int
    token: ShortStr = ""
    want_shm: bool = True
    client: ShortStr = ""


class Welcome(_Msg, tag="welcome"):
    version: int
    server_id: ShortStr
    max_payload_bytes: NonNeg
    max_keys: NonNeg
    lease_timeout_s: float
    shm_path: ShortStr = ""
    shm_bytes: NonNeg = 0
    shm_nonce: Annotated[bytes, msgspec.Meta(max_length=32)] = b""


class Error(_Msg, tag="error"):
    code: ShortStr
    message: Annotated[str, msgspec.Meta(max_length=4096)]


# -- requests ------------------------------------------------------------------------------------
class ItemMeta(msgspec.Struct, forbid_unknown_fields=True, array_like=True):
    """What a reader needs to validate one chunk (see ``tiers.base.Chunk``)."""

    fingerprint: Fingerprint
    num_tokens: Annotated[int, msgspec.Meta(ge=0, le=MAX_TOKENS_PER_CHUNK)]
    shape: Shape
    dtype: DType


class PutItem(msgspec.Struct, forbid_unknown_fields=True, array_like=True):
    key: Key
    meta: ItemMeta
    payload_offset: NonNeg = 0
    """Where this chunk's bytes start in the frame payload (``Put`` only)."""


class Contains(_Msg, tag="contains"):
    keys: Keys


class Prefix(_Msg, tag="prefix"):
    keys: Keys


class Get(_Msg, tag="get"):
    keys: Keys
    shm: bool = True
    """Answer chunks held in the shared pool by lease (offset) instead of inline bytes."""


class Release(_Msg, tag="release"):
    """Give back leases taken by ``Get``; never answered (it rides before the next request)."""

    leases: Ids


class Reserve(_Msg, tag="reserve"):
    """Shared-memory put, step 1: allocate pool space the client then writes into."""

    items: Annotated[list[PutItem], msgspec.Meta(max_length=MAX_KEYS)]


class Commit(_Msg, tag="commit"):
    """Shared-memory put, step 2: the reserved space holds the chunks; publish them."""

    reservations: Ids


class Put(_Msg, tag="put"):
    """Socket put: the chunks' bytes are in the frame payload."""

    items: Annotated[list[PutItem], msgspec.Meta(max_length=MAX_KEYS)]


class Remove(_Msg, tag="remove"):
    keys: Keys


class Flush(_Msg, tag="flush"):
    """Wait until every write the daemon accepted before this request has left its lower-tier
    queues and is synced (disk: fsynced), for at most ``timeout_s``; answered ``Flushed``."""

    timeout_s: Annotated[float, msgspec.Meta(ge=0, le=3600)] = 60.0


class Clear(_Msg, tag="clear"):
    """Drop every chunk the daemon holds (admin; tests)."""


class Stats(_Msg, tag="stats"):
    pass


class Ping(_Msg, tag="ping"):
    pass


# -- replies -------------------------------------------------------------------------------------
class Bools(_Msg, tag="bools"):
    values: Annotated[list[bool], msgspec.Meta(max_length=MAX_KEYS)]


class Count(_Msg, tag="count"):
    n: NonNeg


class GotItem(msgspec.Struct, forbid_unknown_fields=True, array_like=True):
    """A hit: ``where`` is ``"shm"`` (``offset`` into the pool, held by ``lease``) or ``"inline"``
    (``offset`` into the reply's payload)."""

    meta: ItemMeta
    where: Literal["shm", "inline"]
    offset: NonNeg
    nbytes: NonNeg
    lease: NonNeg = 0


class GetReply(_Msg, tag="got"):
    items: Annotated[list[GotItem | None], msgspec.Meta(max_length=MAX_KEYS)]


class Slot(msgspec.Struct, forbid_unknown_fields=True, array_like=True):
    """``status``: ``"ok"`` (write ``nbytes`` at ``offset``, then commit ``reservation``),
    ``"exists"`` (already stored) or ``"full"`` (no room)."""

    status: Literal["ok", "exists", "full"]
    offset: NonNeg = 0
    reservation: NonNeg = 0


class Reserved(_Msg, tag="reserved"):
    slots: Annotated[list[Slot], msgspec.Meta(max_length=MAX_KEYS)]


class StatsReply(_Msg, tag="statsreply"):
    stats: dict[ShortStr, dict[ShortStr, float]]


class Pong(_Msg, tag="pong"):
    pass


class Flushed(_Msg, tag="flushed"):
    """``ok``: everything queued before the ``Flush`` is stored and durable; ``False`` on timeout
    or a failed sync."""

    ok: bool


Message = (
    Hello
    | Welcome
    | Error
    | Contains
    | Prefix
    | Get
    | Release
    | Reserve
    | Commit
    | Put
    | Remove
    | Clear
    | Stats
    | Ping
    | Flush
    | Bools
    | Count
    | GetReply
    | Reserved
    | StatsReply
    | Pong
    | Flushed
)

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


def encode_frame(msg: _Msg, payload_len: int = 0) -> bytes:
    """Prefix + header; the caller writes ``payload_len`` payload bytes after it."""
    header = _encoder.encode(msg)
    if len(header) > MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {len(header)} bytes exceeds {MAX_HEADER_BYTES}")
    return PREFIX.pack(MAGIC, len(header), payload_len) + header


def parse_prefix(prefix: bytes, *, max_header: int, max_payload: int) -> tuple[int, int]:
    """``(header_len, payload_len)`` of a frame prefix, checked against the limits."""
    magic, hlen, plen = PREFIX.unpack(prefix)
    if magic != MAGIC:
        raise ProtocolError(f"bad frame magic {magic!r} (not a kvtier client, or protocol out of sync)")
    if hlen == 0 or hlen > max_header:
        raise ProtocolError(f"header length {hlen} outside 1..{max_header}")
    if plen > max_payload:
        raise ProtocolError(f"payload length {plen} exceeds the limit of {max_payload} bytes")
    return hlen, plen


def decode_header(data: bytes) -> Message:
    try:
        return _decoder.decode(data)
    except msgspec.DecodeError as e:  # ValidationError is a subclass: bounds and types
        raise ProtocolError(f"malformed message: {e}") from e


def check_meta(meta: ItemMeta, max_bytes: int) -> int:
    """The chunk's byte size, after checking its dtype and shape are sane; raises ``ProtocolError``."""
    size = KV_DTYPES.get(meta.dtype)
    if size is None:
        raise ProtocolError(f"unsupported dtype {meta.dtype!r}; expected one of {sorted(KV_DTYPES)}")
    if not meta.shape:
        raise ProtocolError("chunk shape is empty")
    for d in meta.shape:
        if d < 1:
            raise ProtocolError(f"chunk shape {meta.shape} has an empty dimension")
        size *= d
        if size > max_bytes:
            raise ProtocolError(f"chunk of shape {meta.shape} exceeds {max_bytes} bytes")
    return size
