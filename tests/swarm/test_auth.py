"""Sealed envelopes between peers: a round trip, then every way a message is dropped, each counted
under its reason in `Opener.drops`: malformed, forged, unknown_key, replayed, stale, oversized and
misdirected. Clocks are injected, so staleness is tested without waiting; hostile envelopes are
built by hand with the real swarm key, cipher and signatures, so each check is reached on its own.
Also keyrings (rotation in place) and the swarm key files."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from swarm.auth import (
    DEFAULT_CLUSTER,
    DROP_REASONS,
    INCARNATIONS_KEPT,
    MAX_KEYS,
    NONCE_BYTES,
    PROTOCOL_VERSION,
    SWARM_KEY_BYTES,
    Keyring,
    Opener,
    Sealer,
    envelope_header,
    key_fingerprint,
    load_keyring,
    load_swarm_key,
    parse_keyring,
    parse_swarm_key,
    write_keyring,
    write_new_swarm_key,
)
from swarm.errors import MessageRejected, SwarmKeyError
from swarm.identity import Identity, peer_id_of

KEY = bytes(range(SWARM_KEY_BYTES))
OTHER_KEY = bytes(reversed(range(SWARM_KEY_BYTES)))
NOW_S = 1_000_000.0
SKEW_S = 30.0
WINDOW = 4
MAX_BYTES = 4096
ALICE = Identity.generate()
MALLORY = Identity.generate()
_DROP = object()  # a value in head(...) changes that removes the field


class Clock:
    """A clock that only moves when told to."""

    def __init__(self, now_s: float = NOW_S) -> None:
        self.now_s = now_s

    def __call__(self) -> float:
        return self.now_s


def opener(key: bytes | None = KEY, *, now_s: float = NOW_S, max_bytes: int = MAX_BYTES) -> Opener:
    return Opener(
        Keyring.of(key), max_clock_skew_s=SKEW_S, replay_window=WINDOW, max_message_bytes=max_bytes, clock=Clock(now_s)
    )


def sealer(identity: Identity = ALICE, key: bytes | None = KEY, *, now_s: float = NOW_S) -> Sealer:
    return Sealer(identity, Keyring.of(key), clock=Clock(now_s))


def head(identity: Identity = ALICE, **changes: Any) -> dict[str, Any]:
    """A valid signed part, as Sealer would write it, with `changes` laid over it."""
    fields: dict[str, Any] = {
        "v": PROTOCOL_VERSION,
        "kind": "gossip",
        "pub": identity.public_key,
        "inc": 1,
        "term": 2,
        "seq": 1,
        "ts": NOW_S,
        "body": {"hello": "world"},
    }
    fields.update(changes)
    return {k: v for k, v in fields.items() if v is not _DROP}


def encrypted(inner: bytes, key: bytes | None = KEY, header: bytes | None = None) -> bytes:
    """Wire bytes around any plaintext, encrypted correctly under `key` (the header names it)."""
    fingerprint = key_fingerprint(key)
    header = header if header is not None else envelope_header(DEFAULT_CLUSTER, fingerprint)
    cipher = Keyring.of(key).cipher(fingerprint)
    assert cipher is not None
    nonce = os.urandom(NONCE_BYTES)
    return msgpack.packb([header, nonce, cipher.encrypt(nonce, inner, header)], use_bin_type=True)


def envelope(signed: bytes, signature: bytes, key: bytes | None = KEY) -> bytes:
    """Wire bytes around an arbitrary signed part, encrypted correctly under `key`."""
    return encrypted(msgpack.packb([signed, signature], use_bin_type=True), key)


def decrypted(data: bytes, key: bytes | None = KEY) -> tuple[bytes, bytes]:
    """The signed part and signature inside an envelope."""
    header, nonce, sealed = msgpack.unpackb(data)
    cipher = Keyring.of(key).cipher(key_fingerprint(key))
    assert cipher is not None
    signed, signature = msgpack.unpackb(cipher.decrypt(nonce, sealed, header))
    return signed, signature


def signed_envelope(fields: Any, identity: Identity = ALICE, key: bytes | None = KEY) -> bytes:
    """A correctly signed and tagged envelope around any head; what a peer holding the key could send."""
    signed = msgpack.packb(fields, use_bin_type=True)
    return envelope(signed, identity.sign(signed), key)


def rejected(o: Opener, data: bytes) -> str:
    """The reason `o` drops `data`, checking it counted exactly that one drop."""
    before = dict(o.drops)
    with pytest.raises(MessageRejected) as info:
        o.open(data)
    reason = info.value.reason
    assert reason in DROP_REASONS
    assert dict(o.drops) == {**before, reason: before[reason] + 1}
    return reason


def test_round_trip_gives_every_field_back() -> None:
    body = {"members": [1, 2, 3], "blob": b"\x00\xff", "note": "ü"}
    data = sealer(now_s=NOW_S - 1.5).seal("gossip", body, term=7, incarnation=3)
    message = opener().open(data)
    assert message.kind == "gossip"
    assert message.sender == ALICE.peer_id == peer_id_of(ALICE.public_key)
    assert message.public_key == ALICE.public_key
    assert (message.incarnation, message.term, message.seq) == (3, 7, 1)
    assert message.timestamp_s == NOW_S - 1.5
    assert message.body == body


def test_sealer_numbers_messages_from_one() -> None:
    s, o = sealer(), opener()
    assert [o.open(s.seal("k", i, term=0, incarnation=0)).seq for i in range(3)] == [1, 2, 3]
    assert dict(o.drops) == dict.fromkeys(DROP_REASONS, 0)


def test_several_senders_are_tracked_apart() -> None:
    o = opener()
    alice, mallory = sealer(ALICE), sealer(MALLORY)
    first = [o.open(s.seal("k", None, term=0, incarnation=0)) for s in (alice, mallory)]
    assert [(m.sender, m.seq) for m in first] == [(ALICE.peer_id, 1), (MALLORY.peer_id, 1)]


# ---- malformed -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",  # a byte msgpack never uses
        b"\x93\xc4",  # truncated array
        msgpack.packb([b"a", b"b", b"c"]) + b"\x00",  # trailing bytes
        b"\x91" * 2000 + b"\xc0",  # nested past the unpacker's stack
    ],
    ids=["empty", "reserved-byte", "truncated", "extra-data", "deep"],
)
def test_not_msgpack_is_malformed(data: bytes) -> None:
    assert rejected(opener(), data) == "malformed"


@pytest.mark.parametrize(
    "outer",
    [5, "text", {"signed": b"x"}, [b"a", b"b"], [b"a", b"b", b"c", b"d"], [b"a", b"b", "c"], [b"a", 1, b"c"]],
)
def test_wrong_envelope_shape_is_malformed(outer: Any) -> None:
    assert rejected(opener(), msgpack.packb(outer, use_bin_type=True)) == "malformed"


@pytest.mark.parametrize(
    "header",
    [
        b"\xc1",
        msgpack.packb([2, "default", "x"]),
        msgpack.packb({"v": PROTOCOL_VERSION, "cluster": DEFAULT_CLUSTER}),
        msgpack.packb({"v": PROTOCOL_VERSION, "cluster": DEFAULT_CLUSTER, "key": "k", "extra": 1}),
        msgpack.packb({"v": PROTOCOL_VERSION - 1, "cluster": DEFAULT_CLUSTER, "key": key_fingerprint(KEY)}),
        msgpack.packb({"v": True, "cluster": DEFAULT_CLUSTER, "key": key_fingerprint(KEY)}),
    ],
    ids=["not-msgpack", "a-list", "no-key", "extra-field", "old-version", "bool-version"],
)
def test_bad_header_is_malformed(header: bytes) -> None:
    assert rejected(opener(), encrypted(msgpack.packb([b"s", b"sig"]), header=header)) == "malformed"


def test_a_nonce_of_the_wrong_length_is_malformed() -> None:
    header, nonce, sealed = msgpack.unpackb(sealer().seal("k", 1, term=0, incarnation=0))
    assert rejected(opener(), msgpack.packb([header, nonce[:-1], sealed])) == "malformed"


@pytest.mark.parametrize("inner", [b"\xc1", msgpack.packb([b"a"]), msgpack.packb([b"a", "b"]), msgpack.packb(5)])
def test_a_decrypted_part_that_is_not_signed_and_signature_is_malformed(inner: bytes) -> None:
    assert rejected(opener(), encrypted(inner)) == "malformed"


@pytest.mark.parametrize(
    "changes",
    [
        {"v": PROTOCOL_VERSION + 1},
        {"v": 0},
        {"v": _DROP},
        {"kind": 5},
        {"kind": _DROP},
        {"pub": ALICE.public_key[:31]},
        {"pub": ALICE.public_key.hex()},
        {"inc": -1},
        {"inc": 2**63},
        {"term": True},
        {"term": 1.0},
        {"seq": "1"},
        {"seq": _DROP},
        {"ts": "now"},
        {"ts": False},
        {"ts": _DROP},
    ],
    ids=repr,
)
def test_bad_head_field_is_malformed(changes: dict[str, Any]) -> None:
    assert rejected(opener(), signed_envelope(head(**changes))) == "malformed"


def test_wrong_protocol_version_names_it() -> None:
    with pytest.raises(MessageRejected, match=f"protocol version {PROTOCOL_VERSION + 1}"):
        opener().open(signed_envelope(head(v=PROTOCOL_VERSION + 1)))


@pytest.mark.parametrize("signed", [msgpack.packb([1, 2]), b"\xc1", msgpack.packb({"v": 1}) + b"\x00"])
def test_signed_part_that_is_not_a_map_is_malformed(signed: bytes) -> None:
    assert rejected(opener(), envelope(signed, ALICE.sign(signed))) == "malformed"


# ---- forged ----------------------------------------------------------------------------------------


def test_another_swarm_key_is_an_unknown_key() -> None:
    assert rejected(opener(KEY), sealer(key=OTHER_KEY).seal("k", 1, term=0, incarnation=0)) == "unknown_key"


def test_another_key_claiming_our_fingerprint_is_forged() -> None:
    """The header names our key, but the ciphertext was made under another: it does not decrypt."""
    signed = msgpack.packb(head(), use_bin_type=True)
    inner = msgpack.packb([signed, ALICE.sign(signed)], use_bin_type=True)
    header = envelope_header(DEFAULT_CLUSTER, key_fingerprint(KEY))
    assert rejected(opener(KEY), encrypted(inner, OTHER_KEY, header=header)) == "forged"


@pytest.mark.parametrize("part", [0, 1, 2], ids=["header", "nonce", "ciphertext"])
def test_a_flipped_bit_anywhere_in_the_envelope_is_refused(part: int) -> None:
    """The header is associated data: changing it (a cluster or key id rewritten in transit) fails
    decryption as surely as changing the ciphertext or nonce."""
    pieces = msgpack.unpackb(sealer().seal("k", "payload", term=0, incarnation=0))
    at = len(pieces[part]) - 1
    pieces[part] = pieces[part][:at] + bytes([pieces[part][at] ^ 1]) + pieces[part][at + 1 :]
    assert rejected(opener(), msgpack.packb(pieces)) in ("forged", "malformed", "unknown_key", "misdirected")
    assert opener().open(sealer().seal("k", "payload", term=0, incarnation=0)).body == "payload"


def test_a_header_rewritten_to_another_valid_header_fails_decryption() -> None:
    _, nonce, sealed = msgpack.unpackb(sealer().seal("k", 1, term=0, incarnation=0))
    cluster = "other"
    o = Opener(Keyring.of(KEY), cluster, max_clock_skew_s=SKEW_S, replay_window=WINDOW, max_message_bytes=MAX_BYTES,
               clock=Clock())  # fmt: skip
    moved = envelope_header(cluster, key_fingerprint(KEY))
    assert rejected(o, msgpack.packb([moved, nonce, sealed])) == "forged"


def test_the_body_does_not_travel_in_the_clear() -> None:
    secret = "the prompt nobody else may read"
    data = sealer().seal("step", {"text": secret, "blob": b"\x01\x02\x03secret-bytes"}, term=0, incarnation=0)
    assert secret.encode() not in data and b"secret-bytes" not in data and ALICE.public_key not in data


def test_another_cluster_with_the_same_key_is_misdirected() -> None:
    theirs = Sealer(ALICE, Keyring.of(KEY), "lab-b", clock=Clock())
    assert rejected(opener(), theirs.seal("k", 1, term=0, incarnation=0)) == "misdirected"


def test_flipped_byte_re_encrypted_by_a_key_holder_fails_the_signature() -> None:
    """Someone holding the swarm key can decrypt and re-encrypt, but not make the sender's signature."""
    signed, signature = decrypted(sealer().seal("k", "payload", term=0, incarnation=0))
    at = signed.index(b"payload")
    tampered = signed[:at] + b"P" + signed[at + 1 :]
    o = opener()
    with pytest.raises(MessageRejected, match=f"bad signature claiming sender {ALICE.peer_id}"):
        o.open(envelope(tampered, signature))
    assert o.drops["forged"] == 1


