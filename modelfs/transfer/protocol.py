"""The daemon ↔ fetch worker protocol: every message as a typed record, and its wire form.

One ``SOCK_SEQPACKET`` socket per worker; one message per packet, a JSON object whose
``"t"`` names its type; a file descriptor rides along (``SCM_RIGHTS``) where a
message says so. :mod:`.lanes` (the daemon side) and :mod:`.worker` both import this
module and neither imports the other.

A conversation::

    daemon                                   worker
    [Key]  (encrypted registry: first; the key never goes through argv or env)
    [Connect]  (a store's URL: open connections there before the first request needs one)
                                             Ready            (imports done, cache open)
    Load / Peek / Deliver+fd / Upload+fd ─►
                                             Early+memfd      (Load with early: verified, before the commit)
                                             Named            (Upload: the chunk's id, from its bytes)
    Go  (Upload: skip, or HEAD / PUT URLs) ─►
                                             Done[+memfd] | Peeked[+memfd] | Uploaded | Failed

* ``Load``: chunk ``h`` into the cache (GET a presigned URL, decode, verify, commit);
  ``Done`` once committed, with a memfd of the verified bytes when the cache could not
  store them (a full disk) or ``pin`` asked for them. ``urgent`` requests (a reader
  waits) jump ahead of readahead in the worker's queue.
* ``foreign_at`` (Load, Peek, Deliver): the URL names an object of another store (an
  adopted version's DVC or Git LFS object) whose bytes [foreign_at, foreign_at + n) are
  the raw chunk, checked against its id as a whole (no block digests there: a Peek of
  one is ``none``).
* ``Peek``: bytes [lo, hi) of chunk ``h`` alone (its block digests and the blocks that
  hold them, ranged GETs, checked against the id), as a memfd; ``none`` when the chunk
  cannot be read by blocks. Nothing is cached.
* ``Deliver``: the verified chunk written into the descriptor that came with it at
  ``at`` (``pull``), from the cache when it holds the chunk.
* ``Upload``: ``n`` bytes at ``at`` of the descriptor read and named; the daemon answers
  ``Go``; ``Uploaded`` says what was sent (``publish``).

End of file on the socket means "finish what you hold and exit": a fetched chunk is
always committed. Every reply names its request's ``id``.

Invariants: a packet is at most ``MAX_MESSAGE`` bytes; :func:`unpack` turns anything
else — an unknown type, a missing or mistyped field, bytes that are not JSON, a
truncated packet — into one :class:`ProtocolError`, never a hang or a KeyError.
"""

from __future__ import annotations

import array
import dataclasses
import enum
import json
import os
import socket
import sys
from dataclasses import dataclass
from typing import ClassVar, Union

from ..config import Timeouts

MAX_MESSAGE = 64 << 10  # bytes per packet: requests carry a URL or three, never data
FD_SPACE = socket.CMSG_SPACE(4)  # ancillary room for the one descriptor a message may carry


class ProtocolError(Exception):
    """A packet that is not a message of this protocol (a bug or a mismatched peer)."""


class Failure(str, enum.Enum):
    """Why a worker could not do a request; the daemon maps each to its error class."""
    HTTP = "http"  # the store answered with an error (status and S3 code given)
    THROTTLED = "throttled"  # 429/503, after the worker's retries
    UNAVAILABLE = "unavailable"  # no connection, no answer in time, 5xx, after retries
    INTEGRITY = "integrity"  # the bytes do not match the chunk's id
    WRITE = "write"  # the destination file could not be written (pull)
    SOURCE = "source"  # the file being published could not be read, or changed
    OTHER = "other"  # a bug, or a request this worker cannot serve


@dataclass(frozen=True)
class WorkerConfig:
    """A worker's start: ``python -m modelfs.transfer.worker CONFIG_JSON FD``."""
    cache_dir: str  # "": no cache (a worker that only delivers chunks into files)
    cache_cap: int
    threads: int = 8  # requests served at once, each with its own chunk buffer
    timeouts: Timeouts = Timeouts()
    encrypted: bool = False  # the registry key comes as the first message (Key)
    sealed: bool = False  # --encrypt-cache: cache the chunk's stored (encrypted) form, not plaintext
    tiers: tuple[str, ...] = ()  # cache tier nodes chunks are asked of first (transfer/tier.py)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> WorkerConfig:
        d = json.loads(text)
        return cls(**{**d, "timeouts": Timeouts(**d["timeouts"]), "tiers": tuple(d.get("tiers", ()))})


