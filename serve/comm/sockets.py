"""Direct TCP exchanges between TP ranks on different hosts.

gloo moves a point-to-point message through its own I/O thread: the caller
posts the operation, gloo's thread does the socket work and wakes the caller.
For the one-token messages of a decode step that hand-off dominates (measured
on two processes: a gloo send/recv pair ~130 us, a raw TCP ping-pong ~53 us),
and on a busy host every wake-up is a chance to be scheduled out. A
SocketTransport keeps one TCP connection per peer and swaps small messages on
it from the calling thread: send the whole message, then receive the peer's.
Everything else (large messages, multi-peer rounds, the backend's own
collectives) stays on gloo.

Both sides send before they receive, so a swap must never block in send: only
messages up to `max_bytes` take this path, and each socket's send and receive
buffers are set to hold several such messages.

Set-up is collective over gloo: every rank listens on the address it uses to
reach the group's master (or a given bind address), the ranks swap addresses,
ports and random tokens through gloo, the higher rank of each pair connects to
the lower and presents the lower rank's token (compared in constant time), so
only a process that is part of the group can take a peer's place. A dead peer
shows as a closed connection at once, or as a timeout.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import secrets
import socket
import struct

import torch

from serve.comm.collectives import Transport, fits_direct

logger = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 64 * 1024
TOKEN_BYTES = 16
# Per peer, for the all-gather: 16 address bytes, port, family, then the token.
_IDENT = struct.Struct("<16sHB16s")
_HELLO = struct.Struct("<q16s")
_LENGTH = struct.Struct("<q")
CONNECT_TIMEOUT_S = 10.0


class SocketTransportError(RuntimeError):
    pass


def local_address(master_addr: str, master_port: int) -> str:
    """The address this host uses to reach master_addr (no packet is sent)."""
    info = socket.getaddrinfo(master_addr, master_port, type=socket.SOCK_DGRAM)[0]
    with socket.socket(info[0], socket.SOCK_DGRAM) as s:
        s.connect(info[4])
        return str(s.getsockname()[0])


def _recv_exact(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            raise SocketTransportError("the peer closed its TP connection")
        got += n


class SocketTransport(Transport):
    """A Transport whose small `exchange` calls go over direct TCP connections."""

    def __init__(
        self,
        rank: int,
        world_size: int,
        pg: object | None,
        *,
        sockets: dict[int, socket.socket],
        max_bytes: int,
    ) -> None:
        super().__init__(rank, world_size, pg)
        self._sockets = sockets
        self.max_bytes = max_bytes
        self.direct_exchanges = 0
        self._len = bytearray(_LENGTH.size)

    @classmethod
    def connect(
        cls,
        rank: int,
        world_size: int,
        pg: object | None = None,
        *,
        bind_host: str,
        max_bytes: int = DEFAULT_MAX_BYTES,
        timeout_s: float = 30.0,
    ) -> SocketTransport | None:
        """Collective: connects every pair of ranks; None (on every rank) unless
        every rank succeeded."""
        base = Transport(rank, world_size, pg)
        if base.is_nccl or world_size < 2:
            return None
        token = secrets.token_bytes(TOKEN_BYTES)
        listener: socket.socket | None = None
        ident = b"\0" * _IDENT.size
        try:
            addr = ipaddress.ip_address(bind_host)
            listener = socket.socket(
                socket.AF_INET6 if addr.version == 6 else socket.AF_INET, socket.SOCK_STREAM
            )
            listener.bind((bind_host, 0))
            listener.listen(world_size)
            ident = _IDENT.pack(addr.packed, listener.getsockname()[1], addr.version, token)
        except (OSError, ValueError) as exc:
            logger.info("no direct TCP for TP exchanges: cannot listen on %s: %s", bind_host, exc)
        mine = torch.frombuffer(bytearray(ident), dtype=torch.uint8)
        every = [bytes(t.tolist()) for t in base.all_gather_bytes(mine, [_IDENT.size] * world_size)]
        sockets: dict[int, socket.socket] = {}
        ok = listener is not None and all(e != b"\0" * _IDENT.size for e in every)
        if ok:
            try:
                sockets = _pair_up(rank, world_size, listener, token, every, max_bytes)  # type: ignore[arg-type]
            except (OSError, SocketTransportError) as exc:
                logger.info("no direct TCP for TP exchanges: %s", exc)
                ok = False
        if listener is not None:
            listener.close()
        flags = base.all_gather_lengths(int(ok))
        if not all(flags):
            for s in sockets.values():
                s.close()
            return None
        for s in sockets.values():
            s.settimeout(timeout_s)
        logger.info(
            "TP rank %d: exchanges up to %d bytes over direct TCP to %d peers",
            rank,
            max_bytes,
            len(sockets),
        )
        return cls(rank, world_size, pg, sockets=sockets, max_bytes=max_bytes)

    def close(self) -> None:
        for s in self._sockets.values():
            s.close()
        self._sockets.clear()

    def exchange(self, send: torch.Tensor, recv: torch.Tensor, peer: int) -> None:
        sock = self._sockets.get(peer)
        if sock is None or not fits_direct(send, recv, self.max_bytes):
            super().exchange(send, recv, peer)
            return
        src = send.reshape(-1).view(torch.uint8).numpy()
        dst = recv.reshape(-1).view(torch.uint8).numpy()
        try:
            sock.sendall(_LENGTH.pack(src.size) + src.tobytes())
            _recv_exact(sock, memoryview(self._len))
            (size,) = _LENGTH.unpack(self._len)
            if not 0 <= size <= dst.size:
                raise SocketTransportError(
                    f"peer {peer} sent {size} bytes into a {dst.size}-byte receive"
                )
            _recv_exact(sock, memoryview(dst)[:size])
        except TimeoutError:
            raise SocketTransportError(
                f"TP rank {self.rank}: no answer from rank {peer} in {sock.gettimeout():.0f} s"
            ) from None
        except OSError as exc:
            raise SocketTransportError(f"TP rank {self.rank}: link to rank {peer}: {exc}") from exc
        self.bytes_sent += src.size
        self.direct_exchanges += 1


def _pair_up(
    rank: int,
    world: int,
    listener: socket.socket,
    token: bytes,
    every: list[bytes],
    max_bytes: int,
) -> dict[int, socket.socket]:
    """Connects to every lower rank, accepts every higher one."""
    sockets: dict[int, socket.socket] = {}
    try:
        for peer in range(rank):
            packed, port, version, peer_token = _IDENT.unpack(every[peer])
            host = str(ipaddress.ip_address(packed[:4] if version == 4 else packed))
            s = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S)
            _tune(s, max_bytes)
            s.sendall(_HELLO.pack(rank, peer_token))
            sockets[peer] = s
        listener.settimeout(CONNECT_TIMEOUT_S)
        while len(sockets) < world - 1:
            s, _ = listener.accept()
            s.settimeout(CONNECT_TIMEOUT_S)
            hello = bytearray(_HELLO.size)
            try:
                _recv_exact(s, memoryview(hello))
            except (OSError, SocketTransportError):
                s.close()
                continue
            peer, presented = _HELLO.unpack(hello)
            if not hmac.compare_digest(presented, token) or not rank < peer < world:
                logger.warning("TP rank %d: refused a connection without the group's token", rank)
                s.close()
                continue
            if peer in sockets:
                s.close()
                raise SocketTransportError(f"rank {peer} connected twice")
            _tune(s, max_bytes)
            sockets[peer] = s
    except BaseException:
        for s in sockets.values():
            s.close()
        raise
    return sockets


def _tune(s: socket.socket, max_bytes: int) -> None:
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    # Room for a few whole messages each way, so a send never waits for the
    # peer to start receiving.
    room = 4 * (max_bytes + _LENGTH.size)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, room)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, room)
