"""meshnode: a decentralized, onion-routed mesh VPN. Imports nothing (see docs/architecture.md)."""

__version__ = "0.1.0"
