"""Move the test process into a network namespace with only a loopback interface (Linux, root).

Ray binds its agents to the address it sees as the node's own, whatever ``--node-ip-address`` says; inside a
namespace with only ``lo`` that address is 127.0.0.1 and no socket can reach the machine's network.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import socket
import struct
import sys

CLONE_NEWNET = 0x40000000
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1


def isolate_network() -> bool:
    """Unshare this process's network namespace and bring ``lo`` up; False where that is not possible (set
    ``DISTATTR_TEST_NETWORK=host`` to skip it). Processes started afterwards inherit the namespace."""
    if sys.platform != "linux" or os.geteuid() != 0 or os.environ.get("DISTATTR_TEST_NETWORK") == "host":
        return False
    if os.environ.get("DISTATTR_NETNS_ISOLATED") == str(os.getpid()):
        return True
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        return False
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        request = struct.pack("16sH", b"lo", 0)
        flags = struct.unpack("16sH", fcntl.ioctl(s, SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH", b"lo", flags | IFF_UP))
    os.environ["DISTATTR_NETNS_ISOLATED"] = str(os.getpid())
    return True


def only_loopback() -> bool:
    """Whether every network interface visible to this process is the loopback."""
    return [name for _, name in socket.if_nameindex()] == ["lo"]