def test_signature_by_another_identity_with_the_pub_swapped_in_is_forged() -> None:
    """Mallory holds the swarm key and claims to be Alice: her signature does not match Alice's key."""
    assert rejected(opener(), signed_envelope(head(ALICE), identity=MALLORY)) == "forged"
    # The same head signed by Alice herself is accepted, so it was only the signature that failed.
    assert opener().open(signed_envelope(head(ALICE), identity=ALICE)).sender == ALICE.peer_id


def test_signature_of_other_bytes_is_forged() -> None:
    signed = msgpack.packb(head(), use_bin_type=True)
    other = msgpack.packb(head(seq=2), use_bin_type=True)
    assert rejected(opener(), envelope(signed, ALICE.sign(other))) == "forged"


def test_no_swarm_key_on_both_sides_works() -> None:
    message = opener(None).open(sealer(key=None).seal("k", [1], term=0, incarnation=0))
    assert message.body == [1]


@pytest.mark.parametrize(("seal_key", "open_key"), [(KEY, None), (None, KEY)])
def test_key_against_no_key_is_an_unknown_key(seal_key: bytes | None, open_key: bytes | None) -> None:
    assert rejected(opener(open_key), sealer(key=seal_key).seal("k", 1, term=0, incarnation=0)) == "unknown_key"


