"""Message protection between peers. A message's signed part carries its kind, sender (peer id
and Ed25519 public key), recipient, incarnation, term, a per-sender sequence number, a timestamp
and the body; the sender signs it with its identity key, and the signed part and signature are
encrypted with ChaCha20-Poly1305 under a key derived from a swarm key, with a clear header (the
protocol version, the swarm's cluster name and the fingerprint of the swarm key used) as
associated data. A `Keyring` holds the swarm keys: one primary that seals and every key that
opens, so keys rotate without downtime. `Opener` checks the header, decrypts, checks the
signature, the sender's id, the clock and the sequence number before anything else reads the
body, and counts every drop by reason. It knows nothing of what the bodies mean or how they travel."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import os
import tempfile
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from swarm.errors import MessageRejected, SwarmKeyError
from swarm.identity import Identity, peer_id_of, verify_signature

PROTOCOL_VERSION = 4  # 4: openings carry token ids and more sampling fields, tokens rows top and prompt logprobs
SWARM_KEY_BYTES = 32
NONCE_BYTES = 12
# Without a swarm key, envelopes are still signed by their senders, but anyone can decrypt them.
INSECURE_KEY = b"swarm-inference insecure: no swarm key"
DROP_REASONS = ("malformed", "forged", "unknown_key", "replayed", "stale", "oversized", "misdirected")
MAX_KEYS = 16  # swarm keys one keyring holds at most
MAX_HEADER_BYTES = 256  # an envelope's clear header ({v, cluster, key}) is far smaller
DEFAULT_CLUSTER = "default"  # security.cluster: the swarm's name, bound into every envelope


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
    """A short public hash of the swarm key, announced over mDNS and named in every envelope's
    header so that a receiver knows which of its keys opens it."""
    if swarm_key is None:
        return "insecure"
    return hashlib.sha256(b"swarm-inference key fingerprint:" + swarm_key).hexdigest()[:12]


def _cipher(swarm_key: bytes) -> ChaCha20Poly1305:
    """The message cipher of one swarm key (the key itself is never used directly)."""
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"swarm-inference message key v2")
    return ChaCha20Poly1305(hkdf.derive(swarm_key))


class Keyring:
    """The swarm keys a peer holds: the primary seals every message, each key opens. Shared by a
    peer's Sealer and Opener; `replace` swaps its keys in place (a reloaded keyring file), so a
    running peer rotates keys without a restart. Without keys it is insecure: a fixed public key
    seals, so messages are still signed but anyone can read or tag them."""

    def __init__(self, keys: Iterable[bytes] = (), primary: bytes | None = None) -> None:
        self._set(list(keys), primary)

    def _set(self, keys: list[bytes], primary: bytes | None) -> None:
        if len(keys) > MAX_KEYS:
            raise SwarmKeyError(f"a keyring holds at most {MAX_KEYS} keys, not {len(keys)}")
        if any(len(k) != SWARM_KEY_BYTES for k in keys):
            raise SwarmKeyError(f"a swarm key is {SWARM_KEY_BYTES} bytes")
        if keys and primary is None and len(keys) == 1:
            primary = keys[0]
        if keys and primary not in keys:
            raise SwarmKeyError("the keyring's primary key must be one of its keys")
        self.keys = list(dict.fromkeys(keys))
        self.primary = primary if keys else None
        secret = self.keys or [INSECURE_KEY]
        self._ciphers = {key_fingerprint(k if self.keys else None): _cipher(k) for k in secret}
        self.primary_fingerprint = key_fingerprint(self.primary)

    @classmethod
    def of(cls, swarm_key: bytes | None) -> Keyring:
        """A keyring of one key, or the insecure keyring for None."""
        return cls([swarm_key] if swarm_key is not None else [])

    @property
    def secure(self) -> bool:
        """Whether it holds a real swarm key."""
        return bool(self.keys)

    @property
    def fingerprints(self) -> list[str]:
        """The fingerprints of the keys that open messages, the primary's first."""
        return [self.primary_fingerprint, *(f for f in self._ciphers if f != self.primary_fingerprint)]

    def cipher(self, fingerprint: str) -> ChaCha20Poly1305 | None:
        """The cipher of the key with this fingerprint, if this keyring holds it."""
        return self._ciphers.get(fingerprint)

    def replace(self, other: Keyring) -> None:
        """Take `other`'s keys and primary, in place."""
        self._set(list(other.keys), other.primary)

    def describe(self) -> dict[str, Any]:
        """Fingerprints only, for status pages and logs."""
        return {"primary": self.primary_fingerprint, "accepted": self.fingerprints, "secure": self.secure}