# -- daemon → worker ------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Key:
    secret: str  # the registry key, base64

@dataclass(frozen=True, slots=True)
class Connect:
    url: str  # any URL of the store: its origin is what counts

@dataclass(frozen=True, slots=True)
class Load:
    id: int
    h: str
    n: int  # the chunk's plaintext size
    url: str | None  # a presigned GET (None: no store; only a cached chunk can be had)
    urgent: bool = True  # a reader waits (ahead of readahead in the queue)
    refetch: bool = False  # the cached entry is damaged: drop it and GET again
    pin: bool = False  # hand the verified bytes over too (a memfd), whatever the cache does
    early: bool = False  # send them first (Early), then commit
    foreign_at: int | None = None  # url is an adopted file's foreign object: the chunk is its raw bytes from here

@dataclass(frozen=True, slots=True)
class Peek:
    id: int
    h: str
    n: int
    url: str | None
    lo: int  # bytes [lo, hi) of the chunk
    hi: int
    foreign_at: int | None = None
    urgent: ClassVar[bool] = True

@dataclass(frozen=True, slots=True)
class Deliver:  # comes with the destination's descriptor
    id: int
    h: str
    n: int
    url: str | None
    at: int  # offset in the destination
    foreign_at: int | None = None
    urgent: ClassVar[bool] = True

@dataclass(frozen=True, slots=True)
class Upload:  # comes with the source file's descriptor
    id: int
    n: int
    at: int  # offset of the piece in the source
    urgent: ClassVar[bool] = True

@dataclass(frozen=True, slots=True)
class Go:
    """The daemon's answer to ``Named``: nothing to send (``skip``), or HEAD ``head`` (present:
    nothing to send) and PUT the encoded chunk to ``put``."""
    id: int
    skip: bool = False
    head: str | None = None
    put: str | None = None
    compress: bool = True


# -- worker → daemon ------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Ready:
    pid: int

@dataclass(frozen=True, slots=True)
class Early:  # comes with a memfd of the verified chunk; the Done follows the commit
    id: int

@dataclass(frozen=True, slots=True)
class Done:  # Load or Deliver; a memfd comes with it when ``spill``
    id: int
    fetched: bool  # GET from the store or the tier (else: the cache had it)
    took: float  # seconds of the GET, decode and verification
    spill: bool = False
    tier: bool = False  # the bytes came from a cache tier node (else the store)
    hit: bool = False  # ... which had them
    fallbacks: int = 0  # tier nodes that failed to answer on the way
    bad: int = 0  # copies from the tier that failed verification (never used)

@dataclass(frozen=True, slots=True)
class Peeked:  # a memfd with bytes [lo, hi) comes with it unless ``none``
    id: int
    took: float = 0.0
    none: bool = False  # the chunk cannot be read by blocks (zstd; named before block digests)
    tier: bool = False  # as Done's
    hit: bool = False
    fallbacks: int = 0
    bad: int = 0

@dataclass(frozen=True, slots=True)
class Named:
    id: int
    h: str

@dataclass(frozen=True, slots=True)
class Uploaded:
    id: int
    h: str
    uploaded: bool  # False: the store had it
    stored: int  # bytes sent
    took: float

@dataclass(frozen=True, slots=True)
class Failed:
    id: int
    kind: Failure
    msg: str
    status: int | None = None  # the store's HTTP status, where it answered
    code: str = ""  # its S3 error code


Request = Union[Load, Peek, Deliver, Upload]
Message = Union[Key, Connect, Load, Peek, Deliver, Upload, Go, Ready, Early, Done, Peeked, Named, Uploaded, Failed]
Reply = Union[Done, Peeked, Uploaded, Failed]