# ---- replayed --------------------------------------------------------------------------------------


def test_same_bytes_twice_is_replayed() -> None:
    o, data = opener(), sealer().seal("k", 1, term=0, incarnation=0)
    o.open(data)
    assert rejected(o, data) == "replayed"


def test_out_of_order_within_the_window_is_accepted_once_each() -> None:
    s, o = sealer(), opener()
    sealed = {seq: s.seal("k", seq, term=0, incarnation=0) for seq in range(1, 8)}  # seqs 1..7
    assert o.open(sealed[7]).seq == 7
    for seq in (5, 4, 6):  # within the window below 7, in any order
        assert o.open(sealed[seq]).body == seq
    for seq in (6, 5, 4, 7):
        assert rejected(o, sealed[seq]) == "replayed"


def test_seq_at_or_below_highest_minus_window_is_replayed() -> None:
    s, o = sealer(), opener()
    sealed = [s.seal("k", i, term=0, incarnation=0) for i in range(1, 8)]  # seqs 1..7
    o.open(sealed[6])  # seq 7
    for seq in (3, 2, 1):  # 7 - WINDOW = 3: never seen, but too old to tell
        assert rejected(o, sealed[seq - 1]) == "replayed"
    assert o.drops["replayed"] == 3


def test_restart_at_the_same_incarnation_is_replayed() -> None:
    """A restarted sender numbers from 1 again: without a new incarnation it looks like a replay."""
    o = opener()
    o.open(sealer().seal("k", 1, term=0, incarnation=1))
    assert rejected(o, sealer().seal("k", 1, term=0, incarnation=1)) == "replayed"


