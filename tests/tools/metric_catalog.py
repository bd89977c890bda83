"""Every metric the agent and the gateway export, with its type, labels and help text, read
from their own renderers — so the alert rules, the dashboard and the metrics reference in
README.md can be checked against the code rather than against a list someone keeps by hand.

The metrics are rendered by hand (the loop's by `meshgress.runtime.LoopMetrics`, the
rest by `nodeagent.metrics` and `gateway.metrics`); some appear only when there is
something to count (a slot, a peer, an error), so the renderers are fed one of
everything. `exported_metrics` (series, for checking queries) and `metric_families` (one
entry per metric as documented, for the reference) are purely computational.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gateway.leases import LeaseMetrics
from gateway.metrics import GatewayMetrics
from gateway.metrics import SlotSample as GatewaySlot
from meshgress.prometheus import Exposition
from meshgress.runtime import LoopMetrics
from nodeagent.metrics import AgentMetrics
from nodeagent.metrics import SlotSample as AgentSlot
from wireguard.model import PeerStats

_TYPE_LINE = re.compile(r"^# TYPE (\S+) (\S+)$", re.MULTILINE)
_HELP_LINE = re.compile(r"^# HELP (\S+) (.*)$", re.MULTILINE)
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? \S+$", re.MULTILINE)
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="(?:[^"\\]|\\.)*"')

_KEY = "xTIhkvADN8fMOMVlYZ0ub2SYQfRfJ1Sog4z6UmKHv0c="


def _loop_page(prefix: str, errors_metric: str) -> Exposition:
    loop = LoopMetrics(prefix, errors_metric)
    loop.observe(0.02, ok=False)
    loop.count_error("wireguard")
    loop.count_error("nftables", permanent=True)
    loop.rejected_objects = lambda: {"EgressPolicy": 1}
    page = Exposition()
    loop.render(page)
    return page


def _agent_text() -> str:
    page = _loop_page("meshgress_", "meshgress_reconcile_errors_total")
    metrics = AgentMetrics(peers_expected=1, started_at=1.0,
                           skipped_nodes={"node9": "no public key published yet"},
                           dataplane_reads={"wireguard": 1})
    metrics.render(
        page, counters={"leak_out": (1, 60), "spoof_in": (1, 60)},
        peer_stats=(PeerStats(_KEY, rx_bytes=1, tx_bytes=1, last_handshake_sec=1),),
        peer_names={_KEY: "node2"}, now=100.0,
        slots=[AgentSlot(gateway="egw", index=0, healthy=True, probes_sent=1,
                         probes_answered=1, failovers=0, flows=1, tx_bytes=1, rx_bytes=1)],
        selected_pods={"payments": 1}, policy_flows={"payments": 1})
    return page.render()


def _gateway_text() -> str:
    page = _loop_page("meshgress_gateway_", "meshgress_gateway_errors_total")
    GatewayMetrics(LeaseMetrics(acquisitions=1)).render(
        page, slots=[GatewaySlot("egw", 0, "192.0.2.50", "aaaa0000", held=True, ready=True)],
        counters={})
    return page.render()


@dataclass(frozen=True)
class ExportedMetric:
    """One series name as Prometheus stores it: its family's type and its own labels
    (without the target labels a scrape adds: job, instance, ...)."""

    kind: str
    labels: frozenset[str]


def _catalogue(text: str) -> dict[str, ExportedMetric]:
    """Series name -> type and labels, histograms expanded into the series they expose;
    every family must have samples here (else nothing could be checked against it)."""
    types = dict(_TYPE_LINE.findall(text))
    labels: dict[str, set[str]] = {}
    for name, inner in _SAMPLE.findall(text):
        labels.setdefault(name, set()).update(_LABEL.findall(inner))
    out: dict[str, ExportedMetric] = {}
    for family, kind in types.items():
        names = ([f"{family}_bucket", f"{family}_sum", f"{family}_count"]
                 if kind == "histogram" else [family])
        for name in names:
            if name not in labels:
                raise AssertionError(f"{name} has no sample in the rendered text: feed the "
                                     "renderer one of what it counts")
            out[name] = ExportedMetric(kind, frozenset(labels[name]))
    return out


def sample_series() -> list[tuple[str, str, float]]:
    """Every series of one agent's and one gateway's scrape, fed one of everything:
    (name, the text between the braces, value), with the scrape's job and instance
    labels added as Prometheus would (jobs as the alert rules expect them)."""
    out = []
    for text, target in ((_agent_text(), 'job="meshgress-agent",instance="192.0.2.11:9820"'),
                         (_gateway_text(),
                          'job="meshgress-gateway",instance="192.0.2.101:9821"')):
        for line in text.splitlines():
            if line.startswith("#"):
                continue
            match = _SAMPLE.match(line)
            assert match, line
            name, inner = match.group(1), match.group(2)
            out.append((name, ",".join(filter(None, (inner, target))),
                        float(line.rsplit(" ", 1)[1])))
    return out


def agent_metrics() -> dict[str, ExportedMetric]:
    """The agent's series (port 9820)."""
    return _catalogue(_agent_text())


