"""Fuzzing with hypothesis: first the decoders of everything that arrives from the network
(envelopes, tensors, member info, digests, layer maps, data-plane frames, sampling, API bodies),
each of which must answer garbage with its own refusal and nothing else; then every public and
peer endpoint of two live peers in this process (a two-stage swarm of a tiny model with a
word-level tokenizer), hit with malformed msgpack and JSON, truncated and oversized bodies, sealed
envelopes with hostile bodies, link frames with hostile bodies, tensors of wrong dtypes and shapes,
NaN and infinite activations and token ids outside the vocabulary. Every answer is a 2xx or a
clear 4xx (a frame's, a refusal or nothing), never a 5xx or a fault; the peers keep serving; a
session opened before the fuzzing gives the same tokens after it; and the peers' tables stay
within their bounds."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import math
import os
import resource
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peer.sampling import SamplingParams
from swarm.auth import MAX_KEYS, Keyring, Opener, Sealer
from swarm.config import swarm_config_from_dict
from swarm.daemon import PeerServer, build_node
from swarm.errors import LayerMapError, MessageRejected
from swarm.frames import Row, parse_close, parse_pass, parse_refusal, parse_tokens, pass_frame, sampling_of
from swarm.identity import Identity
from swarm.layer_map import LayerMap
from swarm.link import LINK_PATH
from swarm.membership import MemberInfo, parse_digest
from swarm.node import MAX_INTRODUCTIONS, MSG_PATH
from swarm.openai_params import ApiError, parse_request
from swarm.tensors import DTYPES, pack, unpack
from tests.swarm.prober import Prober
from tests.swarm.procs import FAST

pytestmark = pytest.mark.timeout(600)

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))

# Values as msgpack or JSON can carry them: the shapes hostile input comes in.
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**63), max_value=2**64 - 1), st.floats(allow_nan=True),
    st.text(max_size=20), st.binary(max_size=40),
)  # fmt: skip
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner,
                      max_size=5), max_leaves=25)  # fmt: skip
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=30,
)


def keys_from(*names: str) -> st.SearchStrategy[dict[str, Any]]:
    """Mappings that use the expected field names (so checks past the first are reached) with hostile values."""
    return st.dictionaries(st.sampled_from(names) | st.text(max_size=6), values, max_size=len(names) + 1)


# ---- the decoders ------------------------------------------------------------------------------------


@FUZZ
@given(keys_from("dtype", "shape", "data"), st.sampled_from([None, torch.float32, torch.int64]))
def test_tensor_decoder_refuses_or_decodes_within_its_limit(raw: dict[str, Any], dtype: torch.dtype | None) -> None:
    try:
        tensor = unpack(raw, dtype=dtype, max_bytes=4096)
    except MessageRejected as e:
        assert e.reason in ("malformed", "mismatch")
        return
    assert tensor.numel() * tensor.element_size() <= 4096 and (dtype is None or tensor.dtype == dtype)


@FUZZ
@given(
    st.sampled_from(sorted(DTYPES)),
    st.lists(st.integers(0, 6), min_size=1, max_size=4),
    st.integers(-3, 3),
)
def test_tensor_decoder_refuses_truncated_or_padded_data(name: str, dims: list[int], delta: int) -> None:
    size = math.prod(dims) * torch.empty((), dtype=DTYPES[name]).element_size()
    raw = {"dtype": name, "shape": dims, "data": b"\x00" * max(0, size + delta)}
    if delta == 0 or (size + delta < 0 and size == 0):
        assert list(unpack(raw, max_bytes=1 << 20).shape) == dims
    else:
        with pytest.raises(MessageRejected, match="needs"):
            unpack(raw, max_bytes=1 << 20)


@FUZZ
@given(keys_from("peer_id", "node_id", "url", "incarnation", "heartbeat", "priority", "usable_bytes", "device",
                 "fingerprint", "epoch", "start", "end", "ready"))  # fmt: skip
def test_member_info_decoder_only_refuses(raw: dict[str, Any]) -> None:
    try:
        MemberInfo.from_dict(raw)
    except MessageRejected as e:
        assert e.reason == "malformed"


@FUZZ
@given(values)
def test_digest_decoder_only_refuses(raw: Any) -> None:
    try:
        entries = parse_digest(raw, 4)
    except MessageRejected as e:
        assert e.reason in ("malformed", "oversized")
        return
    assert len(entries) <= 4


@FUZZ
@given(keys_from("term", "epoch", "model", "num_layers", "stages") | values)
def test_layer_map_decoder_only_refuses(raw: Any) -> None:
    try:
        layer_map = LayerMap.from_dict(raw)
    except LayerMapError:
        return
    assert layer_map.stages and layer_map.stages[-1].end == layer_map.num_layers


@FUZZ
@given(
    keys_from(
        "temperature",
        "top_k",
        "top_p",
        "seed",
        "top_logprobs",
        "prompt_logprobs",
        "presence_penalty",
        "frequency_penalty",
        "logit_bias",
    )
)
def test_sampling_decoder_only_refuses(sampling: dict[str, Any]) -> None:
    try:
        result = sampling_of(sampling)
    except MessageRejected as e:
        assert e.reason == "malformed"
        return
    assert isinstance(result, SamplingParams)


@FUZZ
@given(keys_from("map", "epoch", "rows", "input", "sessions", "reason", "message"),
       st.lists(st.lists(values, max_size=8), max_size=3))  # fmt: skip
def test_frame_decoders_only_refuse(body: dict[str, Any], rows: list[list[Any]]) -> None:
    for raw in (body, {**body, "rows": rows}):
        for decode in (
            lambda b: parse_pass(b, max_rows=4, max_stages=4),
            lambda b: parse_tokens(b, max_rows=4, max_stages=4),
            lambda b: parse_refusal(b, max_rows=4),
            lambda b: parse_close(b, max_rows=4),
        ):
            try:
                decode(raw)
            except MessageRejected as e:
                assert e.reason == "malformed"


class FakeTokenizer:
    def encode(self, text: str) -> list[int]:
        return [1, 2, 3]

    def apply_chat(self, messages: list[dict[str, str]]) -> list[int]:
        return [1, 2]


def fake_node() -> Any:
    from types import SimpleNamespace

    serving = SimpleNamespace(
        default_max_tokens=16, max_tokens_limit=64, max_prompt_tokens=32, max_sessions_per_client=4
    )
    return SimpleNamespace(model=SimpleNamespace(spec="m", profile=SimpleNamespace(vocab_size=100)),
                           config=SimpleNamespace(serving=serving), tokenizer=FakeTokenizer())  # fmt: skip


@FUZZ
@given(st.dictionaries(st.sampled_from(["model", "prompt", "messages", "max_tokens", "temperature", "top_p", "seed",
                                        "stop", "stream", "n", "logprobs", "top_k", "echo", "top_logprobs",
                                        "logit_bias", "presence_penalty", "frequency_penalty", "stream_options",
                                        "best_of", "suffix", "response_format", "tools", "tool_choice"])
                       | st.text(max_size=5), json_values, max_size=8))  # fmt: skip
def test_api_body_parsers_answer_400_or_a_valid_request(body: dict[str, Any]) -> None:
    node = fake_node()
    for chat in (False, True):
        try:
            api = parse_request(body, node, chat)
        except ApiError as e:
            assert 400 <= e.status < 500
            continue
        assert 1 <= len(api.requests()) <= 4


@FUZZ
@given(st.lists(values, min_size=3, max_size=3), st.binary(max_size=64))
def test_envelope_decoder_only_refuses_structured_garbage(parts: list[Any], tail: bytes) -> None:
    opener = Opener(Keyring.of(b"k" * 32), max_clock_skew_s=30, replay_window=8, max_message_bytes=4096)
    header = msgpack.packb({"v": 2, "cluster": "default", "key": Keyring.of(b"k" * 32).primary_fingerprint})
    for data in (msgpack.packb(parts), msgpack.packb([header, *parts[1:]]), msgpack.packb([header, b"n" * 12, tail])):
        with pytest.raises(MessageRejected) as e:
            opener.open(data)
        assert e.value.reason in ("malformed", "forged", "unknown_key", "misdirected", "oversized")


# ---- every endpoint of two live peers ------------------------------------------------------------------


def write_word_tokenizer(directory: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(str(directory))


class Loop:
    """An event loop in a thread of its own, so that synchronous hypothesis tests can talk HTTP to
    servers living on it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        # The peers' forward passes run on the loop's default executor: one thread, started here,
        # so that no test sees a thread appear when two stages' passes first overlap.
        compute = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="fuzz-compute")
        compute.submit(lambda: None).result()
        self.loop.set_default_executor(compute)
        self.thread = threading.Thread(target=self.loop.run_forever, name="fuzz-peers")
        self.thread.start()

    def run(self, coro: Any, timeout_s: float = 120) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def submit(self, coro: Any) -> Any:
        """Start `coro` on the loop; its concurrent future."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=30)
        self.loop.close()


@pytest.fixture(scope="module")
def peers(tiny_llama, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    import shutil

    tmp = tmp_path_factory.mktemp("fuzz")
    model = tmp / "model"
    shutil.copytree(tiny_llama(layers=4), model)
    write_word_tokenizer(model, 256)
    key = os.urandom(32)
    loop = Loop()
    servers: list[PeerServer] = []

    def config(name: str, join: list[str]) -> Any:
        raw: dict[str, Any] = {k: dict(v) for k, v in FAST.items()}
        raw["node"] = {"host": "127.0.0.1", "port": 0, "node_id": name, "state_dir": str(tmp / name)}
        raw["discovery"] = {"mdns": False, "join": join}
        raw["model"] = {"spec": str(model)}
        raw["store"] = {"cache_dir": str(tmp / "cache")}
        raw["resources"] = {"max_memory_mb": 64}
        raw["security"] = {"max_message_bytes": 64 * 1024}
        raw["serving"] = {"max_activation_bytes": 1 << 20, "max_request_bytes": 16 * 1024, "max_tokens_limit": 32}
        raw["executor"] = {"max_sessions": 8}
        return swarm_config_from_dict(raw)

    async def start(name: str, join: list[str]) -> PeerServer:
        server = PeerServer(build_node(config(name, join), Keyring.of(key), show_progress=False))
        await server.start()
        return server

    try:
        servers.append(loop.run(start("a", [])))
        servers.append(loop.run(start("b", [servers[0].url.removeprefix("http://")])))

        def ready() -> bool:
            return all(s.node.ready() and s.node.layer_map is not None and len(s.node.layer_map.stages) == 2
                       for s in servers)  # fmt: skip

        while not ready():
            loop.run(asyncio.sleep(0.05))  # poll the peers' own progress
        yield {"servers": servers, "key": key, "loop": loop}
    finally:
        for s in servers:
            loop.run(s.close())
        loop.close()


def http(url: str, data: bytes | None = None, method: str = "POST", content_type: str = "application/json") -> int:
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            resp.read()
            return int(resp.status)
    except urllib.error.HTTPError as e:
        e.read()
        return int(e.code)


PROMPT = [1, 5, 9, 13, 17]
PUBLIC = ["/v1/completions", "/v1/chat/completions"]


@pytest.fixture(scope="module")
def before(peers) -> dict[str, Any]:
    """A session opened before any fuzzing (its first token), and this process's peak memory."""
    node = peers["servers"][0].node
    assert node.layer_map is not None
    prober = Prober(node.layer_map.to_dict(), node.model.fingerprint, Keyring.of(peers["key"]))
    first = prober.step("victim", PROMPT, 0, opening=True)
    return {"prober": prober, "first": first, "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}


@FUZZ
@given(json_values, st.sampled_from(PUBLIC), st.integers(0, 1))
def test_public_endpoints_answer_json_garbage_with_a_4xx(peers, before, body: Any, path: str, which: int) -> None:
    status = http(peers["servers"][which].url + path, json.dumps(body).encode())
    assert status == 200 or 400 <= status < 500, (path, body, status)


@FUZZ
@given(
    st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]),
    st.sampled_from([*PUBLIC, "/v1/models", "/metrics", "/swarm/status", "/healthz", MSG_PATH, LINK_PATH, "/v1/",
                     "/v1/completions/", "/swarm/", "/"]),
    st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126, exclude_characters="#/?%"), max_size=12),
    st.integers(0, 1),
)  # fmt: skip
def test_every_endpoint_answers_any_method_and_query_without_a_5xx(
    peers, before, method: str, path: str, query: str, which: int
) -> None:
    status = http(f"{peers['servers'][which].url}{path}?{query}", None, method=method)
    assert status < 500, (method, path, query, status)


