"""Everything the project starts binds on 127.0.0.1 only: Ray's processes for the simulation."""

import pytest
from helpers import listening, loopback

from server.simulation import ray_on_loopback, start_ray

pytestmark = pytest.mark.flower

def test_the_simulations_ray_listens_on_loopback_only():
    ray = ray_on_loopback()  # imported with clustering off: kept on loopback

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