def parse_keyring(text: str, where: str = "keyring") -> Keyring:
    """A keyring written as lines of 64 hex digits, the primary's marked with a leading `*`
    (a single key needs no mark); blank lines and `#` comments are ignored. A plain swarm key file
    from `swarm keygen` is a keyring of one key."""
    keys, primary = [], None
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        marked = line.startswith("*")
        key = parse_swarm_key(line[1:] if marked else line, f"{where}, line {number}")
        if marked:
            if primary is not None:
                raise SwarmKeyError(f"{where} marks more than one primary key (line {number})")
            primary = key
        keys.append(key)
    if not keys:
        raise SwarmKeyError(f"{where} holds no swarm key")
    if primary is None and len(keys) > 1:
        raise SwarmKeyError(f"{where} holds {len(keys)} keys but marks none primary with a leading '*'")
    return Keyring(keys, primary)


def load_keyring(path: Path) -> Keyring:
    """The keyring (or single swarm key) held in `path`."""
    try:
        text = path.read_text()
    except OSError as e:
        raise SwarmKeyError(f"cannot read swarm key file {path}: {e}") from e
    except UnicodeDecodeError as e:
        raise SwarmKeyError(f"swarm key file {path} must hold lines of {SWARM_KEY_BYTES * 2} hex digits") from e
    return parse_keyring(text, f"swarm key file {path}")


def write_keyring(path: Path, keyring: Keyring) -> None:
    """Write `keyring` to `path` (mode 0600) atomically: a peer reloading it sees the old file or the new."""
    if not keyring.secure:
        raise SwarmKeyError("an empty keyring cannot be written")
    lines = ["# swarm keyring: '*' marks the primary key, which seals; every key listed opens"]
    lines += [("*" if k == keyring.primary else " ") + k.hex() + f"  # {key_fingerprint(k)}" for k in keyring.keys]
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write("\n".join(lines) + "\n")
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as e:
        raise SwarmKeyError(f"cannot write swarm key file {path}: {e}") from e


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
    key_fingerprint: str = ""  # the swarm key it was sealed under


@functools.lru_cache(maxsize=MAX_KEYS)
def envelope_header(cluster: str, fingerprint: str) -> bytes:
    """The clear header of an envelope, also its associated data (the same bytes for every message
    sealed under one key, so packed once)."""
    return msgpack.packb({"v": PROTOCOL_VERSION, "cluster": cluster, "key": fingerprint}, use_bin_type=True)


