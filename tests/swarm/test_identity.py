"""A peer's identity key and persisted state on a real state directory: the key is created once
(mode 0600) and the same peer id comes back on reload; signatures verify only for their key and
data; corrupt or foreign key files and malformed state files are IdentityErrors, not crashes."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from swarm.errors import IdentityError
from swarm.identity import (
    KEY_FILE,
    PEER_ID_HEX,
    STATE_FILE,
    Identity,
    PersistentState,
    StateFile,
    peer_id_of,
    prepare_state_dir,
    verify_signature,
)


def test_load_or_create_writes_a_pem_key_mode_0600(tmp_path: Path) -> None:
    identity = Identity.load_or_create(tmp_path)
    path = tmp_path / KEY_FILE
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == [KEY_FILE]  # no temporary file left behind
    assert len(identity.public_key) == 32


def test_reload_gives_the_same_peer_id_and_key(tmp_path: Path) -> None:
    first = Identity.load_or_create(tmp_path)
    again = Identity.load_or_create(tmp_path)
    assert again.peer_id == first.peer_id
    assert again.public_key == first.public_key
    assert verify_signature(first.public_key, again.sign(b"data"), b"data")


def test_separate_state_dirs_get_separate_identities(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert Identity.load_or_create(tmp_path / "a").peer_id != Identity.load_or_create(tmp_path / "b").peer_id


def test_peer_id_is_the_hash_of_the_public_key() -> None:
    identity = Identity.generate()
    assert identity.peer_id == peer_id_of(identity.public_key)
    assert len(identity.peer_id) == PEER_ID_HEX
    assert set(identity.peer_id) <= set("0123456789abcdef")
    assert peer_id_of(bytes(32)) != peer_id_of(bytes(31) + b"\x01")
    assert Identity.generate().peer_id != identity.peer_id


def test_sign_and_verify() -> None:
    alice, bob = Identity.generate(), Identity.generate()
    signature = alice.sign(b"message")
    assert verify_signature(alice.public_key, signature, b"message")
    assert not verify_signature(alice.public_key, signature, b"messagE")
    assert not verify_signature(bob.public_key, signature, b"message")
    assert not verify_signature(alice.public_key, signature[:-1], b"message")
    assert not verify_signature(alice.public_key, bytes(64), b"message")
    assert not verify_signature(alice.public_key[:31], signature, b"message")  # not a key at all


def test_corrupt_key_file_is_an_identity_error(tmp_path: Path) -> None:
    (tmp_path / KEY_FILE).write_bytes(b"-----BEGIN PRIVATE KEY-----\nnot base64 at all\n-----END PRIVATE KEY-----\n")
    with pytest.raises(IdentityError, match="is not a PEM private key"):
        Identity.load_or_create(tmp_path)


@pytest.mark.parametrize("content", [b"", b"\x00\xff" * 40, b"hello"])
def test_garbage_key_file_is_an_identity_error(tmp_path: Path, content: bytes) -> None:
    (tmp_path / KEY_FILE).write_bytes(content)
    with pytest.raises(IdentityError):
        Identity.load_or_create(tmp_path)
    assert (tmp_path / KEY_FILE).read_bytes() == content  # never silently replaced


def test_encrypted_key_file_is_an_identity_error(tmp_path: Path) -> None:
    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    (tmp_path / KEY_FILE).write_bytes(pem)
    with pytest.raises(IdentityError, match="is not a PEM private key"):
        Identity.load_or_create(tmp_path)


def test_non_ed25519_key_is_an_identity_error(tmp_path: Path) -> None:
    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (tmp_path / KEY_FILE).write_bytes(pem)
    with pytest.raises(IdentityError, match="is not an Ed25519 key"):
        Identity.load_or_create(tmp_path)


def test_unreadable_key_path_is_an_identity_error(tmp_path: Path) -> None:
    (tmp_path / KEY_FILE).mkdir()
    with pytest.raises(IdentityError, match="cannot read identity key"):
        Identity.load_or_create(tmp_path)


def test_state_file_round_trip(tmp_path: Path) -> None:
    states = StateFile(tmp_path)
    states.save(PersistentState(term=7, incarnation=3))
    assert states.load() == PersistentState(term=7, incarnation=3)
    assert json.loads((tmp_path / STATE_FILE).read_text()) == {"term": 7, "incarnation": 3}
    StateFile(tmp_path).save(PersistentState(term=8, incarnation=4))
    assert StateFile(tmp_path).load() == PersistentState(term=8, incarnation=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == [STATE_FILE]  # the temporary file was renamed


def test_missing_state_file_is_zeros(tmp_path: Path) -> None:
    assert StateFile(tmp_path).load() == PersistentState(term=0, incarnation=0)


@pytest.mark.parametrize(
    "text",
    [
        "{not json",
        "",
        "[1, 2]",
        '"term"',
        '{"term": -1, "incarnation": 0}',
        '{"term": 0, "incarnation": -5}',
        '{"term": true, "incarnation": 0}',
        '{"term": 0, "incarnation": false}',
        '{"term": 1.5, "incarnation": 0}',
        '{"term": "1", "incarnation": 0}',
        '{"term": 1}',
        "{}",
    ],
)
def test_malformed_state_file_is_an_identity_error(tmp_path: Path, text: str) -> None:
    (tmp_path / STATE_FILE).write_text(text)
    with pytest.raises(IdentityError, match="peer state"):
        StateFile(tmp_path).load()


def test_state_file_that_is_not_utf8_is_an_identity_error(tmp_path: Path) -> None:
    (tmp_path / STATE_FILE).write_bytes(b"\xff\xfe\x00")
    with pytest.raises(IdentityError, match="cannot read peer state"):
        StateFile(tmp_path).load()


def test_prepare_state_dir_creates_the_directory(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "state"
    assert prepare_state_dir(path) == path
    assert path.is_dir()
    assert stat.S_IMODE(path.stat().st_mode) == 0o700
    assert prepare_state_dir(path) == path  # an existing directory is fine
    Identity.load_or_create(path)
    assert (path / KEY_FILE).is_file()


def test_prepare_state_dir_under_a_file_is_an_identity_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(IdentityError, match="cannot create state directory"):
        prepare_state_dir(tmp_path / "file" / "state")