def test_higher_incarnation_resets_the_window() -> None:
    o, before = opener(), sealer()
    before_first = before.seal("k", None, term=0, incarnation=1)
    o.open(before_first)
    for _ in range(9):
        o.open(before.seal("k", None, term=0, incarnation=1))
    restarted = sealer()  # a new process: seq starts at 1 again
    assert o.open(restarted.seal("k", "back", term=0, incarnation=2)).seq == 1
    assert o.open(restarted.seal("k", "back", term=0, incarnation=2)).seq == 2
    # The old incarnation keeps its own window (a copy of a peer's state must not lock the peer
    # out before the node has judged them): its replays are still refused...
    assert rejected(o, before_first) == "replayed"
    # ...and once newer incarnations push it out of the kept ones, its messages are stale.
    for incarnation in range(3, 3 + INCARNATIONS_KEPT):
        o.open(sealer().seal("k", None, term=0, incarnation=incarnation))
    assert rejected(o, before.seal("k", None, term=0, incarnation=1)) == "stale"
    assert rejected(o, sealer().seal("k", None, term=0, incarnation=2)) == "stale"


# ---- stale -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("offset_s", [SKEW_S + 0.5, -(SKEW_S + 0.5), 1e9, -1e9])
def test_timestamp_beyond_the_skew_is_stale(offset_s: float) -> None:
    data = sealer(now_s=NOW_S + offset_s).seal("k", 1, term=0, incarnation=0)
    assert rejected(opener(now_s=NOW_S), data) == "stale"


