"""A peer's identity and the little state it keeps across restarts: an Ed25519 key pair in the
state directory (its peer id is a hash of the public key), and the last term and incarnation,
written atomically so that terms never go back and every restart comes back with a higher
incarnation. It knows nothing of the network or of how messages are sealed."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from swarm.errors import IdentityError

KEY_FILE = "identity.key"
STATE_FILE = "state.json"
PEER_ID_HEX = 16  # hex digits of SHA-256(public key) that name a peer


def peer_id_of(public_key: bytes) -> str:
    """The peer id a raw 32-byte Ed25519 public key stands for."""
    return hashlib.sha256(public_key).hexdigest()[:PEER_ID_HEX]


def verify_signature(public_key: bytes, signature: bytes, data: bytes) -> bool:
    """Whether `signature` is the Ed25519 signature of `data` by `public_key`."""
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, data)
    except (InvalidSignature, ValueError):
        return False
    return True


class Identity:
    """An Ed25519 key pair and the peer id derived from it."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key
        self.public_key = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.peer_id = peer_id_of(self.public_key)

    @classmethod
    def generate(cls) -> Identity:
        """A fresh identity, kept in memory only."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, state_dir: Path) -> Identity:
        """The identity stored in `state_dir`, created there (mode 0600) on first use."""
        path = state_dir / KEY_FILE
        try:
            pem = path.read_bytes()
        except FileNotFoundError:
            identity = cls.generate()
            pem = identity._key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
            _write_atomic(path, pem, mode=0o600)
            return identity
        except OSError as e:
            raise IdentityError(f"cannot read identity key {path}: {e}") from e
        try:
            key = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError) as e:
            raise IdentityError(f"identity key {path} is not a PEM private key: {e}") from e
        if not isinstance(key, Ed25519PrivateKey):
            raise IdentityError(f"identity key {path} is not an Ed25519 key")
        return cls(key)

    def sign(self, data: bytes) -> bytes:
        """Ed25519 signature of `data`."""
        return self._key.sign(data)


@dataclass(frozen=True)
class PersistentState:
    """What a peer remembers across restarts."""

    term: int = 0  # highest election term this peer has seen
    incarnation: int = 0  # bumped on every start and whenever the peer refutes its own death


class StateFile:
    """The persisted term and incarnation of one state directory."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / STATE_FILE

    def load(self) -> PersistentState:
        """The stored state, or zeros when there is none yet."""
        try:
            raw = json.loads(self.path.read_text())
        except FileNotFoundError:
            return PersistentState()
        except (OSError, ValueError) as e:
            raise IdentityError(f"cannot read peer state {self.path}: {e}") from e
        if not isinstance(raw, dict):
            raise IdentityError(f"peer state {self.path} must be a JSON object")
        term, incarnation = raw.get("term"), raw.get("incarnation")
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (term, incarnation)):
            raise IdentityError(f"peer state {self.path} must hold non-negative integers term and incarnation")
        return PersistentState(term=term, incarnation=incarnation)  # type: ignore[arg-type]

    def save(self, state: PersistentState) -> None:
        """Store `state` atomically (write, fsync, rename)."""
        _write_atomic(self.path, json.dumps({"term": state.term, "incarnation": state.incarnation}).encode())


def prepare_state_dir(path: Path) -> Path:
    """Create the state directory (mode 0700) if needed and check it is writable."""
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as e:
        raise IdentityError(f"cannot create state directory {path}: {e}") from e
    if not os.access(path, os.W_OK):
        raise IdentityError(f"state directory {path} is not writable")
    return path


def _write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    # The rename itself must survive a power cut too, or the incarnation could go back.
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
