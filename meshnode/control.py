"""The local control API: a small JSON-over-HTTP server on loopback, and its client.

The running node serves it (:class:`ControlServer`); ``meshnode peers`` / ``lookup`` /
``circuit build`` / ``route`` use it (:func:`control_get`, :func:`control_request`).
Endpoints, JSON shapes and error codes are in docs/control-api.md:

- ``GET /v1/status``               the node's own status (:meth:`ControlBackend.control_status`)
- ``GET /v1/peers?role=&region=&country=``  descriptors in the node's directory
- ``GET /v1/lookup/{node_id}``     a descriptor fetched from the DHT and verified
- ``POST /v1/circuits``            build a circuit (JSON body ``{"hops", "exit", "port"}``)
- ``GET /v1/circuits``             the node's circuits, their hops and health
- ``DELETE /v1/circuits/{id}``     close one of them

Access: every request carries ``Authorization: Bearer <token>``; the token (32 random
bytes, hex) is in ``HOME/control.token`` (mode 0600), so only the node's owner (and root)
can use the API: the file permission *is* the access control. A browser page cannot
read the file, which also defeats DNS rebinding. ``HOME/control.json`` says where the
server listens; both files are written after the server listens and removed when it
stops.

A driver: owns the aiohttp server and client; the only importer of ``aiohttp``. It takes
no decisions about the mesh; the node (a :class:`ControlBackend`) answers. Not here:
the node's composition (node.py), text formatting for people (cli.py).
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import json
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Protocol

import aiohttp
import structlog
from aiohttp import web

from discovery.descriptor import DescriptorRole, SignedDescriptor
from discovery.directory import Directory
from meshnode.contact import format_hostport
from meshnode.errors import DecodeError, LocalProtocolError, MeshError
from meshnode.identity import NODE_ID_BYTES, b32decode, b32encode
from routing.manager import CircuitError, CircuitErrorKind
from routing.onion import MAX_HOPS

__all__ = [
    "CONTROL_FILE",
    "MAX_BODY_BYTES",
    "TOKEN_FILE",
    "ControlBackend",
    "ControlError",
    "ControlNotRunningError",
    "ControlServer",
    "circuit_request",
    "control_get",
    "control_request",
    "descriptor_json",
    "parse_node_id",
    "peer_json",
]

log = structlog.get_logger("meshnode.control")

CONTROL_FILE = "control.json"
TOKEN_FILE = "control.token"  # noqa: S105 - a file name, not a secret
TOKEN_BYTES = 32
MAX_BODY_BYTES = 1024  # only POST /v1/circuits takes a (small) body; bigger: refused unread
PEER_FILTERS = ("role", "region", "country")
_HEX_ID_CHARS = 2 * NODE_ID_BYTES

Clock = Callable[[], float]


class ControlError(MeshError):
    """The control API refused a request or could not be reached.

    ``status`` is the HTTP status when the server answered, else None.
    """

    def __init__(self, message: str, *, status: int | None = None) -> None:
        self.status = status
        super().__init__(message)


class ControlNotRunningError(ControlError):
    """No ``control.json`` in the home: no node with a control API runs there."""


class ControlBackend(Protocol):
    """What the control API asks the node. The node implements it; tests fake it."""

    def control_status(self) -> dict[str, object]:
        """The node's status, as JSON-able values."""
        ...

    def control_directory(self) -> Directory:
        """The current directory snapshot."""
        ...

    async def control_lookup(self, node_id: bytes) -> SignedDescriptor | None:
        """Fetch ``node_id``'s descriptor from the DHT and verify it; None when not found."""
        ...

    async def control_build(
        self, hops: int | None, exit_id: bytes | None, port: int | None
    ) -> dict[str, object]:
        """Build a circuit (defaults: the node's hop count, any exit, any port), probe
        its hops, and describe it; :class:`routing.manager.CircuitError` when it cannot."""
        ...

    def control_circuits(self) -> list[dict[str, object]]:
        """The node's circuits, their hops and health."""
        ...

    def control_destroy(self, circuit_id: int) -> bool:
        """Close a circuit; False when it had already ended; CircuitError if unknown."""
        ...