@FUZZ
@given(st.binary(max_size=300), st.sampled_from([*PUBLIC, MSG_PATH]), st.integers(0, 1))
def test_every_post_endpoint_answers_raw_bytes_with_a_4xx(peers, before, data: bytes, path: str, which: int) -> None:
    status = http(peers["servers"][which].url + path, data, content_type="application/octet-stream")
    assert 400 <= status < 500, (path, data, status)


@FUZZ
@given(st.sampled_from(["/v1/completions", MSG_PATH]), st.integers(0, 1), st.integers(1, 60))
def test_truncated_and_oversized_bodies_get_a_4xx(peers, before, path: str, which: int, cut: int) -> None:
    server = peers["servers"][which]
    sealed = Sealer(Identity.generate(), Keyring.of(peers["key"])).seal("hello", {}, term=0, incarnation=1)
    valid = {"/v1/completions": json.dumps({"prompt": "w5 w6", "max_tokens": 2}).encode()}.get(path, sealed)
    assert 400 <= http(server.url + path, valid[: max(0, len(valid) - cut)]) < 500
    limit = 64 * 1024 if path == MSG_PATH else 16 * 1024
    assert http(server.url + path, b"x" * (limit + 1)) == 413


def sealed_by(peers: dict[str, Any], sender: PeerServer, kind: str, body: dict[str, Any], to: str) -> bytes:
    """A message sealed by a live peer itself (on its own loop, so its sequence numbers stay in order)."""

    async def seal() -> bytes:
        return sender.node._seal(kind, body, to=to)

    data: bytes = peers["loop"].run(seal())
    return data


