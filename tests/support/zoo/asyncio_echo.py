"""An asyncio echo server speaking the lab.apps protocol (8-byte length, then the bytes, echoed).

``python asyncio_echo.py HOST PORT``: asyncio's event loop reads non-blocking sockets after
epoll says they are readable, the style sockops accelerates.
"""

from __future__ import annotations

import asyncio
import struct
import sys


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readexactly(8)
            (remaining,) = struct.unpack("!Q", head)
            while remaining:
                data = await reader.read(min(remaining, 256 * 1024))
                if not data:
                    return
                writer.write(data)
                await writer.drain()
                remaining -= len(data)
    except asyncio.IncompleteReadError:
        pass
    finally:
        writer.close()


async def main() -> None:
    server = await asyncio.start_server(handle, sys.argv[1], int(sys.argv[2]))
    print("listening", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
