"""Settings and drivers shared by tests that need a tiny synthetic federation (or a Flower one)."""

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
