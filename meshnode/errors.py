"""The meshnode exception tree. The base errors the packages raise on purpose are here;
a layer's own subclasses live beside it (listed below with their module).

::

    MeshError
    ├── DecodeError              bytes from outside did not parse (wire, keys, contacts)
    │   ├── ContactError         a contact string is malformed
    │   ├── DescriptorError      discovery/descriptor.py: a descriptor was refused (.reason)
    │   ├── RpcError             discovery/rpc.py: a DHT message was refused (.reason)
    │   ├── TopicError, ProviderStoreError   discovery/providers.py
    │   └── CellError, OnionError, BuildError routing/cells.py, onion.py, build.py (.reason)
    ├── PathError                routing/path.py: no path satisfies the constraints (.reason)
    ├── LocalProtocolError       this program misused an API (a bug here, not the peer's)
    ├── RemoteProtocolError      a peer sent something well-formed but not allowed
    ├── HandshakeError           a Noise handshake message failed to verify
    ├── IdentityError            a key file is missing, unreadable or malformed
    │   └── IdentityExistsError  `init` refused to overwrite an identity
    ├── ConfigError              a config file or flag has a bad key or value
    └── ControlError             meshnode/control.py: the control API refused or is absent
        └── ControlNotRunningError   no node runs with that home

Remote garbage never escapes a driver: drivers catch DecodeError / RemoteProtocolError /
HandshakeError, count the drop and carry on. Not here: transport-level OSErrors.
"""

from __future__ import annotations


class MeshError(Exception):
    """Root of every error meshnode raises on purpose."""


class DecodeError(MeshError):
    """Bytes or text from outside did not parse."""


class ContactError(DecodeError):
    """A contact string (``HOST:PORT#KEY``) is malformed."""


class LocalProtocolError(MeshError):
    """This program misused an API: a bug on our side."""


class RemoteProtocolError(MeshError):
    """A peer sent something well-formed that the protocol does not allow."""


class HandshakeError(MeshError):
    """A handshake message did not verify (wrong key, tampered, replayed or stale)."""


class IdentityError(MeshError):
    """A key file is missing, unreadable, has loose permissions or is malformed."""


class IdentityExistsError(IdentityError):
    """An identity already exists and ``--force`` was not given."""


class ConfigError(MeshError):
    """A configuration value is wrong. ``key`` names it (dotted path), ``source`` the file."""

    def __init__(self, message: str, *, key: str | None = None, source: str | None = None):
        self.key = key
        self.source = source
        where = ""
        if source and key:
            where = f"{source}: {key}: "
        elif source:
            where = f"{source}: "
        elif key:
            where = f"{key}: "
        super().__init__(f"{where}{message}")