@pytest.mark.parametrize("offset_s", [SKEW_S, -SKEW_S, 0.0])
def test_timestamp_within_the_skew_is_accepted(offset_s: float) -> None:
    data = sealer(now_s=NOW_S + offset_s).seal("k", 1, term=0, incarnation=0)
    assert opener(now_s=NOW_S).open(data).timestamp_s == NOW_S + offset_s


@pytest.mark.parametrize("ts", [float("inf"), float("-inf"), float("nan")])
def test_a_timestamp_that_is_not_finite_is_malformed(ts: float) -> None:
    # NaN compares false with everything: it would never be stale if it got that far.
    assert rejected(opener(), signed_envelope(head(ts=ts))) == "malformed"


@pytest.mark.parametrize("version", [True, 1.0])
def test_a_protocol_version_that_only_equals_one_is_malformed(version: Any) -> None:
    assert rejected(opener(), signed_envelope(head(v=version))) == "malformed"


def test_a_receiver_clock_that_moves_on_makes_a_held_message_stale() -> None:
    clock = Clock()
    o = Opener(Keyring.of(KEY), max_clock_skew_s=SKEW_S, replay_window=WINDOW, max_message_bytes=MAX_BYTES, clock=clock)
    held = sealer().seal("k", 1, term=0, incarnation=0)
    clock.now_s += SKEW_S + 1
    assert rejected(o, held) == "stale"


def test_older_incarnation_than_every_kept_one_is_stale() -> None:
    o = opener()
    for incarnation in range(5, 5 + INCARNATIONS_KEPT):
        o.open(sealer().seal("k", 1, term=0, incarnation=incarnation))
    with pytest.raises(MessageRejected, match="incarnation 4 < 5"):
        o.open(sealer().seal("k", 1, term=0, incarnation=4))
    assert o.drops["stale"] == 1


# ---- oversized -------------------------------------------------------------------------------------


def test_oversized_is_dropped_before_parsing() -> None:
    data = sealer().seal("k", "x" * 100, term=0, incarnation=0)
    assert opener(max_bytes=len(data)).open(data).body == "x" * 100
    assert rejected(opener(max_bytes=len(data) - 1), data) == "oversized"
    assert rejected(opener(max_bytes=10), b"\xc1" * 11) == "oversized"  # not even msgpack: size comes first


