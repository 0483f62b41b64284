"""What a failing test's report shows besides the traceback: the vhost-user message trace and
the tail of each peer's log.

The fixtures record the peers they launch on the test item (:func:`record_peer`); the
plugin installs a :class:`.trace.MessageTrace` around a test that uses them
(:func:`attach_trace`) and, when a phase fails, adds one report section per source
(:func:`failure_sections`).
"""

from __future__ import annotations

from typing import Final

import pytest

from .peers import Peer
from .trace import DEFAULT_MESSAGES, MessageTrace

#: Peers launched for the test, in launch order.
PEERS_KEY: Final = pytest.StashKey[list[Peer]]()
#: The test's vhost-user message trace while it runs.
TRACE_KEY: Final = pytest.StashKey[MessageTrace]()
#: Lines of each peer's log shown on failure.
DEFAULT_LOG_LINES: Final = 40


def record_peer(node: pytest.Item, peer: Peer) -> Peer:
    """Show *peer*'s log tail in *node*'s report if the test fails."""
    peers = node.stash.setdefault(PEERS_KEY, [])
    if peer not in peers:
        peers.append(peer)
    return peer


def attach_trace(node: pytest.Item, messages: int = DEFAULT_MESSAGES) -> MessageTrace:
    """Install a message trace for *node* (idempotent); :func:`detach_trace` removes it."""
    trace = node.stash.get(TRACE_KEY, None)
    if trace is None:
        trace = node.stash[TRACE_KEY] = MessageTrace(messages)
    return trace.install()


def detach_trace(node: pytest.Item) -> None:
    trace = node.stash.get(TRACE_KEY, None)
    if trace is not None:
        trace.uninstall()


def failure_sections(node: pytest.Item, log_lines: int = DEFAULT_LOG_LINES) -> list[tuple[str, str]]:
    """``(title, text)`` report sections: the message trace, then each peer's log tail."""
    sections = []
    trace = node.stash.get(TRACE_KEY, None)
    if trace is not None:
        sections.append((f"vhost-user trace (last {len(trace.records)} of {trace.seen} records)",
                         trace.format_tail()))
    for peer in node.stash.get(PEERS_KEY, []):
        state = "running" if peer.running else f"exit status {peer.returncode}"
        sections.append((f"peer log: {peer.name} ({state}, {peer.log_path}, last {log_lines} lines)",
                         peer.log_tail(log_lines)))
    return sections
