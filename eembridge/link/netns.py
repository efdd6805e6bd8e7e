"""Network namespaces: create, enter from one thread, configure, delete.

Theory of operation
-------------------
A network namespace is per *thread* in Linux: setns(fd, CLONE_NEWNET) and
unshare(CLONE_NEWNET) change only the calling thread, and every socket keeps the
namespace it was created in for its whole life. So instead of switching the whole
process (pyroute2's pushns/popns) or forking a helper (pyroute2's default for
``IPRoute(netns=...)``, unsafe next to the bridge's own threads), everything here runs
a short callable in a fresh thread that has entered the namespace:

- ``create_netns`` unshares in a throwaway thread and bind-mounts that thread's
  namespace under /var/run/netns (the place ``ip netns`` uses), so it outlives it;
- ``iproute(name)`` opens the netlink socket in such a thread and hands its fd to an
  ordinary ``IPRoute`` in the caller's thread;
- ``run_in_netns`` / ``NetnsThread`` run arbitrary code (a TCP server, a simulated
  device's network side) there; sockets it creates stay in that namespace.

A TAP opened in the root namespace and then moved into another one with netlink keeps
its file descriptor working: the simulated device uses this so its network side lives in
its own namespace while its fd is served from the bridge's process.

``delete_netns`` deletes every link inside first (synchronously, through netlink) and
then unmounts: the kernel frees a namespace only once the last socket, thread and mount
referring to it are gone, so without the explicit deletes a forgotten socket would keep
its interfaces alive, invisible.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import ipaddress
import logging
import os
import secrets
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

from pyroute2 import IPRoute
from pyroute2 import netns as pr_netns

log = logging.getLogger(__name__)

T = TypeVar("T")

NETNS_RUN_DIR = pr_netns.NETNS_RUN_DIR
CLONE_NEWNET = pr_netns.CLONE_NEWNET
LOOPBACK_INDEX = 1  # the kernel always gives lo index 1 in a new namespace
NETLINK_ROUTE = 0

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def unique_name(prefix: str, limit: int = 15) -> str:
    """``prefix`` plus random hex, at most ``limit`` characters (15 fits IFNAMSIZ)."""
    room = limit - len(prefix)
    if room < 4:
        raise ValueError(f"prefix {prefix!r} leaves fewer than 4 characters for uniqueness")
    return prefix + secrets.token_hex(8)[: min(room, 16)]


def netns_exists(name: str) -> bool:
    return name in pr_netns.listnetns()


def _enter(name: str) -> None:
    # flags=0: never create a namespace by accident while entering one.
    pr_netns.setns(name, flags=0)


def run_in_netns(name: str | None, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run ``fn(*args, **kwargs)`` in a new thread that has entered namespace ``name``
    (None: the caller's namespace; a thread starts in its creator's namespace).

    Blocks until it returns; its result is returned and its exception re-raised here.
    """
    with NetnsThread(name, fn, *args, **kwargs) as thread:
        pass
    return thread.result