def test_every_reason_is_counted() -> None:
    o, s = addressed_opener(), sealer()
    first = s.seal("k", 1, term=0, incarnation=3)
    o.open(first)
    bad = [
        s.seal("k", 1, term=0, incarnation=3, to="not-me"),  # misdirected
        b"\xc1",  # malformed
        sealer(key=OTHER_KEY).seal("k", 1, term=0, incarnation=3),  # unknown_key
        envelope(*decrypted(first)[:1], b"\x00" * 64),  # forged (a signature that is not Alice's)
        first,  # replayed
        sealer(now_s=NOW_S + 2 * SKEW_S).seal("k", 1, term=0, incarnation=3),  # stale
        b"\x00" * (MAX_BYTES + 1),  # oversized
        b"",  # malformed again
    ]
    for data in bad:
        with pytest.raises(MessageRejected):
            o.open(data)
    assert dict(o.drops) == {"malformed": 2, "forged": 1, "unknown_key": 1, "replayed": 1, "stale": 1, "oversized": 1,
                             "misdirected": 1}  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_are_rejected_with_a_reason(data: bytes) -> None:
    o = opener()
    with pytest.raises(MessageRejected) as info:
        o.open(data)
    assert info.value.reason in ("malformed", "forged", "unknown_key", "misdirected", "oversized")
    assert sum(o.drops.values()) == 1


# ---- swarm key files -------------------------------------------------------------------------------


def test_write_new_swarm_key_writes_64_hex_digits_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "swarm.key"
    key = write_new_swarm_key(path)
    assert len(key) == SWARM_KEY_BYTES
    text = path.read_text()
    assert text == key.hex() + "\n" and len(text.strip()) == 64
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_swarm_key(path) == key


def test_write_new_swarm_key_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    path = tmp_path / "swarm.key"
    first = write_new_swarm_key(path)
    with pytest.raises(SwarmKeyError, match="already exists; pass --force"):
        write_new_swarm_key(path)
    assert load_swarm_key(path) == first
    second = write_new_swarm_key(path, force=True)
    assert second != first
    assert load_swarm_key(path) == second


def test_a_replaced_key_file_is_private_too(tmp_path: Path) -> None:
    path = tmp_path / "swarm.key"
    path.write_text("old\n")
    path.chmod(0o644)
    write_new_swarm_key(path, force=True)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_key_file_of_raw_bytes_is_a_clear_swarm_key_error(tmp_path: Path) -> None:
    path = tmp_path / "swarm.key"
    path.write_bytes(b"\xff\xfe" + bytes(30))
    with pytest.raises(SwarmKeyError, match="must hold 64 hex digits"):
        load_swarm_key(path)


def test_write_new_swarm_key_into_a_missing_directory_is_a_swarm_key_error(tmp_path: Path) -> None:
    with pytest.raises(SwarmKeyError, match="cannot write swarm key file"):
        write_new_swarm_key(tmp_path / "missing" / "swarm.key")


def test_load_swarm_key_tolerates_surrounding_whitespace_and_upper_case(tmp_path: Path) -> None:
    path = tmp_path / "swarm.key"
    path.write_text("\n  " + KEY.hex().upper() + "  \n\n")
    assert load_swarm_key(path) == KEY


def test_load_swarm_key_of_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SwarmKeyError, match="cannot read swarm key file"):
        load_swarm_key(tmp_path / "absent.key")


@pytest.mark.parametrize(
    "text",
    ["", "zz" * 32, KEY.hex()[:-2], KEY.hex() + "00", KEY.hex()[:-1], "0x" + KEY.hex()[2:], "not a key"],
    ids=["empty", "not-hex", "62-digits", "66-digits", "odd", "0x-prefix", "words"],
)
def test_bad_key_content_is_a_clear_swarm_key_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "swarm.key"
    path.write_text(text)
    with pytest.raises(SwarmKeyError, match=re.escape(f"swarm key file {path} must be 64 hex digits")):
        load_swarm_key(path)
    with pytest.raises(SwarmKeyError, match=r"^SWARM_KEY must be 64 hex digits"):
        parse_swarm_key(text, "SWARM_KEY")


def test_parse_swarm_key_says_how_many_digits_it_got() -> None:
    with pytest.raises(SwarmKeyError, match="not 62"):
        parse_swarm_key(KEY.hex()[:-2])
    assert parse_swarm_key(KEY.hex()) == KEY