@FUZZ
@given(
    st.sampled_from(["hello", "gossip", "election", "coordinator", "layer_map", "link", "nonsense"]),
    st.dictionaries(st.sampled_from(["digest", "map", "session", "epoch", "eph", "start", "input", "open"])
                    | st.text(max_size=5), values, max_size=6),
    st.integers(0, 1),
)  # fmt: skip
def test_sealed_envelopes_with_hostile_bodies_get_a_4xx(peers, before, kind: str, body: dict[str, Any],
                                                        which: int) -> None:  # fmt: skip
    """Hostile bodies sealed by the other peer (a genuine key holder) reach every handler's parsing."""
    servers = peers["servers"]
    target, sender = servers[which], servers[1 - which]
    data = sealed_by(peers, sender, kind, body, target.node.peer_id)
    status = http(target.url + MSG_PATH, data, content_type="application/msgpack")
    assert status == 200 or 400 <= status < 500, (kind, body, status)


def faults(peers: dict[str, Any]) -> int:
    """Frames that raised something other than a refusal, on either peer (a bug: it should be 0)."""
    return sum(s.node.transport.faults for s in peers["servers"])


@FUZZ
@given(
    st.sampled_from(["pass", "close", "tokens", "refused", "clock", "nonsense"]),
    keys_from("map", "epoch", "rows", "input", "sessions", "reason", "message", "offset_s"),
    st.integers(0, 1),
)
def test_link_frames_with_hostile_bodies_are_refused_or_counted(peers, before, kind: str, body: dict[str, Any],
                                                                stage: int) -> None:  # fmt: skip
    """Hostile frames from a genuine key holder, over its own link, reach every frame handler's parsing."""
    prober: Prober = before["prober"]
    prober.send_only(stage, [{**body, "kind": kind}])
    assert faults(peers) == 0


