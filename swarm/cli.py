"""`swarm`, the client command line: `swarm generate "prompt"` and `swarm chat` stream answers to
the terminal, `swarm status` prints a peer's view of the swarm as a table, `swarm keygen` writes a
new swarm key and `swarm keys` edits a keyring file that running peers reload. Without `--url` it
finds a peer over mDNS; `--api-key-file` (or SWARM_API_KEY) sends an API key. It talks to peers
only through their public HTTP endpoints (the OpenAI-compatible API and /swarm/status)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from peer.errors import SwarmError
from swarm.auth import (
    Keyring,
    key_fingerprint,
    load_keyring,
    load_swarm_key,
    write_keyring,
    write_new_swarm_key,
)
from swarm.discovery import SERVICE_TYPE
from swarm.guard import parse_api_keys

MDNS_WAIT_S = 3.0


def auth_headers(args: argparse.Namespace) -> dict[str, str]:
    """The Authorization header for the API key of --api-key-file (its first key), else of
    SWARM_API_KEY; none without either."""
    key = os.environ.get("SWARM_API_KEY") or None
    if getattr(args, "api_key_file", None):
        path = Path(args.api_key_file)
        try:
            key = parse_api_keys(path.read_text(), f"API key file {path}")[0].decode()
        except (OSError, UnicodeDecodeError) as e:
            raise SwarmError(f"cannot read API key file {path}: {e}") from e
    return {"Authorization": f"Bearer {key}"} if key else {}


def find_peer_url(interface: str | None, wait_s: float = MDNS_WAIT_S) -> str | None:
    """The URL of the first peer announcing itself over mDNS within `wait_s`, if any."""
    from zeroconf import IPVersion, ServiceBrowser, ServiceInfo, ServiceStateChange, Zeroconf

    from swarm.discovery import mdns_interfaces
    from swarm.netif import interfaces, reachable_first

    found: list[str] = []
    done = threading.Event()
    zc = Zeroconf(interfaces=mdns_interfaces(interface), ip_version=IPVersion.V4Only)

    def on_change(zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        if state_change is not ServiceStateChange.Removed and not found:
            found.append(name)
            done.set()

    browser = ServiceBrowser(zc, SERVICE_TYPE, handlers=[on_change])
    try:
        if not done.wait(wait_s):
            return None
        info = ServiceInfo(SERVICE_TYPE, found[0])
        if not info.request(zc, int(wait_s * 1000)):
            return None
        addresses = reachable_first(info.parsed_addresses(IPVersion.V4Only), interfaces())
        return f"http://{addresses[0]}:{info.port}" if addresses else None
    finally:
        browser.cancel()
        zc.close()


def fetch_json(url: str, timeout_s: float = 5.0, headers: dict[str, str] | None = None) -> Any:
    """GET a peer's JSON endpoint, with a clear error when it cannot be reached."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=timeout_s) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as e:
        raise SwarmError(f"{url} answered HTTP {e.code}: {e.read()[:200].decode(errors='replace')}") from e
    except (urllib.error.URLError, OSError) as e:
        raise SwarmError(f"cannot reach {url}: {getattr(e, 'reason', e)}") from e
    except ValueError as e:
        raise SwarmError(f"{url} did not answer JSON: {e}") from e


