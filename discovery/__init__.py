"""Discovery layer: Kademlia DHT over meshnode links, signed node descriptors, directory."""
