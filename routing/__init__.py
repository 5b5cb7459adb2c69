"""Routing layer: cells, onion layers, circuits, path selection, health."""
