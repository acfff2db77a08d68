"""The attribute audit on the Flower engine: `fedunlearn.privacy.stage.privacy_stage`, the same
function the in-process and batched engines run, with Flower's clients behind it.

The audit's central view (the global attack on every embedding, and here also the local audit's
outcomes) needs every retained client's user part. The simulation's auditor reads them with
`query.audit_users` (`FlowerPool.audit_users`): a measurement oracle, the same reading the other
engines' auditor does on the pool's memory, not part of the protocol; it is sent only when the run
asks for the audit (`audit.enabled`), and a client answers it only inside fedunlearn's simulation.
A defence configured without the audit runs on the clients and reads nothing back
(`defend_without_audit`). The defence itself runs on the clients
(`server.defence.defend_on_clients`): the server's defence loop still sees only SecAgg+ sums, and
the oracle reads the defended embeddings back afterwards, for the table. Recommendation quality is
measured on the clients too: after each defence they hold its embeddings (with `defence.compare`
every defence starts from the trained ones, the configured one runs last, and with `none`
configured the clients go back to the trained ones at the end).

The local audit is computed from the gathered embeddings with a plain sum, as on the other engines:
`FlowerPool.local_audit` (SecAgg+ over the clients' own outcomes) does not fit the stage's
`Aggregator`, which receives outcomes already computed, and has no client-side upload view.
"""

from __future__ import annotations

import numpy as np

from fedunlearn.config import Config
from fedunlearn.fl.federation import Federation
from fedunlearn.fl.rounds import FederatedServer, FederationResult
from fedunlearn.models.base import Arrays
from fedunlearn.privacy.attacks import Attacker
from fedunlearn.privacy.common import DefenceOutcome, StepDone, flatten_users
from fedunlearn.privacy.stage import PrivacyReport, privacy_stage
from server.defence import defend_on_clients
from server.pool import FlowerPool


def audit_on_flower(
    config: Config, federation: Federation, server: FederatedServer, pool: FlowerPool, result: FederationResult
) -> PrivacyReport:
    """Audit the retained clients, defend on them, audit again. Afterwards each client holds the
    configured defence's embedding as its user part, as on the other engines."""
    clients = list(server.active)
    uploads = None if result.uploads is None else {k: v[clients] for k, v in result.uploads.items()}

    def evaluate(_users: list[Arrays]) -> dict[str, float]:
        # the stage evaluates the model as trained, then right after each defence: the clients hold
        # these users already
        metrics = server.evaluate()
        return {key: metrics[key] for key in ("HR@10", "NDCG@10")}

    def defend(trial: Config, defending: np.ndarray, attackers: list[Attacker], step_done: StepDone) -> DefenceOutcome:
        flags = [bool(flag) for flag in defending]
        outcome = defend_on_clients(trial, pool, clients, result.shared, flags, attackers, step_done, False)
        outcome.embeddings = flatten_users(server.model, pool.audit_users(clients))
        return outcome

    users = pool.audit_users(clients)
    report, _ = privacy_stage(
        config, server.model, federation, clients, result.shared, users, uploads, evaluate, defend=defend,
        progress=server.progress,
    )  # fmt: skip
    if config.defence.compare:
        pool.defence_end(clients, restore=config.defence.method == "none")
    return report


def defend_without_audit(
    config: Config, server: FederatedServer, pool: FlowerPool, result: FederationResult
) -> dict[str, float | int | str]:
    """The configured post-training defence on the retained clients when no audit is asked for:
    the server sees only SecAgg+ sums and the evaluation replies, so the user parts stay on the
    clients (no `query.audit_users`). Reports recommendation quality before (the last round's
    evaluation: the model and user parts it measured are the ones defended) and after."""
    clients = list(server.active)
    before = result.rounds[-1]
    with server.progress.during(f"defence: {config.defence.method} on the clients (no audit asked)"):
        steps = server.progress.start_steps(config.defence.steps)
        outcome = defend_on_clients(config, pool, clients, result.shared, step_done=steps)
    after = server.evaluate()
    listed = set(config.defence.client_ids)
    defending = sum(config.defence.clients == "all" or server.client_ids[i] in listed for i in clients)
    return {
        "method": config.defence.method,
        "defending_clients": defending,
        "seconds": round(outcome.seconds, 2),
        **{f"{key}_before": before[key] for key in ("HR@10", "NDCG@10")},
        **{key: after[key] for key in ("HR@10", "NDCG@10")},
    }