@FUZZ
@given(
    st.sampled_from(["float32", "float16", "bfloat16", "int64", "int32", "uint8", "bool"]),
    st.lists(st.integers(0, 5), min_size=1, max_size=4),
    st.sampled_from([0.0, math.nan, math.inf, -math.inf, 1e30, 300.0, -1.0]),
    st.sampled_from([0, 1]),
)
def test_activations_of_wrong_dtype_shape_or_value_are_refused(peers, before, dtype: str, dims: list[int],
                                                               fill: float, stage: int) -> None:  # fmt: skip
    """Steps of the open session to each stage, sent as its rightful sender would (the entry to the
    first stage, the first stage to the second), carrying tensors of every kind; their position is
    past the session's cache, so even a well-formed tensor is refused, and the refusal comes home."""
    servers = peers["servers"]
    layer_map = servers[0].node.layer_map
    assert layer_map is not None
    by_id = {s.node.peer_id: s for s in servers}
    value = fill if dtype.startswith(("float", "bfloat")) or math.isfinite(fill) else 300
    tensor = torch.full(dims, value).to(getattr(torch, dtype))
    # A dtype the wire format does not have is written by hand, as a peer might.
    raw = {"dtype": dtype, "shape": dims, "data": tensor.numpy().tobytes()} if dtype not in DTYPES else None
    wire = raw or pack(tensor)
    prober: Prober = before["prober"]
    length = max(1, dims[1] if len(dims) > 1 else dims[0])
    row = prober.row("victim", length, len(PROMPT) + 10)
    if stage == 0:
        answer = prober.send(0, pass_frame(layer_map.id, layer_map.epoch, [row], wire))
    else:  # the second stage takes steps from the first alone: its own link carries this one
        first = by_id[layer_map.stages[0].peer_id].node.transport
        row = Row(row.session, row.entry, row.step, row.start, row.length, None, ((0.0, 0, 0.0),))
        nxt = layer_map.stages[1]
        frame = pass_frame(layer_map.id, layer_map.epoch, [row], wire)
        answer = prober.exchange(lambda: peers["loop"].submit(first.send(nxt.peer_id, nxt.url, frame)))
    assert (answer.kind, answer.sender) == ("refused", layer_map.stages[stage].peer_id), answer
    assert answer.value in ("malformed", "mismatch"), (dtype, dims, fill, stage, answer)
    assert faults(peers) == 0


def test_after_the_fuzzing_the_peers_serve_the_same_tokens_within_their_bounds(peers, before) -> None:
    servers = peers["servers"]
    for s in servers:
        assert http(s.url + "/healthz", method="GET") == 200
        node = s.node
        assert node.membership is not None and len(node.membership.members) <= node.config.gossip.max_members
        assert len(node.opener._windows) <= 1024
        assert len(node._introductions) <= MAX_INTRODUCTIONS and len(node._hello_failures) <= MAX_INTRODUCTIONS
        assert node.service.sessions() <= node.config.peer.executor.max_sessions
        assert len(node.keyring.keys) <= MAX_KEYS
    prober: Prober = before["prober"]
    # The session opened before the fuzzing goes on as a fresh one run now does.
    second = prober.step("victim", [before["first"]], len(PROMPT))
    assert prober.step("control", PROMPT, 0, opening=True) == before["first"]
    assert prober.step("control", [before["first"]], len(PROMPT)) == second
    prober.close("victim")
    prober.close("control")
    assert faults(peers) == 0
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before["maxrss_kb"]) / 1024
    assert grown_mib < 200, f"this process's peak memory grew by {grown_mib:.0f} MiB while fuzzing"