def format_status(status: dict[str, Any]) -> str:
    """A /swarm/status document as a readable summary and table."""
    leader = status.get("leader")
    peers = {p["peer_id"]: p for p in status.get("peers", [])}
    layer_map = status.get("layer_map") or {}
    stages = {s["peer_id"]: s for s in layer_map.get("stages", [])}
    alive = sum(p["state"] != "dead" for p in peers.values())
    leader_name = f"{leader} ({peers[leader]['node_id']})" if leader in peers else str(leader)
    lines = [
        f"swarm of {alive} live peer(s); leader {leader_name}, term {status.get('term')}",
        f"model {status['model']['spec']} (fingerprint {status['model']['fingerprint'][:12]}...)"
        + (f", {quantize} weights" if (quantize := status["model"].get("quantize", "none")) != "none" else ""),
        f"layer map epoch {layer_map.get('epoch', '-')}: {'READY' if status.get('ready') else 'not ready'}"
        + (f" ({len(stages)} stage(s), {layer_map.get('num_layers')} layers)" if stages else ""),
        f"seen from {status['peer_id']} ({status['node_id']}) at {status['url']}",
    ]
    for error in status.get("errors", []):
        lines.append(f"error: {error}")
    header = ("PEER", "NODE", "STATE", "MEMORY", "LAYERS", "READY", "URL")
    rows = []
    order = [*stages, *(p for p in peers if p not in stages)]
    for peer_id in order:
        p = peers.get(peer_id) or {"node_id": "?", "state": "unknown", "memory_mb": 0, "url": stages[peer_id]["url"]}
        stage = stages.get(peer_id)
        layers = f"[{stage['start']}, {stage['end']})" if stage else "standby"
        ready = ("yes" if stage["ready"] else "no") if stage else "-"
        name = p["node_id"] + (" *" if peer_id == leader else "")
        rows.append((peer_id, name, p["state"], f"{p['memory_mb']} MiB", layers, ready, p["url"]))
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines.append("")
    for row in [header, *rows]:
        lines.append("  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
    lines.append("(* leader)")
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    url = args.url or find_peer_url(args.mdns_interface)
    if url is None:
        raise SwarmError("no peer found over mDNS; pass --url http://HOST:PORT")
    status = fetch_json(url.rstrip("/") + "/swarm/status", headers=auth_headers(args))
    print(json.dumps(status, indent=2) if args.json else format_status(status))
    return 0


def stream_events(
    url: str, path: str, body: dict[str, Any], timeout_s: float = 600.0, headers: dict[str, str] | None = None
) -> Iterator[dict[str, Any]]:
    """POST a streaming OpenAI request and yield each server-sent event's JSON object."""
    data = json.dumps({**body, "stream": True}).encode()
    headers = {**(headers or {}), "Content-Type": "application/json"}
    req = urllib.request.Request(url.rstrip("/") + path, data=data, headers=headers)
    try:
        resp = urllib.request.urlopen(req, timeout=timeout_s)
    except urllib.error.HTTPError as e:
        raise SwarmError(f"{url} answered HTTP {e.code}: {_error_message(e.read())}") from e
    except (urllib.error.URLError, OSError) as e:
        raise SwarmError(f"cannot reach {url}: {getattr(e, 'reason', e)}") from e
    with resp:
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                return
            event = json.loads(line[len("data: ") :])
            if "error" in event:
                raise SwarmError(f"the swarm failed: {event['error'].get('message')}")
            yield event


def _error_message(raw: bytes) -> str:
    try:
        return str(json.loads(raw)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return raw[:200].decode(errors="replace")


def stream_text(
    url: str, body: dict[str, Any], chat: bool, headers: dict[str, str] | None = None
) -> Iterator[str | dict[str, Any]]:
    """Yield the text pieces of a streamed completion, then the final usage-and-timings object."""
    for event in stream_events(url, "/v1/chat/completions" if chat else "/v1/completions", body, headers=headers):
        if event.get("timings"):
            yield event
        for choice in event.get("choices", []):
            piece = choice.get("delta", {}).get("content") if chat else choice.get("text")
            if piece:
                yield piece


def format_timings(timings: dict[str, Any]) -> str:
    """A response's timings as a small table."""
    rows = [
        ("time to first token", f"{timings['time_to_first_token_s'] * 1000:.0f} ms"),
        ("tokens", str(timings["tokens"])),
        ("tokens per second", f"{timings['tokens_per_s']}" if timings.get("tokens_per_s") else "-"),
        ("total", f"{timings['total_s']:.2f} s"),
    ]
    rows += [(f"compute {stage}", f"{s * 1000:.0f} ms") for stage, s in timings["compute_s_per_stage"].items()]
    rows += [(f"wire {hop}", f"{s * 1000:.0f} ms") for hop, s in timings["wire_s_per_hop"].items()]
    if "entry_s" in timings:  # peers before it did not report it
        rows.append(("at the entry", f"{timings['entry_s'] * 1000:.0f} ms"))
    rows.append(("bytes sent", f"{timings['bytes_sent']:,}"))
    overhead = timings.get("communication_overhead")
    rows.append(("communication overhead", f"{overhead * 100:.1f} %" if overhead is not None else "-"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def _peer_url(args: argparse.Namespace) -> str:
    url = args.url or find_peer_url(args.mdns_interface)
    if url is None:
        raise SwarmError("no peer found over mDNS; pass --url http://HOST:PORT")
    return str(url)


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    return {"max_tokens": args.max_tokens, "temperature": args.temperature, "seed": args.seed}


def cmd_generate(args: argparse.Namespace) -> int:
    url = _peer_url(args)
    body: dict[str, Any] = _sampling(args)
    if args.chat:
        body["messages"] = [{"role": "user", "content": args.prompt}]
    else:
        body["prompt"] = args.prompt
    final: dict[str, Any] = {}
    for piece in stream_text(url, body, args.chat, auth_headers(args)):
        if isinstance(piece, dict):
            final = piece
        else:
            print(piece, end="", flush=True)
    print()
    if args.timings and final.get("timings"):
        print("\n" + format_timings(final["timings"]), file=sys.stderr)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    url = _peer_url(args)
    messages: list[dict[str, str]] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    print(f"chatting with {url}; an empty line or Ctrl-D ends", file=sys.stderr)
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            print()
            return 0
        if not line:
            return 0
        messages.append({"role": "user", "content": line})
        reply = ""
        for piece in stream_text(url, {**_sampling(args), "messages": messages}, True, auth_headers(args)):
            if isinstance(piece, str):
                reply += piece
                print(piece, end="", flush=True)
        print()
        messages.append({"role": "assistant", "content": reply})


def cmd_keygen(args: argparse.Namespace) -> int:
    path = Path(args.out)
    key = write_new_swarm_key(path, force=args.force)
    print(f"wrote a new swarm key to {path} (fingerprint {key_fingerprint(key)})")
    print(f"copy it to every peer and start each with: swarm-peer --swarm-key-file {path}")
    return 0


API_KEY_HELP = "file whose first key is sent as the API key (default: SWARM_API_KEY, if set)"


RELOAD_NOTE = "running peers that use this file reload it within a gossip interval (or at once on SIGHUP)"


def _show_keyring(keyring: Keyring) -> None:
    for key in keyring.keys:
        role = "primary (seals and opens)" if key == keyring.primary else "accepted (opens)"
        print(f"  {key_fingerprint(key)}  {role}")


def _key_of(keyring: Keyring, fingerprint: str, path: Path) -> bytes:
    for key in keyring.keys:
        if key_fingerprint(key) == fingerprint:
            return key
    known = ", ".join(key_fingerprint(k) for k in keyring.keys)
    raise SwarmError(f"{path} holds no key with fingerprint {fingerprint!r} (it holds {known})")


def cmd_keys(args: argparse.Namespace) -> int:
    """`swarm keys list|install|use|remove`: edit a keyring file that running peers reload."""
    path = Path(args.keyring)
    if args.action == "install":
        key = load_swarm_key(Path(args.key_file))
        if path.exists():
            keyring = load_keyring(path)
            if key in keyring.keys:
                raise SwarmError(f"{path} already holds key {key_fingerprint(key)}")
            keyring = Keyring([*keyring.keys, key], keyring.primary)
        else:
            keyring = Keyring([key])
        write_keyring(path, keyring)
        print(f"installed key {key_fingerprint(key)} in {path}" + (" as its primary" if keyring.primary == key else ""))
    elif args.action != "list":
        keyring = load_keyring(path)
        key = _key_of(keyring, args.fingerprint, path)
        if args.action == "use":
            keyring = Keyring(keyring.keys, key)
            print(f"key {args.fingerprint} is now the primary of {path}")
        else:
            if key == keyring.primary:
                raise SwarmError(f"key {args.fingerprint} is the primary of {path}; make another key primary first")
            keyring = Keyring([k for k in keyring.keys if k != key], keyring.primary)
            print(f"removed key {args.fingerprint} from {path}")
        write_keyring(path, keyring)
    keyring = load_keyring(path)
    print(f"{path}:")
    _show_keyring(keyring)
    if args.action != "list":
        print(RELOAD_NOTE)
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="swarm", description="Client for an inference swarm.")
    sub = p.add_subparsers(dest="command", required=True)
    status = sub.add_parser("status", help="show peers, leader, term and layer map")
    status.add_argument("--url", help="a peer's base URL, e.g. http://127.0.0.1:50051 (default: find one by mDNS)")
    status.add_argument("--mdns-interface", help="interface to browse on, by name or address (default: all)")
    status.add_argument("--json", action="store_true", help="print the raw JSON")
    status.add_argument("--api-key-file", help=API_KEY_HELP)
    status.set_defaults(func=cmd_status)
    for name, helps in (("generate", "stream a completion of a prompt"), ("chat", "chat with the swarm's model")):
        cmd = sub.add_parser(name, help=helps)
        if name == "generate":
            cmd.add_argument("prompt", help="the text to continue (or the user message with --chat)")
            cmd.add_argument("--chat", action="store_true", help="use the model's chat template")
            cmd.add_argument("--timings", action="store_true", help="print the request's timings afterwards")
        else:
            cmd.add_argument("--system", help="a system message to start the conversation with")
        cmd.add_argument("--url", help="a peer's base URL (default: find one by mDNS)")
        cmd.add_argument("--mdns-interface", help="interface to browse on, by name or address (default: all)")
        cmd.add_argument("--api-key-file", help=API_KEY_HELP)
        cmd.add_argument("--max-tokens", type=int, default=128, help="tokens to generate at most (default 128)")
        cmd.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
        cmd.add_argument("--seed", type=int, default=0)
        cmd.set_defaults(func=cmd_generate if name == "generate" else cmd_chat)
    keygen = sub.add_parser("keygen", help="write a new 32-byte swarm key")
    keygen.add_argument("--out", default="swarm.key", help="file to write (default: %(default)s)")
    keygen.add_argument("--force", action="store_true", help="replace an existing file")
    keygen.set_defaults(func=cmd_keygen)
    keys = sub.add_parser(
        "keys",
        help="list or change a keyring file (rotate swarm keys on running peers)",
        description="A keyring holds one primary key, which seals every message, and other keys that are "
        "still accepted. To rotate: `install` the new key on every peer, then `use` it on every peer, "
        f"then `remove` the old one; {RELOAD_NOTE}.",
    )
    actions = keys.add_subparsers(dest="action", required=True)
    for name, helps in (
        ("list", "show the keys' fingerprints and which is primary"),
        ("install", "add a key, accepted but not yet primary (primary if the file is new)"),
        ("use", "make the key with this fingerprint the primary"),
        ("remove", "remove the key with this fingerprint (not the primary)"),
    ):
        action = actions.add_parser(name, help=helps)
        action.add_argument("--keyring", default="swarm.key", help="the keyring file (default: %(default)s)")
        if name in ("use", "remove"):
            action.add_argument("fingerprint", help="the key's 12-digit fingerprint (swarm keys list)")
        if name == "install":
            action.add_argument("--key-file", required=True, help="a file holding the new key (swarm keygen --out)")
        action.set_defaults(func=cmd_keys)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return int(args.func(args))
    except SwarmError as e:
        print(f"swarm: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