# --- JSON views -------------------------------------------------------------------------


def peer_json(descriptor: SignedDescriptor, now: float) -> dict[str, object]:
    """The JSON view of one descriptor in ``/v1/peers`` (``now``: Unix seconds)."""
    body = descriptor.body
    return {
        "node_id": b32encode(descriptor.node_id),
        "roles": sorted(role.value for role in body.roles),
        "region": body.region,
        "country": body.country,
        "operator": {"name": body.operator.name, "contact": body.operator.contact},
        "addresses": [format_hostport(host, port) for host, port in body.addresses],
        "link_key": b32encode(body.link_key),
        "version": body.version,
        "bandwidth_bps": body.bandwidth_bps,
        "software": body.software,
        "published_at": body.published_at,
        "expires_at": body.expires_at,
        "age_s": int(now - body.published_at),
        "expires_in_s": int(body.expires_at - now),
    }


def descriptor_json(descriptor: SignedDescriptor, now: float) -> dict[str, object]:
    """Every field of a descriptor (``/v1/lookup``): :func:`peer_json` plus the keys,
    exit policy, stake reference and operator key."""
    body = descriptor.body
    record = peer_json(descriptor, now)
    operator_key = body.operator.operator_key
    record["operator"] = {
        "name": body.operator.name,
        "contact": body.operator.contact,
        "operator_key": b32encode(operator_key) if operator_key is not None else None,
    }
    record["identity_key"] = b32encode(body.identity_key)
    record["onion_key"] = b32encode(body.onion_key)
    next_key = body.next_onion_key
    record["next_onion_key"] = b32encode(next_key) if next_key is not None else None
    record["exit_policy"] = [[lo, hi] for lo, hi in body.exit_policy]
    record["stake_ref"] = body.stake_ref
    return record


CIRCUIT_FIELDS = ("hops", "exit", "port")

# CircuitError.kind -> HTTP status.
CIRCUIT_STATUS: dict[CircuitErrorKind, int] = {
    "bad_request": 400,
    "unknown_exit": 404,
    "unknown_circuit": 404,
    "not_open": 409,
    "failed": 502,
    "no_path": 503,
    "timeout": 504,
}


def circuit_request(document: object) -> tuple[int | None, bytes | None, int | None]:
    """``(hops, exit node id, port)`` from a ``POST /v1/circuits`` body (None: default).

    Raises :class:`DecodeError` with a message for the user for anything else.
    """
    if document is None:
        return None, None, None
    if not isinstance(document, dict):
        raise DecodeError('the body must be a JSON object such as {"hops": 3}')
    unknown = sorted(set(document) - set(CIRCUIT_FIELDS))
    if unknown:
        raise DecodeError(f"unknown field {unknown[0]!r} (known: {', '.join(CIRCUIT_FIELDS)})")
    hops = document.get("hops")
    if hops is not None and (type(hops) is not int or not 1 <= hops <= MAX_HOPS):
        raise DecodeError(f"hops must be an integer from 1 to {MAX_HOPS}")
    exit_text = document.get("exit")
    exit_id = None
    if exit_text is not None:
        if not isinstance(exit_text, str):
            raise DecodeError("exit must be a node id string")
        exit_id = parse_node_id(exit_text)
    port = document.get("port")
    if port is not None and (type(port) is not int or not 1 <= port <= 65535):
        raise DecodeError("port must be an integer from 1 to 65535")
    return hops, exit_id, port


def parse_node_id(text: str) -> bytes:
    """A node id from its base32 form (32 characters) or 40 hex digits.

    Raises :class:`DecodeError` with a message for the user otherwise.
    """
    clean = text.strip()
    if len(clean) == _HEX_ID_CHARS and all(c in "0123456789abcdefABCDEF" for c in clean):
        return bytes.fromhex(clean)
    try:
        return b32decode(clean, length=NODE_ID_BYTES, what="node id")
    except DecodeError as exc:
        raise DecodeError(f"{exc} (expected 32 base32 characters or 40 hex digits)") from None


