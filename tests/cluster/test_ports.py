import socket

import pytest

from cluster.ports import PORTS, free_ports, is_free


def test_ports_of_one_call_are_distinct_free_and_outside_the_ephemeral_range():
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        ephemeral_start = int(f.read().split()[0])
    for _ in range(50):
        ports = free_ports(5)
        assert len(set(ports)) == 5 and all(p in PORTS and p < ephemeral_start and is_free(p) for p in ports), ports


def test_a_port_in_use_is_never_returned():
    within = range(PORTS.start, PORTS.start + 4)
    taken = []
    try:
        for port in within[:3]:
            if is_free(port):
                sock = socket.socket()
                sock.bind(("127.0.0.2", port))  # on one loopback address only: the wildcard probe must still see it
                sock.listen()
                taken.append(sock)
        free = [p for p in within if is_free(p)]
        assert set(free_ports(len(free), within=within)) == set(free) and len(free) <= 1
        with pytest.raises(OSError, match=f"of {len(free) + 1} ports free"):
            free_ports(len(free) + 1, within=within)
    finally:
        for sock in taken:
            sock.close()