def gateway_metrics() -> dict[str, ExportedMetric]:
    """The gateway's series (port 9821)."""
    return _catalogue(_gateway_text())


def exported_metrics() -> dict[str, ExportedMetric]:
    """Both, by name: the names do not overlap (the gateway's start meshgress_gateway_)."""
    agent, gateway = agent_metrics(), gateway_metrics()
    assert not set(agent) & set(gateway)
    return {**agent, **gateway}


AGENT = "agent"
GATEWAY = "gateway"


@dataclass(frozen=True)
class MetricFamily:
    """One metric as its exporter declares it: what `# HELP` and `# TYPE` say, and the
    labels its samples carry (a histogram's `le` apart: `buckets` holds its bounds)."""

    name: str
    kind: str
    help: str
    labels: tuple[str, ...]
    buckets: tuple[str, ...] = ()


def _unescape_help(text: str) -> str:
    """A HELP text as written: the exposition format escapes backslash and newline."""
    return re.sub(r"\\\\|\\n", lambda m: "\n" if m.group(0) == "\\n" else "\\", text)


def _families(text: str) -> tuple[MetricFamily, ...]:
    """The families of one page, in the order the exporter renders them; each must have a
    HELP line and samples (else the reference could not say what it is)."""
    types = dict(_TYPE_LINE.findall(text))
    helps = {name: _unescape_help(help_text) for name, help_text in _HELP_LINE.findall(text)}
    samples: dict[str, list[str]] = {}
    for name, inner in _SAMPLE.findall(text):
        samples.setdefault(name, []).append(inner)
    out = []
    for family, kind in types.items():
        if family not in helps:
            raise AssertionError(f"{family} has no HELP line")
        series = [f"{family}_bucket", f"{family}_sum", f"{family}_count"] \
            if kind == "histogram" else [family]
        if not all(name in samples for name in series):
            raise AssertionError(f"{family} has no sample in the rendered text: feed the "
                                 "renderer one of what it counts")
        labels = {label for name in series for inner in samples[name]
                  for label in _LABEL.findall(inner)} - {"le"}
        buckets = tuple(
            bound for inner in samples.get(f"{family}_bucket", [])
            for bound in re.findall(r'le="([^"]*)"', inner) if bound != "+Inf")
        out.append(MetricFamily(family, kind, helps[family], tuple(sorted(labels)), buckets))
    return tuple(out)


def metric_families() -> dict[str, tuple[MetricFamily, ...]]:
    """Process ("agent", "gateway") -> the metrics it exports, in its page's order."""
    return {AGENT: _families(_agent_text()), GATEWAY: _families(_gateway_text())}