# --- Server -----------------------------------------------------------------------------


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


class ControlServer:
    """The control API of one node. Start it with :meth:`start`; :meth:`close` stops it."""

    def __init__(
        self, backend: ControlBackend, home: Path, *, token: str, clock: Clock = time.time
    ) -> None:
        self.backend = backend
        self.home = home
        self.url = ""
        self.unauthorized = 0
        """Requests refused for a missing or wrong token (401), since start."""
        self._token = token
        self._clock = clock
        self._runner: web.AppRunner | None = None
        self._written: dict[Path, str] = {}

    @property
    def token_path(self) -> Path:
        return self.home / TOKEN_FILE

    @property
    def control_path(self) -> Path:
        return self.home / CONTROL_FILE

    @classmethod
    async def start(
        cls,
        backend: ControlBackend,
        home: Path,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        allow_remote: bool = False,
        clock: Clock = time.time,
    ) -> ControlServer:
        """Listen on ``host:port`` (port 0: any free port), then write the token and
        ``control.json`` into ``home``. A ``host`` that is not a loopback address is
        refused unless ``allow_remote`` (the token still guards it, but travels in clear).
        """
        if not allow_remote and not _is_loopback(host):
            raise ControlError(
                f"the control API listens on loopback only, not {host!r} (use 127.0.0.1 or ::1)"
            )
        server = cls(backend, home, token=secrets.token_bytes(TOKEN_BYTES).hex(), clock=clock)
        await server._listen(host, port)
        try:
            server._write_files()
        except BaseException:
            await server.close()
            raise
        log.info("control.started", url=server.url)
        return server

    async def _listen(self, host: str, port: int) -> None:
        app = web.Application(
            middlewares=[self._errors_middleware, self._auth_middleware],
            client_max_size=MAX_BODY_BYTES,
        )
        app.router.add_get("/v1/status", self._status)
        app.router.add_get("/v1/peers", self._peers)
        app.router.add_get("/v1/lookup/{node_id}", self._lookup)
        app.router.add_post("/v1/circuits", self._build_circuit)
        app.router.add_get("/v1/circuits", self._circuits)
        app.router.add_delete("/v1/circuits/{circuit_id}", self._destroy_circuit)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
        except OSError as exc:
            await runner.cleanup()
            where = format_hostport(host, port)
            raise ControlError(f"cannot listen on {where}: {exc.strerror or exc}") from None
        self._runner = runner
        bound_host, bound_port = runner.addresses[0][:2]
        if ipaddress.ip_address(bound_host).is_unspecified:  # allow_remote on a wildcard
            bound_host = "::1" if ":" in bound_host else "127.0.0.1"
        self.url = f"http://{format_hostport(bound_host, bound_port)}"

    def _write_files(self) -> None:
        self.home.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = json.dumps({"url": self.url, "pid": os.getpid()}) + "\n"
        for path, text in ((self.token_path, self._token + "\n"), (self.control_path, info)):
            _write_private(path, text)
            self._written[path] = text

    async def close(self) -> None:
        """Stop serving and remove the token and ``control.json``, unless another process
        has replaced them since. Safe to call twice."""
        for path, text in self._written.items():
            with contextlib.suppress(OSError):
                if path.read_text(encoding="utf-8") == text:
                    path.unlink()
        self._written.clear()
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
            log.info("control.stopped", unauthorized=self.unauthorized)

    # --- Middleware -----------------------------------------------------------------------

    @web.middleware
    async def _errors_middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """Every error is JSON ``{"error": ...}``, aiohttp's own (404, 405, 413) too."""
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return _error(exc.status, exc.reason.lower())
        except Exception:
            log.exception("control.handler_failed", path=request.path)
            return _error(500, "internal error (see the node's log)")

    @web.middleware
    async def _auth_middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
            return _error(413, f"request body larger than {MAX_BODY_BYTES} bytes")
        if not self._authorized(request.headers.get("Authorization", "")):
            self.unauthorized += 1
            log.debug("control.unauthorized", path=request.path)
            response = _error(401, f"missing or wrong bearer token (see {self.token_path})")
            response.headers["WWW-Authenticate"] = 'Bearer realm="meshnode"'
            return response
        if request.body_exists:
            await request.read()  # a chunked body: aiohttp stops it at client_max_size (413)
        return await handler(request)

    def _authorized(self, header: str) -> bool:
        scheme, _, presented = header.partition(" ")
        # Compare bytes: compare_digest refuses non-ASCII str, and a header may hold any.
        given = presented.strip().encode("utf-8", "surrogateescape")
        ok = hmac.compare_digest(given, self._token.encode("ascii"))
        return ok and scheme.lower() == "bearer"

    # --- Handlers -------------------------------------------------------------------------

    async def _status(self, request: web.Request) -> web.Response:
        status = dict(self.backend.control_status())
        status.setdefault("control", {"url": self.url, "unauthorized": self.unauthorized})
        return web.json_response(status)

    async def _peers(self, request: web.Request) -> web.Response:
        query = request.query
        unknown = sorted(set(query) - set(PEER_FILTERS))
        if unknown:
            return _error(
                400, f"unknown parameter {unknown[0]!r} (known: {', '.join(PEER_FILTERS)})"
            )
        for name in PEER_FILTERS:
            if len(query.getall(name, [])) > 1:
                return _error(400, f"give {name} at most once")
        role: DescriptorRole | None = None
        if "role" in query:
            try:
                role = DescriptorRole(query["role"].strip().lower())
            except ValueError:
                roles = ", ".join(sorted(r.value for r in DescriptorRole))
                return _error(400, f"role must be one of {roles}, not {query['role']!r}")
        region = _upper(query.get("region"))
        country = _upper(query.get("country"))
        try:
            peers = self.backend.control_directory().nodes(role, region, country)
        except LocalProtocolError as exc:  # a filter no descriptor can match: say so
            return _error(400, str(exc))
        now = self._clock()
        return web.json_response([peer_json(d, now) for d in peers])

    async def _lookup(self, request: web.Request) -> web.Response:
        text = request.match_info["node_id"]
        try:
            node_id = parse_node_id(text)
        except DecodeError as exc:
            return _error(400, str(exc))
        try:
            descriptor = await self.backend.control_lookup(node_id)
        except TimeoutError:
            return _error(504, "the DHT lookup timed out")
        except MeshError as exc:
            return _error(502, f"the DHT lookup failed: {exc}")
        if descriptor is None:
            return _error(404, f"node {b32encode(node_id)} not found in the DHT")
        return web.json_response(descriptor_json(descriptor, self._clock()))

    async def _build_circuit(self, request: web.Request) -> web.Response:
        if request.query:
            return _error(400, "POST /v1/circuits takes no query parameters (use the body)")
        raw = await request.read()
        document: object = None
        if raw.strip():
            try:
                document = json.loads(raw)
            except (UnicodeDecodeError, json.JSONDecodeError):
                return _error(400, "the body is not JSON")
        try:
            hops, exit_id, port = circuit_request(document)
        except DecodeError as exc:
            return _error(400, str(exc))
        try:
            circuit = await self.backend.control_build(hops, exit_id, port)
        except CircuitError as exc:
            return _error(CIRCUIT_STATUS.get(exc.kind, 502), str(exc))
        return web.json_response(circuit, status=201)

    async def _circuits(self, request: web.Request) -> web.Response:
        if request.query:
            return _error(400, "GET /v1/circuits takes no parameters")
        return web.json_response(self.backend.control_circuits())

    async def _destroy_circuit(self, request: web.Request) -> web.Response:
        text = request.match_info["circuit_id"]
        if not (text.isascii() and text.isdigit()) or len(text) > 12:
            return _error(400, f"{text!r} is not a circuit id (a number, see GET /v1/circuits)")
        circuit_id = int(text)
        try:
            closed = self.backend.control_destroy(circuit_id)
        except CircuitError as exc:
            return _error(CIRCUIT_STATUS.get(exc.kind, 502), str(exc))
        return web.json_response({"id": circuit_id, "closed": closed})