_TYPES: dict[str, type] = {cls.__name__: cls for cls in (Key, Connect, Load, Peek, Deliver, Upload, Go, Ready, Early,
                                                         Done, Peeked, Named, Uploaded, Failed)}
# each field's annotation (a string: annotations are not evaluated here) → the JSON types it takes
_CHECKS: dict[str, tuple[type, ...]] = {
    "int": (int,), "str": (str,), "bool": (bool,), "float": (float, int), "Failure": (str,),
    "str | None": (str, type(None)), "int | None": (int, type(None))}
_FIELDS: dict[type, tuple[tuple[str, str], ...]] = {
    cls: tuple((f.name, f.type) for f in dataclasses.fields(cls)) for cls in _TYPES.values()}
assert all(hint in _CHECKS for fields in _FIELDS.values() for _, hint in fields), "a field type without a check"


def encode(msg: Message) -> bytes:
    """The wire form of ``msg``."""
    body = {"t": type(msg).__name__}
    for name, _ in _FIELDS[type(msg)]:
        v = getattr(msg, name)
        body[name] = v.value if isinstance(v, Failure) else v
    data = json.dumps(body, separators=(",", ":")).encode()
    if len(data) > MAX_MESSAGE:
        raise ProtocolError(f"{type(msg).__name__} of {len(data)} bytes: over {MAX_MESSAGE}")
    return data


def decode(data: bytes) -> Message:
    """The message in packet ``data``; ProtocolError if it is not one."""
    if len(data) >= MAX_MESSAGE:  # recv cut it: a whole packet is at most MAX_MESSAGE - 1 here
        raise ProtocolError(f"a packet of {len(data)} bytes or more: over the limit")
    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise ProtocolError(f"not a message ({e}): {bytes(data[:60])!r}") from None
    if not isinstance(body, dict) or (cls := _TYPES.get(body.pop("t", None))) is None:
        raise ProtocolError(f"unknown message: {bytes(data[:60])!r}")
    args = {}
    for name, hint in _FIELDS[cls]:
        if name not in body:
            field = next(f for f in dataclasses.fields(cls) if f.name == name)
            if field.default is dataclasses.MISSING:
                raise ProtocolError(f"{cls.__name__} without {name!r}")
            continue
        v = body.pop(name)
        if not isinstance(v, _CHECKS[hint]) or (hint != "bool" and isinstance(v, bool)):
            raise ProtocolError(f"{cls.__name__}.{name}: {type(v).__name__} {v!r}")
        if hint == "Failure":
            try:
                v = Failure(v)
            except ValueError:
                raise ProtocolError(f"{cls.__name__}.{name}: unknown failure {v!r}") from None
        args[name] = v
    if body:
        raise ProtocolError(f"{cls.__name__} with unknown fields {sorted(body)}")
    return cls(**args)


def fd_message(fd: int | None) -> list[tuple[int, int, bytes]]:
    """The ancillary data that sends ``fd`` (none for None)."""
    return [] if fd is None else [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]).tobytes())]


def received_fd(ancdata: list[tuple[int, int, bytes]]) -> int | None:
    """The descriptor that came with a packet, if one did (the caller owns and closes it)."""
    fd = None
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS and len(data) >= 4:
            fd = int.from_bytes(data[:4], sys.byteorder)
    return fd


def send(sock: socket.socket, msg: Message, fd: int | None = None) -> None:
    """``msg`` (with ``fd``) over blocking ``sock``."""
    sock.sendmsg([encode(msg)], fd_message(fd))


def receive(sock: socket.socket) -> tuple[Message | None, int | None]:
    """The next message on blocking ``sock`` and the descriptor that came with it;
    (None, None) at end of file. ProtocolError: a packet that is not a message (any
    descriptor that came with it is closed)."""
    data, anc, _, _ = sock.recvmsg(MAX_MESSAGE, FD_SPACE)
    if not data:
        return None, None
    fd = received_fd(anc)
    try:
        return decode(data), fd
    except ProtocolError:
        if fd is not None:
            os.close(fd)
        raise
