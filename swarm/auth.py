"""Message authentication between peers. Every message is a msgpack envelope carrying its kind,
sender (peer id and Ed25519 public key), incarnation, term, a per-sender sequence number and a
timestamp; the sender signs it with its identity key and the whole is tagged with HMAC-SHA256
under the 32-byte swarm key. `Opener` checks the tag, the signature, the sender's id, the clock
and the sequence number before anything else reads the body, and counts every drop by reason.
It knows nothing of what the bodies mean or how they travel."""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack

from swarm.errors import MessageRejected, SwarmKeyError
from swarm.identity import Identity, peer_id_of, verify_signature

PROTOCOL_VERSION = 1
SWARM_KEY_BYTES = 32
# Without a swarm key, envelopes are still signed by their senders, but anyone can compute the tag.
INSECURE_KEY = b"swarm-inference insecure: no swarm key"
DROP_REASONS = ("malformed", "forged", "replayed", "stale", "oversized", "misdirected")


def load_swarm_key(path: Path) -> bytes:
    """The swarm key held in `path` as 64 hex digits."""
    try:
        text = path.read_text().strip()
    except OSError as e:
        raise SwarmKeyError(f"cannot read swarm key file {path}: {e}") from e
    except UnicodeDecodeError as e:
        raise SwarmKeyError(f"swarm key file {path} must hold {SWARM_KEY_BYTES * 2} hex digits") from e
    return parse_swarm_key(text, f"swarm key file {path}")


def parse_swarm_key(text: str, where: str = "swarm key") -> bytes:
    """Decode a swarm key written as 64 hex digits."""
    try:
        key = bytes.fromhex(text.strip())
    except ValueError as e:
        raise SwarmKeyError(f"{where} must be {SWARM_KEY_BYTES * 2} hex digits") from e
    if len(key) != SWARM_KEY_BYTES:
        raise SwarmKeyError(f"{where} must be {SWARM_KEY_BYTES * 2} hex digits, not {len(key) * 2}")
    return key


def write_new_swarm_key(path: Path, *, force: bool = False) -> bytes:
    """Write a fresh random swarm key to `path` (mode 0600); refuses to overwrite unless `force`."""
    key = os.urandom(SWARM_KEY_BYTES)
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError as e:
        raise SwarmKeyError(f"{path} already exists; pass --force to replace it") from e
    except OSError as e:
        raise SwarmKeyError(f"cannot write swarm key file {path}: {e}") from e
    os.fchmod(fd, 0o600)  # O_CREAT's mode applies only to a new file, not to one replaced with force
    with os.fdopen(fd, "w") as f:
        f.write(key.hex() + "\n")
    return key


def key_fingerprint(swarm_key: bytes | None) -> str:
    """A short public hash of the swarm key, announced over mDNS so other swarms are skipped."""
    if swarm_key is None:
        return "insecure"
    return hashlib.sha256(b"swarm-inference key fingerprint:" + swarm_key).hexdigest()[:12]


@dataclass(frozen=True)
class Message:
    """An envelope that passed every check."""

    kind: str
    sender: str  # peer id, derived from public_key
    recipient: str | None  # the peer it was sealed for; None only for a first hello
    public_key: bytes
    incarnation: int
    term: int
    seq: int
    timestamp_s: float
    body: Any


class Sealer:
    """Seals this peer's outgoing messages: numbers, stamps, signs and tags them."""

    def __init__(self, identity: Identity, swarm_key: bytes | None, clock: Callable[[], float] = time.time) -> None:
        self.identity = identity
        self._mac_key = swarm_key or INSECURE_KEY
        self._clock = clock
        self._seq = 0

    def seal(self, kind: str, body: Any, *, term: int, incarnation: int, to: str | None = None) -> bytes:
        """The wire bytes of one message for peer `to` (None when its id is not known yet)."""
        self._seq += 1
        signed = msgpack.packb(
            {
                "v": PROTOCOL_VERSION,
                "kind": kind,
                "to": to,
                "pub": self.identity.public_key,
                "inc": incarnation,
                "term": term,
                "seq": self._seq,
                "ts": self._clock(),
                "body": body,
            },
            use_bin_type=True,
        )
        signature = self.identity.sign(signed)
        tag = hmac.digest(self._mac_key, signed + signature, "sha256")
        return msgpack.packb([signed, signature, tag], use_bin_type=True)


class _SenderWindow:
    """Sequence numbers seen from one sender incarnation: the highest, and which of the last `size`."""

    def __init__(self, incarnation: int) -> None:
        self.incarnation = incarnation
        self.highest = 0
        self.seen: set[int] = set()

    def accept(self, seq: int, size: int) -> bool:
        if seq <= self.highest - size or seq in self.seen:
            return False
        self.seen.add(seq)
        if seq > self.highest:
            self.highest = seq
            self.seen = {s for s in self.seen if s > seq - size}
        return True


