"""Node: the composition root. Builds the layers from a NodeConfig, starts and stops them.

It brings the link layer up on the node's one UDP socket, runs the DHT over it (join
from saved contacts and bootstrap contacts, publish our descriptor if we relay or exit,
then a discovery round every ``dht.refresh_interval_s``: provider lookups for relays and
exits plus a random walk), keeps every verified descriptor it learns in a cache that
the directory view is built from, persists the routing table and caches in the state
directory, and serves the local control API.

Routing: every node runs a :class:`~routing.manager.CircuitManager` (started after the
DHT) for its own circuits; relays and exits also hold onion keys
(:class:`~routing.onionkeys.OnionKeyring`, saved in ``state/onion-keys.json``, mode
0600, rotated on its timer with the descriptor republished after each rotation) and
relay other nodes' circuits. Entry guards, relay health and the learned build timeout
are saved in the state directory too.

Not here: protocol logic (the layers' sans-IO cores), argument parsing (cli.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import random
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from discovery.descriptor import (
    DescriptorRole,
    NodeDescriptor,
    Operator,
    SignedDescriptor,
    sign,
)
from discovery.dht import DhtNode
from discovery.directory import Directory
from discovery.providers import ProviderStore, Topic
from discovery.rpc import DhtContact
from discovery.store import DescriptorStore, descriptor_key
from discovery.transport import LinkAddress, LinkTransport
from meshnode import __version__, crypto
from meshnode.config import NodeConfig, Role
from meshnode.contact import Contact, format_hostport
from meshnode.control import ControlServer
from meshnode.errors import DecodeError
from meshnode.identity import Identity, NodeId, b32encode
from meshnode.link.events import LinkEvent, PeerRoamed, SessionClosed, SessionEstablished
from meshnode.link.udp import LinkService, LinkUnreachableError
from routing.health import BuildTimeout, HealthBook
from routing.manager import CircuitError, CircuitManager
from routing.onionkeys import KEYRING_FORMAT, OnionKeyring
from routing.path import GuardSet

log = structlog.get_logger("meshnode.node")

DESCRIPTOR_LIFETIME_S = 3 * 3600  # discovery.constants.DESCRIPTOR_LIFETIME_S, the most allowed
# Until the exit policy lands (issue 6), an exit advertises every port but SMTP.
DEFAULT_EXIT_POLICY = ((1, 24), (26, 65535))

STATE_FILES = {
    "dht": "dht.json",  # routing table contacts
    "cache": "descriptors.json",  # every verified descriptor we learned (the directory)
    "store": "dht-store.json",  # records we hold for the DHT
    "providers": "providers.json",  # provider sets we hold for the DHT
    "onion": "onion-keys.json",  # onion keys (private): relays and exits
    "guards": "guards.json",  # our entry guards
    "health": "relay-health.json",  # relays' build and probe record, as we measured it
    "build_timeout": "build-timeout.json",  # observed build times (the learned timeout)
}
KEYRING_CHECK_MAX_S = 3600.0  # the rotation task looks at the keyring at least this often
SHUTDOWN_FLUSH_S = 1.0  # on shutdown, the longest we wait for queued DESTROYs to leave


class Node:
    """One meshnode process: the layers, wired together."""

    def __init__(self, config: NodeConfig, identity: Identity) -> None:
        self.config = config
        self.identity = identity
        self.link: LinkService | None = None
        self.dht: DhtNode | None = None
        self.control: ControlServer | None = None
        self.descriptor: SignedDescriptor | None = None
        self.keyring: OnionKeyring | None = None
        self.circuits: CircuitManager | None = None
        self.cache = DescriptorStore()
        self._tasks: set[asyncio.Task[None]] = set()
        self._joined = asyncio.Event()
        self._stop = asyncio.Event()

    async def start(self) -> None:
        self.link = await LinkService.open(
            self.identity, self.config.listen, config=self.config.link
        )
        self.link.add_listener(self._on_link_event)
        state = self.config.state_dir
        state.mkdir(mode=0o700, parents=True, exist_ok=True)
        now = time.time()
        store = self._load(
            "store", lambda text: DescriptorStore.from_json(text, now=now), DescriptorStore
        )
        providers = self._load(
            "providers", lambda text: ProviderStore.from_json(text, now=now), ProviderStore
        )
        self.cache = self._load(
            "cache", lambda text: DescriptorStore.from_json(text, now=now), DescriptorStore
        )
        self.dht = DhtNode(
            self.identity.node_id,
            self.identity.link_public,
            LinkTransport(self.link),
            config=self.config.dht,
            store=store,
            providers=providers,
            on_descriptor=self._learn,
        )
        if self._publishes():
            self.keyring = self._load_keyring(now)
        self.circuits = CircuitManager(
            self.link,
            node_id=self.identity.node_id,
            directory=self.control_directory,
            keyring=self.keyring,
            config=self.config.circuits,
            guards=self._load("guards", GuardSet.from_json, GuardSet),
            health=self._load("health", HealthBook.from_json, HealthBook),
            build_timeout=self._load("build_timeout", BuildTimeout.from_json, BuildTimeout),
        )
        self.circuits.start()
        if self.config.control.enabled:
            host, port = self.config.control.listen
            self.control = await ControlServer.start(self, self.config.home, host=host, port=port)

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
            self._spawn(self._discovery())
            if self.keyring is not None:
                self._spawn(self._rotate_onion_keys())
            await self._stop.wait()
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.remove_signal_handler(sig)
            await self.aclose()

    def link_addr(self) -> tuple[str, int]:
        if self.link is None:
            return self.config.listen
        return self.link.local_addr

    def stats(self) -> dict[str, int]:
        """Counters of every layer: link traffic, handshakes, DHT RPCs, stores, and every
        drop with its reason."""
        counters: dict[str, int] = {}
        if self.link is not None:
            counters.update(self.link.endpoint.stats)
        if self.dht is not None:
            counters.update(self.dht.stats)
            counters.update(self.dht.store.stats)
            counters.update(self.dht.providers.stats)
        if self.circuits is not None:
            counters.update(self.circuits.stats)
        return dict(sorted(counters.items()))

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.control is not None:
            await self.control.close()
            self.control = None
        if self.circuits is not None:
            await self._close_circuits(self.circuits)
        self.close()

    async def _close_circuits(self, circuits: CircuitManager) -> None:
        """Tell the neighbours before the link goes (CircuitManager.close destroys every
        circuit we relay or built), then let the link's send queue drain."""
        await circuits.close()
        link = self.link
        if link is None:
            return
        # link.send hands datagrams to the kernel at once unless its buffer is full; what
        # waits in the link's queue would be dropped by link.close(): give it a moment.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SHUTDOWN_FLUSH_S
        while link.get_write_buffer_size() and loop.time() < deadline:
            await asyncio.sleep(0.01)

    def close(self) -> None:
        if self.dht is not None:
            self._save_state()
            self.dht.close()
        if self.link is not None:
            log.info("node.stopped", **{k.replace(".", "_"): v for k, v in self.stats().items()})
            self.link.close()

    # --- discovery ------------------------------------------------------------------------

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("node.task_failed", error=repr(task.exception()))

    async def _discovery(self) -> None:
        """Join, then publish (relays and exits) and discover, round after round."""
        interval = self.config.dht.refresh_interval_s
        next_publish = 0.0
        while True:
            if not self.dht or not self.dht.contacts():
                await self._join()
            if self._publishes() and time.time() >= next_publish:
                await self._publish()
                next_publish = time.time() + self.config.dht.republish_s
            await self._discover_round()
            self._save_state()
            await asyncio.sleep(interval * random.uniform(0.9, 1.1))  # noqa: S311 (jitter)

    async def _join(self) -> None:
        dht, link = self.dht, self.link
        assert dht is not None and link is not None
        saved = self._saved_contacts()
        if saved:
            result = await dht.rejoin(saved)
            log.info(
                "dht.rejoined", saved=len(saved), table=len(dht.contacts()), rounds=result.rounds
            )
        addresses = []
        for contact in self.config.bootstrap:
            try:
                host, port = await link.resolve(contact.host, contact.port)
            except LinkUnreachableError as exc:
                log.warning("node.bootstrap_failed", contact=str(contact), error=str(exc))
                continue
            addresses.append(LinkAddress(host, port, contact.static_key))
        if addresses and len(dht.contacts()) < dht.config.ksize:
            await dht.bootstrap(addresses)
        table = len(dht.contacts())
        if table:
            log.info("dht.joined", table=table)
            self._joined.set()
        elif addresses or saved:
            log.warning("dht.join_failed", bootstrap=len(addresses), saved=len(saved))

    async def _discover_round(self) -> None:
        dht = self.dht
        assert dht is not None
        before = len(self.cache)
        for role in (DescriptorRole.RELAY, DescriptorRole.EXIT):
            await dht.find_providers(Topic(role=role))
        now = time.time()
        await dht.random_walk(
            known=lambda node_id: self.cache.get(descriptor_key(node_id), now=now) is not None
        )
        await dht.refresh()
        log.info("dht.discovered", known=len(self.cache), new=len(self.cache) - before)

    def _publishes(self) -> bool:
        return self.config.role in (Role.RELAY, Role.EXIT)

    async def _publish(self) -> None:
        dht = self.dht
        assert dht is not None
        descriptor = self._make_descriptor(time.time())
        if descriptor is None:
            return
        self.descriptor = descriptor
        self._learn(descriptor)
        acks = await dht.publish(descriptor)
        log.info("dht.published", version=descriptor.body.version, acks=acks)

    def _make_descriptor(self, now: float) -> SignedDescriptor | None:
        address, _ = self.config.contact_address(bound=self.link_addr())
        try:
            ipaddress.ip_address(address[0])
        except ValueError:
            log.error("dht.not_published", reason=f"contact host {address[0]!r} is not an IP")
            return None
        roles = {DescriptorRole.RELAY}
        if self.config.role is Role.EXIT:
            roles.add(DescriptorRole.EXIT)
        onion, next_onion = self._onion_keys()
        published = int(now)
        last = self.descriptor.body.version if self.descriptor is not None else 0
        body = NodeDescriptor(
            version=max(published, last + 1),
            identity_key=self.identity.identity_public,
            link_key=self.identity.link_public,
            onion_key=onion,
            next_onion_key=next_onion,
            addresses=((ipaddress.ip_address(address[0]).compressed, address[1]),),
            roles=frozenset(roles),
            exit_policy=DEFAULT_EXIT_POLICY if self.config.role is Role.EXIT else (),
            region=self.config.region,
            country=self.config.country,
            operator=Operator(name=self.config.operator, contact=self.config.operator_contact),
            bandwidth_bps=self.config.bandwidth_bps,
            software=f"meshnode/{__version__}",
            published_at=published,
            expires_at=published + DESCRIPTOR_LIFETIME_S,
        )
        return sign(body, self.identity)

    def _onion_keys(self) -> tuple[bytes, bytes]:
        """Current and next onion public keys, for the descriptor."""
        if self.keyring is None:
            self.keyring = self._load_keyring(time.time())
        return self.keyring.publics()

    def _load_keyring(self, now: float) -> OnionKeyring:
        """The onion keys from the state dir; new ones (saved at once) when there are none.

        A file from before rotation existed (``{"current": HEX, "next": HEX}``) is taken
        over with its two keys, so the descriptor's onion keys do not change.
        """
        path = self._path("onion")
        try:
            text = path.read_text()
        except FileNotFoundError:
            text = None
        except OSError as exc:
            log.warning("node.state_unreadable", file=str(path), error=str(exc))
            text = None
        keyring = None
        if text is not None:
            try:
                keyring = OnionKeyring.from_json(_upgrade_onion_keys(text, now))
            except DecodeError as exc:
                log.warning("node.onion_keys_replaced", file=str(path), error=str(exc))
        if keyring is None:
            keyring = OnionKeyring.generate(now=now, random_bytes=crypto.random_bytes)
        self._save_keyring(keyring)
        return keyring

    def _save_keyring(self, keyring: OnionKeyring) -> None:
        try:
            _write_private(self._path("onion"), keyring.to_json())
        except OSError as exc:
            log.warning("node.state_not_saved", file=str(self._path("onion")), error=str(exc))

    async def _rotate_onion_keys(self) -> None:
        """Rotate the onion keys when due (and drop expired ones); after a rotation, save
        them and republish the descriptor with the new keys."""
        keyring = self.keyring
        assert keyring is not None
        while True:
            delay = min(max(keyring.get_timer() - time.time(), 0.0), KEYRING_CHECK_MAX_S)
            await asyncio.sleep(delay)
            rotated = keyring.handle_timer(time.time(), crypto.random_bytes)
            self._save_keyring(keyring)
            if rotated:
                log.info("routing.onion_keys_rotated", onion_key=b32encode(keyring.publics()[0]))
                if self.dht is not None and self.dht.contacts():
                    await self._publish()

    def _learn(self, descriptor: SignedDescriptor) -> None:
        """Keep a verified descriptor in the cache the directory is built from."""
        self.cache.put(descriptor_key(descriptor.node_id), descriptor.encode(), now=time.time())

    # --- state ----------------------------------------------------------------------------

    def _path(self, name: str) -> Path:
        return self.config.state_dir / STATE_FILES[name]

    def _load(self, name: str, parse: Callable[[str], Any], empty: Callable[[], Any]) -> Any:
        path = self._path(name)
        try:
            return parse(path.read_text())
        except FileNotFoundError:
            return empty()
        except (OSError, DecodeError, ValueError) as exc:
            log.warning("node.state_unreadable", file=str(path), error=str(exc))
            return empty()

    def _saved_contacts(self) -> list[DhtContact]:
        try:
            return DhtNode.contacts_from_json(self._path("dht").read_text())
        except FileNotFoundError:
            return []
        except (OSError, DecodeError) as exc:
            log.warning("node.state_unreadable", file=str(self._path("dht")), error=str(exc))
            return []

    def _save_state(self) -> None:
        dht = self.dht
        if dht is None:
            return
        try:
            if dht.contacts():  # never overwrite a good table with an empty one
                _write_private(self._path("dht"), dht.state_json())
            _write_private(self._path("cache"), self.cache.to_json())
            _write_private(self._path("store"), dht.store.to_json())
            _write_private(self._path("providers"), dht.providers.to_json())
            circuits = self.circuits
            if circuits is not None:
                _write_private(self._path("guards"), circuits.guards.to_json())
                _write_private(self._path("health"), circuits.health.to_json())
                _write_private(self._path("build_timeout"), circuits.build_timeout.to_json())
        except OSError as exc:
            log.warning("node.state_not_saved", error=str(exc))

    # --- control API ----------------------------------------------------------------------

    def known_descriptors(self, now: float) -> list[SignedDescriptor]:
        """Every current verified descriptor we know, newest version per node."""
        best: dict[bytes, SignedDescriptor] = {}
        sources = [self.cache.descriptors(now)]
        if self.dht is not None:
            sources.append(self.dht.store.descriptors(now))
            sources.append(self.dht.providers.descriptors(now))
        for source in sources:
            for d in source:
                old = best.get(d.node_id)
                if old is None or d.body.version > old.body.version:
                    best[d.node_id] = d
        return list(best.values())

    def control_status(self) -> dict[str, object]:
        dht = self.dht
        return {
            "node_id": b32encode(self.identity.node_id),
            "contact": str(self.contact),
            "role": self.config.role.value,
            "region": self.config.region,
            "country": self.config.country,
            "joined": self._joined.is_set(),
            "published_version": self.descriptor.body.version if self.descriptor else None,
            "routing_table": len(dht.contacts()) if dht else 0,
            "known_descriptors": len(self.known_descriptors(time.time())),
            "counters": self.stats(),
        }

    def control_directory(self) -> Directory:
        now = time.time()
        return Directory(self.known_descriptors(now), now=now)

    async def control_lookup(self, node_id: bytes) -> SignedDescriptor | None:
        if self.dht is None:
            return None
        return await self.dht.get_descriptor(node_id)

    async def control_build(
        self, hops: int | None, exit_id: bytes | None, port: int | None
    ) -> dict[str, object]:
        """Build a circuit, probe its hops three times, and describe it (JSON-able).

        Raises :class:`routing.manager.CircuitError` when no circuit can be built."""
        circuits = self._circuit_manager()
        info = await circuits.build(
            hops=hops, exit_node_id=None if exit_id is None else NodeId(exit_id), port=port
        )
        with contextlib.suppress(CircuitError):  # it may fail between build and probes
            await circuits.probe_all(info.id, rounds=3)
            info = circuits.circuit(info.id)
        return info.to_json(time.time())

    def control_circuits(self) -> list[dict[str, object]]:
        """Our circuits with their hops and health (JSON-able)."""
        if self.circuits is None:
            return []
        now = time.time()
        return [info.to_json(now) for info in self.circuits.circuits()]

    def control_destroy(self, circuit_id: int) -> bool:
        """Close circuit ``circuit_id``; False when it had already ended. Raises
        :class:`routing.manager.CircuitError` (``unknown_circuit``) for an unknown id."""
        return self._circuit_manager().destroy(circuit_id)

    def _circuit_manager(self) -> CircuitManager:
        if self.circuits is None:
            raise CircuitError("failed", "the node's circuit manager is not running")
        return self.circuits

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


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically, readable by the owner only."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _upgrade_onion_keys(text: str, now: float) -> str:
    """The keyring JSON for ``text``; a pre-rotation file (two private keys in hex) is
    converted, its keys made current and next as of ``now``. Other text is returned as
    it is (OnionKeyring.from_json judges it)."""
    try:
        data = json.loads(text)
    except ValueError:
        return text
    if not isinstance(data, dict) or "format" in data or set(data) != {"current", "next"}:
        return text
    entries = {}
    for name in ("current", "next"):
        value = data[name]
        try:
            private = bytes.fromhex(value) if isinstance(value, str) else b""
        except ValueError:
            return text
        if len(private) != crypto.X25519_KEY_BYTES:
            return text
        public = crypto.x25519_public_from_private(private)
        entries[name] = {"private": private.hex(), "public": public.hex(), "since": float(now)}
    return json.dumps({"format": KEYRING_FORMAT, **entries, "retired": []})
