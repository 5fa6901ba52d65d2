"""A stand-in for a CARLA server's rpc port: msgpack-rpc over TCP, answering only ``version``.

What the real client sends and expects (captured from ``carla==0.9.16``'s
``carla.Client(host, port).get_server_version()``; every new client starts at msgid 1)::

    request   [0, msgid, "version", [[False]]]      14 bytes for msgid < 128
    response  [1, msgid, nil, [[1, "0.9.16"]]]       CARLA wraps results in Response<T>, a one-field
                                                     array holding a variant: [index 1 = value, value]

`version_reply` builds that response; the docker stand-in image (`build_stub_image.py`) produces the
same bytes with busybox ``printf``, because the image holds nothing but a static busybox. Run this
module directly for a host-side stand-in (no Docker)::

    python tests/stubs/carla_stub_server.py --port 2000 --delay 5 --version 0.9.16
"""
from __future__ import annotations

import argparse
import logging
import socketserver
import threading
import time

import msgpack

log = logging.getLogger("carla-stub")

REQUEST, RESPONSE = 0, 1


def version_reply(version: str, msgid: int) -> bytes:
    """The msgpack-rpc response the CARLA client accepts for ``version``."""
    return msgpack.packb([RESPONSE, msgid, None, [[1, version]]])


def version_request(msgid: int = 1) -> bytes:
    """The request the CARLA client sends (for tests of responders)."""
    return msgpack.packb([REQUEST, msgid, "version", [[False]]])


class _Handler(socketserver.BaseRequestHandler):
    server: StubServer

    def handle(self) -> None:
        unpacker = msgpack.Unpacker(raw=False)
        while True:
            try:
                data = self.request.recv(4096)
            except OSError:
                return
            if not data:
                return
            unpacker.feed(data)
            for message in unpacker:
                self.server.requests.append(message)
                if not (isinstance(message, list) and len(message) == 4 and message[0] == REQUEST):
                    return  # not msgpack-rpc: hang up like rpclib does
                _, msgid, method, _params = message
                if self.server.silent:
                    continue
                if method == "version":
                    self.request.sendall(version_reply(self.server.version, msgid))
                else:
                    self.request.sendall(msgpack.packb([RESPONSE, msgid, f"stub: no method {method!r}", None]))


class StubServer(socketserver.ThreadingTCPServer):
    """Listens on ``port`` (0 = any free one) of ``host``; ``silent`` accepts but never answers."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, host: str = "127.0.0.1", port: int = 0, version: str = "0.9.16", silent: bool = False):
        super().__init__((host, port), _Handler)
        self.version = version
        self.silent = silent
        self.requests: list[object] = []

    @property
    def port(self) -> int:
        return self.server_address[1]

    def start(self) -> StubServer:
        threading.Thread(target=self.serve_forever, name="carla-stub", daemon=True).start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=2000)
    parser.add_argument("--version", default="0.9.16")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds before the port opens")
    parser.add_argument("--silent", action="store_true", help="accept connections, never answer")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    log.info("stub: rpc port %d opens in %.1f s", args.port, args.delay)
    time.sleep(args.delay)
    server = StubServer(args.host, args.port, args.version, args.silent)
    log.info("stub: listening on %s:%d, version %s", args.host, server.port, args.version)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