class Opener:
    """Checks incoming envelopes; keeps per-sender replay windows and drop counters."""

    def __init__(
        self,
        swarm_key: bytes | None,
        *,
        max_clock_skew_s: float,
        replay_window: int,
        max_message_bytes: int,
        max_senders: int = 1024,
        clock: Callable[[], float] = time.time,
        peer_id: str | None = None,
    ) -> None:
        self._mac_key = swarm_key or INSECURE_KEY
        self.max_clock_skew_s = max_clock_skew_s
        self.replay_window = replay_window
        self.max_message_bytes = max_message_bytes
        self._max_senders = max_senders
        self._clock = clock
        self.peer_id = peer_id  # ours: a message from ourselves or sealed for another peer is refused
        self._windows: OrderedDict[str, _SenderWindow] = OrderedDict()
        self.drops: Counter[str] = Counter({reason: 0 for reason in DROP_REASONS})

    def open(self, data: bytes, *, max_bytes: int | None = None) -> Message:
        """The checked message in `data` (at most `max_bytes`, else the configured limit); raises
        MessageRejected (and counts it) otherwise."""
        try:
            return self._open(data, max_bytes or self.max_message_bytes)
        except MessageRejected as e:
            self.drops[e.reason] += 1
            raise

    def _open(self, data: bytes, limit: int) -> Message:
        if len(data) > limit:
            raise MessageRejected("oversized", f"{len(data)} bytes > {limit}")
        try:
            outer = msgpack.unpackb(data, raw=False, max_bin_len=limit)
        except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as e:
            raise MessageRejected("malformed", f"not msgpack: {e}") from e
        if not (isinstance(outer, list) and len(outer) == 3 and all(isinstance(p, bytes) for p in outer)):
            raise MessageRejected("malformed", "envelope must be [signed, signature, tag]")
        signed, signature, tag = outer
        if not hmac.compare_digest(tag, hmac.digest(self._mac_key, signed + signature, "sha256")):
            raise MessageRejected("forged", "bad swarm-key tag (another swarm key, or tampered)")
        try:
            head = msgpack.unpackb(signed, raw=False)
        except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as e:
            raise MessageRejected("malformed", f"signed part is not msgpack: {e}") from e
        message = _parse_head(head)
        if not verify_signature(message.public_key, signature, signed):
            raise MessageRejected("forged", f"bad signature claiming sender {message.sender}")
        if self.peer_id is not None and (
            message.sender == self.peer_id or message.recipient not in (None, self.peer_id)
        ):
            raise MessageRejected("misdirected", f"sealed by {message.sender} for {message.recipient}, not for us")
        if abs(self._clock() - message.timestamp_s) > self.max_clock_skew_s:
            raise MessageRejected("stale", f"timestamp {message.timestamp_s:.3f} is off by more than the allowed skew")
        self._check_sequence(message)
        return message

    def _check_sequence(self, message: Message) -> None:
        window = self._windows.get(message.sender)
        if window is not None and message.incarnation < window.incarnation:
            raise MessageRejected("stale", f"incarnation {message.incarnation} < {window.incarnation}")
        if window is None or message.incarnation > window.incarnation:
            window = _SenderWindow(message.incarnation)
            self._windows[message.sender] = window
            while len(self._windows) > self._max_senders:
                self._windows.popitem(last=False)
        self._windows.move_to_end(message.sender)
        if not window.accept(message.seq, self.replay_window):
            raise MessageRejected("replayed", f"seq {message.seq} from {message.sender} already seen or too old")


def _parse_head(head: Any) -> Message:
    if not isinstance(head, dict):
        raise MessageRejected("malformed", "signed part must be a map")
    if type(head.get("v")) is not int or head.get("v") != PROTOCOL_VERSION:
        raise MessageRejected("malformed", f"protocol version {head.get('v')!r}, expected {PROTOCOL_VERSION}")
    kind, pub, ts, to = head.get("kind"), head.get("pub"), head.get("ts"), head.get("to")
    ints: list[Any] = [head.get(k) for k in ("inc", "term", "seq")]
    if not isinstance(kind, str) or not isinstance(pub, bytes) or len(pub) != 32:
        raise MessageRejected("malformed", "kind must be a string and pub 32 bytes")
    if to is not None and not isinstance(to, str):
        raise MessageRejected("malformed", "to must be a peer id or nil")
    if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**63 for v in ints):
        raise MessageRejected("malformed", "inc, term and seq must be non-negative integers")
    if not isinstance(ts, (int, float)) or isinstance(ts, bool) or not math.isfinite(ts):
        raise MessageRejected("malformed", "ts must be a finite number")
    return Message(kind, peer_id_of(pub), to, pub, ints[0], ints[1], ints[2], float(ts), head.get("body"))
