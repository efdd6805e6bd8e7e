"""The simulated device's network side without root: a TAP in an unprivileged user and
network namespace, as rootless containers make theirs.

An ordinary user may create a user namespace in which it is root, and a network
namespace owned by it; inside, it may create a TAP (CAP_NET_ADMIN over that network
namespace is all the kernel asks). So `UserNsNetwork` starts a child with
`unshare --user --map-root-user --net`; the child brings up lo, creates the TAP with the
device's address, and passes the TAP's descriptor back over a socketpair (SCM_RIGHTS).
The simulated device then reads and writes that descriptor from our namespace (a TAP's
fd works from anywhere), while the TCP ends of the "board" run inside the namespace: the
child runs, in a thread each, the functions `call` names (module:function, arguments
and result in JSON). The namespace lives as long as the child: it exits when its socket
closes, and nothing is left behind.

The host's side of such a bridge is `--link user` (no interface on the host, no root).
Where the kernel forbids unprivileged user namespaces, `UserNsNetwork` raises one line
naming the setting.
"""

from __future__ import annotations

import errno
import importlib
import itertools
import json
import os
import socket
import subprocess
import sys
import threading
from concurrent.futures import Future
from typing import Any

from ..core.errors import UserError
from .device import SimDevice
from .faults import Faults
from .link import SimLink
from .polled import PolledNetworkSide

START_TIMEOUT = 20.0  # seconds for the child to hand over its TAP (imports pyroute2)
SETTINGS = ("the kernel forbids unprivileged user namespaces: set sysctl "
            "user.max_user_namespaces above 0 (and kernel.unprivileged_userns_clone=1 where it "
            "exists, kernel.apparmor_restrict_unprivileged_userns=0 on Ubuntu)")