class Sealer:
    """Seals this peer's outgoing messages: numbers, stamps, signs and encrypts them."""

    def __init__(
        self,
        identity: Identity,
        keyring: Keyring,
        cluster: str = DEFAULT_CLUSTER,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.identity = identity
        self.keyring = keyring
        self.cluster = cluster
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
        fingerprint = self.keyring.primary_fingerprint
        cipher = self.keyring.cipher(fingerprint)
        assert cipher is not None
        header, nonce = envelope_header(self.cluster, fingerprint), os.urandom(NONCE_BYTES)
        sealed = cipher.encrypt(nonce, msgpack.packb([signed, signature], use_bin_type=True), header)
        return msgpack.packb([header, nonce, sealed], use_bin_type=True)


# Incarnations of one sender whose replay windows are kept: a message from an older one is stale. Not
# just the newest, so that a second process claiming the same identity with a higher incarnation
# (a copied state directory) cannot lock the true holder out here; the node decides between them.
INCARNATIONS_KEPT = 4


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
        keyring: Keyring,
        cluster: str = DEFAULT_CLUSTER,
        *,
        max_clock_skew_s: float,
        replay_window: int,
        max_message_bytes: int,
        max_senders: int = 1024,
        clock: Callable[[], float] = time.time,
        peer_id: str | None = None,
    ) -> None:
        self.keyring = keyring
        self.cluster = cluster
        self.max_clock_skew_s = max_clock_skew_s
        self.replay_window = replay_window
        self.max_message_bytes = max_message_bytes
        self._max_senders = max_senders
        self._clock = clock
        self.peer_id = peer_id  # ours: a message from ourselves or sealed for another peer is refused
        # sender -> incarnation -> its window; the senders in least recently heard order.
        self._windows: OrderedDict[str, dict[int, _SenderWindow]] = OrderedDict()
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
            raise MessageRejected("malformed", "envelope must be [header, nonce, ciphertext]")
        header, nonce, sealed = outer
        cipher, fingerprint = self._check_header(header)
        if len(nonce) != NONCE_BYTES:
            raise MessageRejected("malformed", f"nonce must be {NONCE_BYTES} bytes")
        try:
            inner = msgpack.unpackb(cipher.decrypt(nonce, sealed, header), raw=False)
        except InvalidTag as e:
            raise MessageRejected("forged", "the envelope does not decrypt under its swarm key (tampered)") from e
        except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as e:
            raise MessageRejected("malformed", f"the decrypted part is not msgpack: {e}") from e
        if not (isinstance(inner, list) and len(inner) == 2 and all(isinstance(p, bytes) for p in inner)):
            raise MessageRejected("malformed", "the decrypted part must be [signed, signature]")
        signed, signature = inner
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
        return dataclasses.replace(message, key_fingerprint=fingerprint)

    def _check_header(self, header: bytes) -> tuple[ChaCha20Poly1305, str]:
        """The cipher that opens an envelope with this clear header, and its key's fingerprint."""
        if len(header) > MAX_HEADER_BYTES:
            raise MessageRejected("malformed", f"header of {len(header)} bytes; at most {MAX_HEADER_BYTES}")
        try:
            fields = msgpack.unpackb(header, raw=False)
        except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as e:
            raise MessageRejected("malformed", f"header is not msgpack: {e}") from e
        if not isinstance(fields, dict) or set(fields) != {"v", "cluster", "key"}:
            raise MessageRejected("malformed", "header must be {v, cluster, key}")
        if type(fields["v"]) is not int or fields["v"] != PROTOCOL_VERSION:
            raise MessageRejected("malformed", f"protocol version {fields['v']!r}, expected {PROTOCOL_VERSION}")
        if fields["cluster"] != self.cluster:
            raise MessageRejected(
                "misdirected", f"sealed for cluster {str(fields['cluster'])[:64]!r}, not {self.cluster!r}"
            )
        cipher = self.keyring.cipher(fields["key"]) if isinstance(fields["key"], str) else None
        if cipher is None:
            raise MessageRejected(
                "unknown_key", f"sealed under swarm key {str(fields['key'])[:16]!r}, which this peer does not hold"
            )
        return cipher, fields["key"]

    def _check_sequence(self, message: Message) -> None:
        windows = self._windows.get(message.sender)
        if windows is None:
            windows = self._windows[message.sender] = {}
            while len(self._windows) > self._max_senders:
                self._windows.popitem(last=False)
        self._windows.move_to_end(message.sender)
        window = windows.get(message.incarnation)
        if window is None:
            if len(windows) >= INCARNATIONS_KEPT and message.incarnation < min(windows):
                raise MessageRejected("stale", f"incarnation {message.incarnation} < {min(windows)}")
            window = windows[message.incarnation] = _SenderWindow(message.incarnation)
            while len(windows) > INCARNATIONS_KEPT:
                del windows[min(windows)]
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