def _upper(value: str | None) -> str | None:
    # str.upper() maps some non-ASCII letters to ASCII ones (dotless i -> "I"): only ASCII is
    # uppercased, anything else reaches the directory's check as written and is refused.
    if value is None:
        return None
    value = value.strip()
    return value.upper() if value.isascii() else value


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _write_private(path: Path, text: str) -> None:
    """Replace ``path`` atomically with a new file of mode 0600 holding ``text``.

    The temporary file is created 0600 (never readable by others, not even for a moment)
    in the same directory, then renamed over ``path``.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fd = -1
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
        finally:
            if fd >= 0:
                os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise ControlError(f"cannot write {path}: {exc.strerror or exc}") from None


# --- Client -----------------------------------------------------------------------------


def _read_endpoint(home: Path) -> tuple[str, str]:
    """(url, token) from ``home``'s control.json and control.token."""
    control_path = home / CONTROL_FILE
    token_path = home / TOKEN_FILE
    try:
        info = json.loads(control_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ControlNotRunningError(
            f"no node is running with home {home} ({CONTROL_FILE} not found) "
            "— start one with `meshnode run`"
        ) from None
    except PermissionError:
        raise ControlError(
            f"cannot read {control_path}: permission denied — run as the node's owner"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ControlError(f"cannot read {control_path}: {exc}") from None
    url = info.get("url") if isinstance(info, dict) else None
    if not isinstance(url, str) or not url.startswith("http://"):
        raise ControlError(
            f"{control_path} names no http:// url; remove it if no node is running there"
        )
    try:
        token = token_path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        raise ControlNotRunningError(
            f"no node is running with home {home} ({TOKEN_FILE} not found) "
            "— start one with `meshnode run`"
        ) from None
    except PermissionError:
        raise ControlError(
            f"cannot read the control token ({token_path}): permission denied "
            "— run as the node's owner"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ControlError(f"cannot read the control token ({token_path}): {exc}") from None
    return url.rstrip("/"), token


async def control_get(
    home: Path,
    path: str,
    params: Mapping[str, str] | None = None,
    *,
    timeout: float = 10.0,
) -> object:
    """GET ``path`` (e.g. ``"/v1/peers"``) from the node running with ``home``; the JSON.

    Raises :class:`ControlError` with a message for people: no node running, the token
    unreadable, the node not answering, or the server's own ``error`` text (``status``
    set) when it refused the request.
    """
    return await control_request(home, "GET", path, params, timeout=timeout)


async def control_request(
    home: Path,
    method: str,
    path: str,
    params: Mapping[str, str] | None = None,
    *,
    body: object = None,
    timeout: float = 10.0,
) -> object:
    """``method`` ``path`` on the node running with ``home``, with ``body`` as JSON when
    given; the JSON answer. Errors as :func:`control_get`."""
    url, token = _read_endpoint(home)
    headers = {"Authorization": f"Bearer {token}"}
    data = None
    if body is not None:
        data = json.dumps(body).encode("utf-8")
        headers["Content-Type"] = "application/json"
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session,
            session.request(
                method, url + path, params=dict(params or {}), headers=headers, data=data
            ) as response,
        ):
            raw = await response.read()
            status = response.status
    except aiohttp.ClientConnectorError as exc:
        reason = (
            "connection refused"
            if isinstance(exc.os_error, ConnectionRefusedError)
            else (exc.os_error.strerror or str(exc.os_error)).lower()
        )
        raise ControlError(
            f"the node at {url} did not answer ({reason}): is it still running?"
        ) from None
    except TimeoutError:
        raise ControlError(
            f"the node at {url} did not answer within {timeout:g} s: is it busy or stuck?"
        ) from None
    except aiohttp.ClientError as exc:
        raise ControlError(f"talking to the node at {url} failed: {exc}") from None
    try:
        document: object = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ControlError(
            f"the node at {url} sent a reply that is not JSON (HTTP {status})", status=status
        ) from None
    if status >= 400:
        message = document.get("error") if isinstance(document, dict) else None
        raise ControlError(
            message if isinstance(message, str) else f"the node at {url} answered HTTP {status}",
            status=status,
        )
    return document