def test_key_fingerprint_is_stable_and_differs_per_key() -> None:
    keys = [KEY, OTHER_KEY, os.urandom(SWARM_KEY_BYTES)]
    prints = [key_fingerprint(k) for k in keys]
    assert len(set(prints)) == len(keys)
    assert prints == [key_fingerprint(bytes(k)) for k in keys]
    assert all(len(p) == 12 and int(p, 16) >= 0 for p in prints)
    assert key_fingerprint(None) == "insecure"
    assert KEY.hex()[:12] not in prints  # a hash, not the key itself


# ---- misdirected -----------------------------------------------------------------------------------


def addressed_opener() -> Opener:
    return Opener(
        Keyring.of(KEY),
        max_clock_skew_s=SKEW_S,
        replay_window=WINDOW,
        max_message_bytes=MAX_BYTES,
        clock=Clock(),
        peer_id="me",
    )


def test_a_message_sealed_for_another_peer_is_misdirected() -> None:
    o, s = addressed_opener(), sealer()
    assert rejected(o, s.seal("k", 1, term=0, incarnation=0, to="someone-else")) == "misdirected"
    assert o.open(s.seal("k", 1, term=0, incarnation=0, to="me")).recipient == "me"
    assert o.open(s.seal("k", 1, term=0, incarnation=0)).recipient is None  # a first hello


def test_our_own_message_reflected_back_is_misdirected() -> None:
    o = Opener(
        Keyring.of(KEY), max_clock_skew_s=SKEW_S, replay_window=WINDOW, max_message_bytes=MAX_BYTES, clock=Clock(),
        peer_id=ALICE.peer_id,
    )  # fmt: skip
    assert rejected(o, sealer().seal("k", 1, term=0, incarnation=0, to=ALICE.peer_id)) == "misdirected"


def test_a_recipient_that_is_not_a_string_is_malformed() -> None:
    assert rejected(opener(), signed_envelope(head(to=5))) == "malformed"


# ---- keyrings ----------------------------------------------------------------------------------------


def test_the_primary_seals_and_every_key_opens() -> None:
    ring = Keyring([KEY, OTHER_KEY], primary=OTHER_KEY)
    data = Sealer(ALICE, ring, clock=Clock()).seal("k", 1, term=0, incarnation=0)
    assert msgpack.unpackb(msgpack.unpackb(data)[0])["key"] == key_fingerprint(OTHER_KEY)
    assert opener(OTHER_KEY).open(data).body == 1
    assert rejected(opener(KEY), data) == "unknown_key"  # a peer that only holds the old key
    both = Opener(ring, max_clock_skew_s=SKEW_S, replay_window=WINDOW, max_message_bytes=MAX_BYTES, clock=Clock())
    assert both.open(sealer(key=KEY).seal("k", 2, term=0, incarnation=0)).body == 2  # the old key still opens
    assert ring.fingerprints == [key_fingerprint(OTHER_KEY), key_fingerprint(KEY)]


def test_a_keyring_replaced_in_place_rotates_a_running_sealer_and_opener() -> None:
    """The three steps of a rotation, on the objects a running peer holds: install, use, remove."""
    ring = Keyring.of(KEY)
    s = Sealer(ALICE, ring, clock=Clock())
    o = Opener(ring, max_clock_skew_s=SKEW_S, replay_window=WINDOW, max_message_bytes=MAX_BYTES, clock=Clock())
    old_peer, new_peer = sealer(MALLORY, KEY), sealer(Identity.generate(), OTHER_KEY)
    ring.replace(Keyring([KEY, OTHER_KEY], primary=KEY))  # install: both open, the old one seals
    assert opener(KEY).open(s.seal("k", "installed", term=0, incarnation=0)).body == "installed"
    assert o.open(new_peer.seal("k", 1, term=0, incarnation=0)).body == 1
    ring.replace(Keyring([KEY, OTHER_KEY], primary=OTHER_KEY))  # use: the new one seals
    assert opener(OTHER_KEY).open(s.seal("k", "used", term=0, incarnation=0)).body == "used"
    assert o.open(old_peer.seal("k", 2, term=0, incarnation=0)).body == 2  # a peer not yet switched
    ring.replace(Keyring([OTHER_KEY]))  # remove: the old key opens nothing
    assert rejected(o, old_peer.seal("k", 3, term=0, incarnation=0)) == "unknown_key"
    assert o.open(new_peer.seal("k", 4, term=0, incarnation=0)).body == 4