class TapFd:
    """A TAP's descriptor as link.sim.polled wants it, for an interface made elsewhere."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        os.set_blocking(fd, False)

    def fileno(self) -> int:
        return self._fd

    def read_into(self, buffer: Any) -> int:
        try:
            return os.readv(self._fd, (buffer,))
        except BlockingIOError:
            return 0

    def write(self, frame: Any) -> int:
        try:
            return os.write(self._fd, frame)
        except OSError as exc:
            if exc.errno == errno.EBADF:
                raise
            return 0  # refused (link down, queue full): a lost frame, as on a cable

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class UserNsNetwork:
    """A child in its own user and network namespace holding a configured TAP; `tap` is
    our descriptor of it, `call` runs functions in there."""

    def __init__(self, address: str, mtu: int = 1500) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock = ours
        try:
            self.process = subprocess.Popen(
                ["unshare", "--user", "--map-root-user", "--net", sys.executable, "-m",
                 __name__, str(theirs.fileno()), address, str(mtu)],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                stderr=subprocess.PIPE, start_new_session=True)
        except FileNotFoundError:
            ours.close()
            raise UserError("the unprivileged simulated device needs unshare (util-linux)") from None
        finally:
            theirs.close()
        ours.settimeout(START_TIMEOUT)
        try:
            message, fds, _, _ = socket.recv_fds(ours, 4096, 1)
        except TimeoutError:
            message, fds = b"", []
        if not fds:
            self._sock.close()
            self.process.kill()
            _, stderr = self.process.communicate()
            said = stderr.decode(errors="replace").strip().splitlines()
            if said and "unshare" in said[-1] and ("Operation not permitted" in said[-1]
                                                   or "No space left" in said[-1]):
                raise UserError(SETTINGS)
            raise UserError("the simulated device's namespace did not start: "
                            + (said[-1] if said else "no message"))
        info = json.loads(message)
        self.name, self.mac = info["name"], info["mac"]
        self.tap = TapFd(fds[0])
        ours.settimeout(None)
        self._ids = itertools.count()
        self._waiting: dict[int, Future[Any]] = {}
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read_results, name="userns-results",
                                        daemon=True)
        self._reader.start()

    def call(self, target: str, *args: Any) -> Future[Any]:
        """Run module:function(*args) in the namespace, in a thread of its own there."""
        future: Future[Any] = Future()
        with self._lock:
            number = next(self._ids)
            self._waiting[number] = future
            self._sock.sendall(json.dumps({"id": number, "call": target, "args": args})
                               .encode() + b"\n")
        return future

    def _read_results(self) -> None:
        with self._sock.makefile("rb") as lines:
            for line in lines:
                answer = json.loads(line)
                with self._lock:
                    future = self._waiting.pop(answer["id"])
                if "error" in answer:
                    future.set_exception(RuntimeError(answer["error"]))
                else:
                    future.set_result(answer["result"])
        with self._lock:
            for future in self._waiting.values():
                future.set_exception(RuntimeError("the namespace's child exited"))
            self._waiting.clear()

    def close(self) -> None:
        self.tap.close()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.process.stderr is not None:
            self.process.stderr.close()


def _child(fd: int, address: str, mtu: int) -> None:
    """In the new namespaces: lo and the TAP up, the TAP's fd to the parent, then calls."""
    from ..link.netns import configure_link, unique_name
    from ..link.tap import Tap

    sock = socket.socket(fileno=fd)
    configure_link(None, "lo")
    tap = Tap(unique_name("eemsim"), mode="create", mtu=mtu)
    configure_link(None, tap.name, [address], up=True, mtu=mtu)
    socket.send_fds(sock, [json.dumps({"name": tap.name, "mac": tap.mac}).encode()],
                    [tap.fileno()])
    lock = threading.Lock()

    def run(request: dict[str, Any]) -> None:
        module, _, function = request["call"].partition(":")
        try:
            answer = {"id": request["id"],
                      "result": getattr(importlib.import_module(module), function)(
                          *request["args"])}
        except Exception as exc:  # sent back, raised in the caller
            answer = {"id": request["id"], "error": f"{type(exc).__name__}: {exc}"}
        with lock:
            try:
                sock.sendall(json.dumps(answer).encode() + b"\n")
            except OSError:
                pass  # the parent has gone

    with sock.makefile("rb") as lines:
        for line in lines:
            threading.Thread(target=run, args=(json.loads(line),), daemon=True).start()
    tap.close()


if __name__ == "__main__":
    _child(int(sys.argv[1]), sys.argv[2], int(sys.argv[3]))


class UserNsSimLink(SimLink):
    """sim.link.SimLink without root: the device's network side in an unprivileged user
    and network namespace; its TCP ends run there through `call`."""

    def __init__(self, address: str = "169.254.7.1/24", *, max_packet: int = 512,
                 tx_crc: bool = False, batch: bool = False, loss: float = 0.0,
                 flip: float = 0.0, mtu: int = 1500, seed: int | None = None,
                 faults: Faults | None = None, **device_options: Any) -> None:
        # No SimLink.__init__: no named namespace (None: call() runs code in there), and
        # the TAP made in the child, read through its descriptor (SimLink's types say
        # otherwise, hence the two ignores).
        self.address, self.ip = address, address.split("/")[0]
        self.namespace = None  # type: ignore[assignment]
        self.userns = UserNsNetwork(address, mtu)
        try:
            self.network = PolledNetworkSide(  # type: ignore[assignment]
                self.userns.tap, self.userns.name)
            self.mac = self.userns.mac
            self.device = SimDevice(self.network, max_packet=max_packet, batch=batch,
                                    crc=tx_crc, faults=faults or Faults(loss=loss, flip=flip,
                                                                        seed=seed),
                                    **device_options)
        except BaseException:
            self.userns.close()
            raise

    def call(self, target: str, *args: Any) -> Future[Any]:
        return self.userns.call(target, *args)

    def close(self) -> None:
        self.device.close()
        self.network.close()  # closes our TAP descriptor
        self.userns.close()
