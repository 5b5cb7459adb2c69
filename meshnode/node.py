"""Node: the composition root. Builds the layers from a NodeConfig, starts and stops them.

Today it brings the link layer up on the node's one UDP socket, handshakes with its
bootstrap contacts, answers handshakes and pings, and reports link counters. Discovery
and routing plug in here as they land (issues 4 and 5).

Not here: protocol logic (the layers' sans-IO cores), argument parsing (cli.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable

import structlog

from meshnode.config import NodeConfig
from meshnode.contact import Contact, format_hostport
from meshnode.identity import Identity, b32encode
from meshnode.link.events import LinkEvent, PeerRoamed, SessionClosed, SessionEstablished
from meshnode.link.udp import LinkService, LinkUnreachableError

log = structlog.get_logger("meshnode.node")

BOOTSTRAP_TIMEOUT_S = 10.0


class Node:
    """One meshnode process: the layers, wired together."""

    def __init__(self, config: NodeConfig, identity: Identity) -> None:
        self.config = config
        self.identity = identity
        self.link: LinkService | None = None
        self._stop = asyncio.Event()

    async def start(self) -> None:
        self.link = await LinkService.open(
            self.identity, self.config.listen, config=self.config.link
        )
        self.link.add_listener(self._on_link_event)

    @property
    def contact(self) -> Contact:
        """Our contact: node.advertise, else the bound listen address (loopback for wildcards)."""
        address, _ = self.config.contact_address(bound=self.link_addr())
        return Contact(host=address[0], port=address[1], static_key=self.identity.link_public)

    def stop(self) -> None:
        self._stop.set()

    async def run(self, *, on_ready: Callable[[Node], None] | None = None) -> None:
        """Start, bootstrap, serve until :meth:`stop` (or SIGINT/SIGTERM), then close."""
        await self.start()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.stop)
        try:
            log.info(
                "node.started",
                node_id=b32encode(self.identity.node_id),
                role=self.config.role.value,
                listen=format_hostport(*self.link_addr()),
                contact=str(self.contact),
            )
            if on_ready is not None:
                on_ready(self)
            await self._bootstrap()
            await self._stop.wait()
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.remove_signal_handler(sig)
            self.close()

    def link_addr(self) -> tuple[str, int]:
        if self.link is None:
            return self.config.listen
        return self.link.local_addr

    def stats(self) -> dict[str, int]:
        """Link counters: traffic, handshakes, and every drop with its reason."""
        if self.link is None:
            return {}
        return dict(sorted(self.link.endpoint.stats.items()))

    def close(self) -> None:
        if self.link is not None:
            log.info("node.stopped", **{k.replace(".", "_"): v for k, v in self.stats().items()})
            self.link.close()

    async def _bootstrap(self) -> None:
        link = self.link
        if link is None or not self.config.bootstrap:
            return

        async def one(contact: Contact) -> None:
            try:
                addr = await link.resolve(contact.host, contact.port)
                await link.connect(contact.static_key, addr, timeout=BOOTSTRAP_TIMEOUT_S)
            except LinkUnreachableError as exc:
                log.warning("node.bootstrap_failed", contact=str(contact), error=str(exc))

        await asyncio.gather(*(one(c) for c in self.config.bootstrap))

    def _on_link_event(self, event: LinkEvent) -> None:
        if isinstance(event, SessionEstablished) and not event.rekey:
            # Peer addresses are personal data on a relay: info logs carry the node id only.
            log.info(
                "link.peer_connected", node_id=b32encode(event.node_id), initiator=event.initiator
            )
            log.debug(
                "link.peer_address",
                node_id=b32encode(event.node_id),
                addr=format_hostport(*event.addr),
            )
        elif isinstance(event, SessionClosed):
            log.info("link.peer_closed", peer=b32encode(event.peer)[:12], reason=event.reason)
        elif isinstance(event, PeerRoamed):
            log.info("link.peer_roamed", peer=b32encode(event.peer)[:12])
