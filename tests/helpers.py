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


def simulate_then(config, n_clients, then):
    """Flower's simulation as server.simulation.run_flower starts it, with `then(result, pool)` run by
    the ServerApp after training; returns what `then` returned."""
    import ray
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from clients.app import app as client_app
    from fedunlearn.progress import Progress
    from server.app import serve
    from server.simulation import start_ray

    outcome, errors = [], []
    app = ServerApp()

    @app.main()
    def main(grid, context):
        try:
            outcome.append(then(*serve(grid, config, Progress(1, False), keep_replies=True)))
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
    from fedunlearn.messages import record_to_arrays

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
