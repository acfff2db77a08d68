"""Settings and drivers shared by tests that need a tiny synthetic federation (or a Flower one)."""

import json

import numpy as np

TINY = [
    "data.synthetic_users=10",
    "data.synthetic_items=200",
    "data.synthetic_interactions=10",
    "data.test_negatives=19",
    "model.dim=8",
]


def simulate_then(config, n_clients, then, history=None, schedule=None):
    """Flower's simulation as server.simulation.run_flower starts it (with this history and drop
    schedule), with `then(result, pool)` run by the ServerApp after training; returns what `then`
    returned."""
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from clients.app import app as client_app
    from fedunlearn.progress import Progress
    from server.app import serve
    from server.simulation import ray_on_loopback, start_ray

    ray = ray_on_loopback()

    outcome, errors = [], []
    app = ServerApp()

    @app.main()
    def main(grid, context):
        try:
            outcome.append(then(*serve(grid, config, Progress(1, False), True, history, schedule)))
        except Exception as error:  # re-raised below: the simulation would only log it
            errors.append(error)

    start_ray(config.run.num_cpus)
    try:
        backend = {"client_resources": {"num_cpus": config.run.client_cpus, "num_gpus": 0.0}}
        run_simulation(server_app=app, client_app=client_app, num_supernodes=n_clients, backend_config=backend)
    finally:
        ray.shutdown()
    if errors:
        raise errors[0]
    assert outcome, "the simulation ended without a result: see the log"
    return outcome[0]


def assert_no_user_part(replies, user_vectors):
    """No reply carries any of these user vectors (in any row of any array), nor anything but the
    update, metrics and ids."""
    from clients.messages import record_to_arrays

    for content in replies:
        assert set(content.keys()) <= {"update", "metrics", "meta"}
        for record in content.array_records.values():
            for array in record_to_arrays(record).values():
                flat = np.atleast_2d(array)
                for vector in user_vectors:
                    if flat.shape[-1] == vector.shape[-1]:
                        assert not np.any(np.all(np.isclose(flat, vector), axis=-1))
        for record in content.config_records.values():
            assert set(record.keys()) <= {"client-id", "index"}
        assert "user" not in json.dumps({k: str(v) for k, v in content.metric_records.items()})


def assert_no_secret_in(replies, vectors, attribute_values):
    """No reply carries a user part: no record named so, no array holding one of `vectors` (rows of
    (n, D) arrays) anywhere in it, no config value equal to an attribute value or holding a vector's
    bytes, no metric but SecAgg+'s num_examples."""
    for content in replies:
        assert "user" not in content and "update" not in content
        for v in vectors:
            assert_vectors_absent(content, v, attribute_values)
        for record in content.metric_records.values():
            assert set(record.keys()) <= {"num_examples"}


def copy_threshold(dim):
    """The |cosine| above which a window of `dim` values counts as a copy of a secret vector: 0.9
    (a scaled, sign-flipped or noisy copy), or higher where a random direction would reach 0.9 by
    chance more often than once in 1e9 (dim < 20; at dim 8 it is 0.998)."""
    from scipy.stats import beta

    return max(0.9, float(np.sqrt(beta.isf(1e-9, 0.5, (dim - 1) / 2))))


def _windows(array, dim):
    """Every run of `dim` consecutive values of the array, flattened in row- and (2-D) column-major order."""
    array = np.asarray(array, dtype=np.float64)
    orders = [array.ravel()] + ([array.T.ravel()] if array.ndim == 2 else [])
    return [np.lib.stride_tricks.sliding_window_view(flat, dim) for flat in orders if flat.size >= dim]


def assert_vectors_absent(content, rows, attribute_values=()):
    """No array of this reply holds a row of `rows` (n, D), nor a scaled, sign-flipped or noisy copy
    of one: no run of D consecutive values (along either axis) with |cosine| > copy_threshold(D) to
    a row; and no config value holds a row's float32/float64 bytes or equals one of `attribute_values`."""
    rows = np.asarray(rows, dtype=np.float64)
    dim = rows.shape[1]
    units = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    threshold = copy_threshold(dim)
    secret_bytes = [row.astype(dtype).tobytes() for row in rows for dtype in (np.float32, np.float64)]
    for record in content.array_records.values():
        for array in record.values():
            for windows in _windows(array.numpy(), dim):
                norms = np.linalg.norm(windows, axis=1)
                moving = windows[norms > 0]
                cosines = np.abs(moving @ units.T) / norms[norms > 0, None]
                found = cosines.max(initial=0.0)
                assert found <= threshold, f"a reply holds a copy of a secret vector (|cos| {found:.3f})"
    for record in content.config_records.values():
        for value in record.values():
            for item in value if isinstance(value, list) else [value]:
                assert not (isinstance(item, str) and item in attribute_values)
                assert not (isinstance(item, bytes) and any(secret in item for secret in secret_bytes))


def run_cli(settings, engine, out):
    """`fedunlearn run --engine ENGINE` with these settings; returns the results folder."""
    from fedunlearn.cli import main

    args = [part for setting in settings for part in ("--set", setting)]
    assert main(["run", *args, "--engine", engine, "--out", str(out), "--quiet"]) == 0
    return out


def assert_privacy_tables_match(flower, inprocess, tolerance):
    """The audit.csv of two runs: rows before any defence equal, the defended rows within
    `tolerance` (SecAgg+ rounding in the Flower defences' sums). Returns the first table."""
    import pandas as pd

    first, second = (pd.read_csv(folder / "audit.csv").drop(columns="seconds") for folder in (flower, inprocess))
    before = first["defence"] == "none"
    pd.testing.assert_frame_equal(first[before], second[before])
    pd.testing.assert_frame_equal(first[~before], second[~before], check_exact=False, rtol=0, atol=tolerance)
    return first


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


def run_as_the_runner_does(server, pool):
    """`server.run()` under the pool's torch thread count, as fedunlearn.runs.runner runs it: NCF's
    float32 sums differ in the last bits between 1 and 2 threads, and Flower's clients train on 1."""
    from fedunlearn.runs.assembly import reproducible_torch

    with reproducible_torch(pool.threads):
        return server.run()
