"""Everything the project starts binds on 127.0.0.1 only: Ray's processes for the simulation."""

import pytest

from server.simulation import start_ray  # before Ray is imported: it keeps Ray on loopback

pytestmark = pytest.mark.flower

LISTEN = "0A"


def listening() -> set[str]:
    """Local addresses of the machine's listening TCP sockets, as /proc/net/tcp{,6} hex."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        found |= {fields[1] for fields in map(str.split, lines) if fields[3] == LISTEN}
    return found


def loopback(hex_address: str) -> bool:
    host = hex_address.split(":")[0]
    if len(host) == 8:  # IPv4, little-endian: 127.x.x.x ends in 7F
        return host.endswith("7F")
    # IPv6: ::1, or 127.x.x.x mapped (::ffff:127.x.x.x)
    return host == "00000000000000000000000001000000" or host[16:24] == "FFFF0000" and host[30:32] == "7F"


def test_the_simulations_ray_listens_on_loopback_only():
    import ray

    if ray.is_initialized():
        ray.shutdown()
    before = listening()
    start_ray(1)
    try:
        started = listening() - before
        assert started, "Ray started no listening socket: the check saw nothing"
        assert ray.util.get_node_ip_address() == "127.0.0.1"
        assert all(loopback(address) for address in started), sorted(started)
    finally:
        ray.shutdown()
