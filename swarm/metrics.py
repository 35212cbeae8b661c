"""Counters of the requests this peer entered into the swarm, and the Prometheus text exposition
of them together with the peer's view of the swarm (ready, term, epoch, members, open sessions,
dropped messages) and where its stage's time goes (queue, passes, results going out). Plain
counters and sums, no client library; it reads the node, never changes it."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from swarm.membership import State

if TYPE_CHECKING:
    from swarm.entry import Timings
    from swarm.node import Node

MAX_LABELS = 256  # stages or hops one counter tracks by name; later ones are summed under "other"


@dataclass
class Metrics:
    """What this peer's requests cost, summed since it started."""

    requests_started: int = 0
    requests_completed: int = 0
    requests_failed: int = 0
    tokens_generated: int = 0
    time_to_first_token_s_sum: float = 0.0
    request_s_sum: float = 0.0
    bytes_sent: int = 0
    compute_s: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    wire_s: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    entry_s: float = 0.0

    def record(self, timings: Timings) -> None:
        """Add a finished request."""
        self.requests_completed += 1
        self.tokens_generated += timings.tokens
        self.time_to_first_token_s_sum += timings.first_token_s or 0.0
        self.request_s_sum += timings.total_s
        self.bytes_sent += timings.bytes_sent
        self.entry_s += timings.entry_s
        for stage, seconds in timings.compute_s.items():
            self.compute_s[_bounded(self.compute_s, stage)] += seconds
        for hop, seconds in timings.wire_s.items():
            self.wire_s[_bounded(self.wire_s, hop)] += seconds

    def render(self, node: Node) -> str:
        """Prometheus text format."""
        lines: list[str] = []

        def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
            lines.append(f"# HELP swarm_{name} {help_}")
            lines.append(f"# TYPE swarm_{name} {kind}")
            lines.extend(f"swarm_{name}{labels} {_number(value)}" for labels, value in samples)

        metric("requests_total", "counter", "Requests entered at this peer, by outcome.", [
            ('{outcome="started"}', self.requests_started),
            ('{outcome="completed"}', self.requests_completed),
            ('{outcome="failed"}', self.requests_failed),
        ])  # fmt: skip
        metric("tokens_generated_total", "counter", "Tokens generated for requests entered here.",
               [("", self.tokens_generated)])  # fmt: skip
        metric("time_to_first_token_seconds_sum", "counter", "Sum of times to first token.",
               [("", self.time_to_first_token_s_sum)])  # fmt: skip
        metric("request_seconds_sum", "counter", "Sum of request durations.", [("", self.request_s_sum)])
        metric("bytes_sent_total", "counter", "Activation bytes sent for requests entered here.",
               [("", self.bytes_sent)])  # fmt: skip
        metric("stage_compute_seconds_total", "counter", "Compute time per stage for requests entered here.",
               [(f'{{stage="{_label(k)}"}}', v) for k, v in sorted(self.compute_s.items())])  # fmt: skip
        metric("hop_wire_seconds_total", "counter", "Time on the wire per hop for requests entered here.",
               [(f'{{hop="{_label(k)}"}}', v) for k, v in sorted(self.wire_s.items())])  # fmt: skip
        metric("entry_seconds_total", "counter", "Time at this peer between a token of a request entered here "
               "coming home and the request's next step going out (a stream's write to its client included).",
               [("", self.entry_s)])  # fmt: skip
        membership = node.membership
        members = list(membership.members.values()) if membership else []
        metric("ready", "gauge", "1 when every stage of the layer map is loaded.", [("", float(node.ready()))])
        metric("term", "gauge", "Election term this peer is at.", [("", node.election.term)])
        metric("layer_map_epoch", "gauge", "Layer-map epoch this peer follows.",
               [("", node.layer_map.epoch if node.layer_map else 0)])  # fmt: skip
        metric("peers", "gauge", "Members by state, this peer included.", [
            ('{state="alive"}', 1 + sum(m.state is State.ALIVE for m in members)),
            ('{state="suspect"}', sum(m.state is State.SUSPECT for m in members)),
            ('{state="dead"}', sum(m.state is State.DEAD for m in members)),
        ])  # fmt: skip
        metric("stage_sessions", "gauge", "Sessions open on this peer's stage.", [("", node.service.sessions())])
        metric("stage_sessions_dropped_total", "counter", "Sessions dropped with an abandoned layer map or a "
               "dead entry peer.", [("", node.service.dropped)])  # fmt: skip
        metric("stage_forward_passes_total", "counter", "Forward passes this peer's stage ran, each over one or "
               "more sessions' steps.", [("", node.service.batches.passes)])  # fmt: skip
        metric("stage_steps_total", "counter", "Session steps this peer's stage ran (over forward passes: the "
               "mean batch).", [("", node.service.batches.steps)])  # fmt: skip
        service = node.service
        metric("stage_queued_seconds_total", "counter", "Seconds the steps this peer's stage ran waited between "
               "their frame's arrival and their forward pass, summed over steps.",
               [("", service.batches.queued_s)])  # fmt: skip
        metric("stage_pass_seconds_total", "counter", "Wall seconds of this peer's forward passes as its event loop "
               "sees them: the compute and the hand-offs to and from the compute thread.",
               [("", service.batches.pass_s)])  # fmt: skip
        metric("stage_frames_out_total", "counter", "Frames of results this peer's stage sent on a link: hidden "
               "states onward, or tokens home.", [("", service.frames_out)])  # fmt: skip
        metric("stage_send_seconds_total", "counter", "Seconds from a forward pass's end to its frame of results "
               "going out on a link, summed over frames.", [("", service.send_s)])  # fmt: skip
        metric("frames_sent_total", "counter", "Data-plane frames this peer sent over its links, by kind.",
               [(f'{{kind="{_label(k)}"}}', v) for k, v in sorted(node.transport.frames_sent.items())])  # fmt: skip
        metric("dropped_messages_total", "counter", "Peer messages dropped, by reason.",
               [(f'{{reason="{_label(k)}"}}', v) for k, v in sorted(node.drops.items())])  # fmt: skip
        return "\n".join(lines) + "\n"


def _bounded(table: dict[str, float], name: str) -> str:
    """`name`, or "other" once the table holds MAX_LABELS names (peers come and go over months)."""
    return name if name in table or len(table) < MAX_LABELS - 1 else "other"


def _number(value: float) -> str:
    """A sample value at full precision (Prometheus reads any float literal)."""
    return str(value) if isinstance(value, int) else repr(float(value))


def _label(value: str) -> str:
    """A label value escaped as the text format requires."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
