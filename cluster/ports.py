"""Free TCP ports for what this project starts: distinct from each other, and outside the kernel's ephemeral range.

A port chosen here is bound moments or seconds later by another process (a Ray
node, a Prefect server, a worker group's rendezvous). Two ways that went wrong
with the usual ``bind(0)`` probe: a port from the ephemeral range, where every
process's next connection draws, was taken in between (TensorFlow: "Could not
start gRPC server"), and two probes in a row returned the same port (Ray: "port
number ... that is used by other components"). Ports below the ephemeral range
and above Ray's worker ports (10002-19999) are taken only by name, and the
ports of one call are distinct.
"""

from __future__ import annotations

import itertools
import random
import socket

PORTS = range(20000, 32768)


def is_free(port: int) -> bool:
    """Whether ``port`` can be bound on every address of this machine now."""
    with socket.socket() as probe:
        try:
            probe.bind(("", port))
        except OSError:
            return False
    return True


def free_ports(count: int, within: range = PORTS) -> list[int]:
    """``count`` distinct ports of ``within``, free now, in random order."""
    tries = min(len(within), 64 + 8 * count)
    candidates = random.Random().sample(within, tries)
    found = list(itertools.islice((port for port in candidates if is_free(port)), count))
    if len(found) < count:
        raise OSError(f"only {len(found)} of {count} ports free among {tries} tried in "
                      f"{within.start}-{within.stop - 1}")
    return found


def free_port() -> int:
    """One port of :data:`PORTS`, free now."""
    return free_ports(1)[0]