def test_the_insecure_keyring_round_trips_but_is_not_secure() -> None:
    assert not Keyring().secure and Keyring.of(KEY).secure
    assert Keyring().primary_fingerprint == "insecure"
    assert opener(None).open(sealer(key=None).seal("k", 1, term=0, incarnation=0)).body == 1


@pytest.mark.parametrize(
    ("keys", "primary", "message"),
    [
        ([KEY, OTHER_KEY], None, "primary key must be one of its keys"),
        ([KEY], OTHER_KEY, "primary key must be one of its keys"),
        ([KEY[:31]], None, "is 32 bytes"),
        ([os.urandom(SWARM_KEY_BYTES) for _ in range(MAX_KEYS + 1)], None, f"at most {MAX_KEYS} keys"),
    ],
    ids=["two-keys-no-primary", "primary-not-held", "short-key", "too-many"],
)
def test_a_bad_keyring_is_a_clear_error(keys: list[bytes], primary: bytes | None, message: str) -> None:
    with pytest.raises(SwarmKeyError, match=message):
        Keyring(keys, primary)


def test_keyring_text_marks_the_primary_and_ignores_comments() -> None:
    text = f"# rotated 2026-11\n {KEY.hex()}  # old\n*{OTHER_KEY.hex().upper()}\n\n"
    ring = parse_keyring(text)
    assert ring.keys == [KEY, OTHER_KEY] and ring.primary == OTHER_KEY
    assert parse_keyring(KEY.hex() + "\n").primary == KEY  # a plain `swarm keygen` file


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "holds no swarm key"),
        ("# nothing\n", "holds no swarm key"),
        (f"{KEY.hex()}\n{OTHER_KEY.hex()}\n", "marks none primary"),
        (f"*{KEY.hex()}\n*{OTHER_KEY.hex()}\n", "more than one primary key"),
        (f"*{KEY.hex()}\nnot-hex\n", "line 2 must be 64 hex digits"),
    ],
    ids=["empty", "comments-only", "no-primary", "two-primaries", "bad-line"],
)
def test_bad_keyring_text_is_a_clear_error(text: str, message: str) -> None:
    with pytest.raises(SwarmKeyError, match=message):
        parse_keyring(text)


def test_a_written_keyring_is_private_and_reads_back(tmp_path: Path) -> None:
    path = tmp_path / "swarm.key"
    ring = Keyring([KEY, OTHER_KEY], primary=OTHER_KEY)
    write_keyring(path, ring)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    back = load_keyring(path)
    assert (back.keys, back.primary) == (ring.keys, ring.primary)
    assert [p.name for p in tmp_path.iterdir()] == ["swarm.key"]  # no temporary file left behind
    with pytest.raises(SwarmKeyError, match="cannot be written"):
        write_keyring(path, Keyring())


def test_replay_windows_are_kept_for_a_bounded_number_of_senders() -> None:
    o = Opener(Keyring.of(KEY), max_clock_skew_s=SKEW_S, replay_window=WINDOW, max_message_bytes=MAX_BYTES,
               max_senders=3, clock=Clock())  # fmt: skip
    senders = [sealer(Identity.generate()) for _ in range(10)]
    for s in senders:
        o.open(s.seal("k", 1, term=0, incarnation=0))
    assert len(o._windows) == 3  # the three most recent senders
    assert list(o._windows) == [peer_id_of(s.identity.public_key) for s in senders[-3:]]


def test_a_header_larger_than_its_bound_is_malformed_before_it_is_parsed() -> None:
    huge = msgpack.packb({"v": b"x" * 10_000, "cluster": DEFAULT_CLUSTER, "key": "k"})
    o = opener(max_bytes=1 << 20)
    with pytest.raises(MessageRejected, match="header of 10") as e:
        o.open(msgpack.packb([huge, b"n" * NONCE_BYTES, b"c"]))
    assert len(str(e.value)) < 200
