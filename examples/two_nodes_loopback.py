"""Embedding the link layer: two endpoints in one program exchange a frame.

Run: .venv/bin/python examples/two_nodes_loopback.py
"""

import asyncio

from meshnode.identity import Identity
from meshnode.link.udp import LinkService
from meshnode.log import configure_logging

KIND = 0x10


async def main() -> None:
    configure_logging(level="warning")
    alice_id, bob_id = Identity.generate(), Identity.generate()
    alice = await LinkService.open(alice_id, ("127.10.0.1", 0))
    bob = await LinkService.open(bob_id, ("127.11.0.1", 0))
    got: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
    bob.register(KIND, lambda ev: got.done() or got.set_result(ev.payload))
    alice.register(KIND, lambda ev: None)
    try:
        await alice.connect(bob_id.link_public, bob.local_addr, timeout=5)
        alice.send(bob_id.link_public, KIND, b"hello, bob")
        print("bob got:", await asyncio.wait_for(got, 5))
        print("rtt ms:", round(await alice.ping(bob_id.link_public) * 1000, 3))
    finally:
        alice.close()
        bob.close()


if __name__ == "__main__":
    asyncio.run(main())