class NetnsThread(threading.Thread):
    """A thread running ``target(*args, **kwargs)`` inside network namespace ``netns``
    (None: stay in the creating thread's namespace).

    As a context manager it starts on enter and joins on exit, re-raising the target's
    exception (unless the with-block itself raised). ``result`` holds the return value.
    """

    def __init__(
        self,
        netns: str | None,
        target: Callable[..., Any],
        *args: Any,
        daemon: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(name=f"netns:{netns}:{getattr(target, '__name__', 'fn')}", daemon=daemon)
        self.netns = netns
        self._fn = target
        self._args = args
        self._kwargs = kwargs
        self.result: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            if self.netns is not None:
                _enter(self.netns)
            self.result = self._fn(*self._args, **self._kwargs)
        except BaseException as exc:  # handed to the joiner, never lost in the thread
            self.error = exc

    def join_and_raise(self, timeout: float | None = None) -> Any:
        self.join(timeout)
        if self.is_alive():
            raise TimeoutError(f"thread in netns {self.netns} still running after {timeout} s")
        if self.error is not None:
            raise self.error
        return self.result

    def __enter__(self) -> NetnsThread:
        self.start()
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.join_and_raise()
        else:
            self.join(5.0)


def _unshare_and_mount(name: str) -> None:
    if _libc.unshare(CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare(CLONE_NEWNET) failed: {os.strerror(err)}")
    # /proc/thread-self, not /proc/self: only this thread is in the new namespace.
    pr_netns.attach(name, "thread-self")


def create_netns(prefix: str = "eemb-") -> str:
    """Create a uniquely named namespace with its loopback up; return its name."""
    name = unique_name(prefix, limit=32)
    errors: list[BaseException] = []

    def body() -> None:
        try:
            _unshare_and_mount(name)
        except BaseException as exc:
            errors.append(exc)

    worker = threading.Thread(target=body, name=f"netns-create:{name}")
    worker.start()
    worker.join()
    if errors:
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(NETNS_RUN_DIR, name))
        raise errors[0]
    with iproute(name) as ipr:
        ipr.link("set", index=LOOPBACK_INDEX, state="up")
    log.debug("created netns %s", name)
    return name


def iproute(netns: str | None = None) -> IPRoute:
    """An ``IPRoute`` talking to ``netns`` (None: the caller's own namespace).

    The socket is opened in a thread that entered the namespace; no fork. groups=0:
    a configuration socket subscribes to no events, so nothing piles up in it.
    """
    if netns is None:
        return IPRoute(groups=0)
    sock = run_in_netns(netns, socket.socket, socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_ROUTE)
    return IPRoute(fileno=sock.detach(), groups=0)


def link_index(ipr: IPRoute, ifname: str) -> int:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise LookupError(f"no interface {ifname}")
    return int(found[0])


def link_names(netns: str | None = None) -> list[str]:
    with iproute(netns) as ipr:
        return [str(link.get_attr("IFLA_IFNAME")) for link in ipr.link("dump")]


def move_link(ifname: str, netns: str, from_netns: str | None = None) -> int:
    """Move interface ``ifname`` into ``netns``; return its index there."""
    with iproute(from_netns) as ipr:
        ipr.link("set", index=link_index(ipr, ifname), net_ns_fd=netns)
    with iproute(netns) as ipr:
        return link_index(ipr, ifname)


def configure_link(
    netns: str | None,
    ifname: str,
    addresses: Sequence[str] = (),
    up: bool = True,
    mtu: int | None = None,
) -> None:
    """Set MTU, add ``addr/prefix`` addresses and bring ``ifname`` up inside ``netns``."""
    with iproute(netns) as ipr:
        index = link_index(ipr, ifname)
        if mtu is not None:
            ipr.link("set", index=index, mtu=mtu)
        for text in addresses:
            iface = ipaddress.ip_interface(text)
            ipr.addr(
                "replace",
                index=index,
                address=str(iface.ip),
                prefixlen=iface.network.prefixlen,
            )
        if up:
            ipr.link("set", index=index, state="up")


def delete_netns(name: str) -> list[str]:
    """Delete every link in ``name`` (loopback aside), then the namespace itself.

    Returns the names of the links deleted. Missing namespace: nothing to do.
    """
    if not netns_exists(name):
        return []
    deleted: list[str] = []
    with iproute(name) as ipr:
        for link in ipr.link("dump"):
            if link["index"] == LOOPBACK_INDEX:
                continue
            ifname = str(link.get_attr("IFLA_IFNAME"))
            try:
                ipr.link("del", index=link["index"])
                deleted.append(ifname)
            except Exception as exc:  # noqa: BLE001 - gone meanwhile is fine, log the rest
                log.debug("netns %s: could not delete %s: %s", name, ifname, exc)
    pr_netns.remove(name)
    log.debug("deleted netns %s (links %s)", name, deleted)
    return deleted


@contextlib.contextmanager
def temporary_netns(prefix: str = "eemb-") -> Iterator[str]:
    """A fresh namespace for the with-block, deleted with everything in it afterwards."""
    name = create_netns(prefix)
    try:
        yield name
    finally:
        delete_netns(name)


def free_linklocal_subnet() -> ipaddress.IPv4Network:
    """A 169.254.X.0/24 no interface in the root namespace uses (several bridges or tests may run at once)."""
    used = set()
    with iproute() as ipr:
        for msg in ipr.addr("dump", family=socket.AF_INET):
            used.add(ipaddress.ip_interface(f"{msg.get_attr('IFA_ADDRESS')}/{msg['prefixlen']}").network)
    for _ in range(100):
        third = int.from_bytes(os.urandom(1), "big") % 254 + 1
        net = ipaddress.IPv4Network(f"169.254.{third}.0/24")
        if not any(net.overlaps(other) for other in used):
            return net
    raise RuntimeError("no free 169.254.X.0/24 subnet in the root namespace")
