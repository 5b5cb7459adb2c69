"""Noise IK links over UDP: a sans-IO endpoint (endpoint.py) and its asyncio driver (udp.py)."""
