"""FRU (Yuan et al., WSDM 2023): roll back, then replay the rounds without the leaving clients with
short local training, each round's item-table aggregate rescaled to the step size of the stored
(compact) one; dense layers (NCF) take the stored aggregate of the same clients (replay_step)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from fedunlearn.fl.aggregation import PackedUpdates, apply_delta, packed_delta
from fedunlearn.fl.updates import ClientUpdate, step_size
from fedunlearn.models.base import Arrays
from fedunlearn.unlearning.context import UnlearningServer, require_history


def fru(server: UnlearningServer, round_number: int, forgotten: list[int]) -> Arrays:
    """Roll back to the latest checkpoint at or before the first round any leaving client took part
    in (checkpoints are kept every `unlearn.dt` rounds from round 1), then replay every later round
    with its participants less the leaving clients, each training `lam * E` epochs from the replayed
    model. Each replayed aggregate is rescaled to the step size of the same clients' stored one
    (replay_step). If a later event will read the history, it is rewritten with the replay
    (checkpoints, and each client's update scaled as its aggregate was), so that removal rolls back
    to a model without them."""
    history = require_history(server, "fru")
    leaving = {server.client_ids[i] for i in forgotten}
    retained = {server.client_ids[i] for i in server.active}
    past = [r for r in history.rounds() if r < round_number]
    joined = [r for r in past if leaving & set(history.participants(r))]
    if not joined:
        return server.shared  # they never contributed: nothing to erase
    start = max(c for c in history.checkpoint_rounds() if c <= joined[0])
    shared = history.checkpoint(start)
    server.roll_back_users()
    epochs = server.config.unlearn.lam * server.config.train.local_epochs
    rewrite = server.records_history()  # only a later event reads the replayed history
    checkpoints = [c for c in history.checkpoint_rounds() if start <= c < round_number]
    # a checkpoint round whose every participant left at an earlier event has no participants
    # left, but a later event may still roll back to its checkpoint: rewrite it too
    for replayed in sorted({r for r in past if r >= start} | set(checkpoints)):
        if rewrite and replayed in checkpoints:
            history.put_checkpoint(replayed, shared)
        participants = [c for c in history.participants(replayed) if c in retained]
        if not participants:
            continue
        positions = [server.position[c] for c in participants]
        fresh = server.train_clients(replayed, positions, shared, epochs)
        stored = history.compacts(replayed, [u.client_id for u in fresh])
        step, scale = replay_step(server, shared, fresh, stored)
        shared = apply_delta(shared, step)
        if rewrite:
            history.replace_updates(replayed, replayed_updates(fresh, scale, stored))
            history.drop_from_round(replayed, sorted(set(participants) - {u.client_id for u in fresh}))
    return shared


def replay_step(
    server: UnlearningServer, shared: Arrays, fresh: list[ClientUpdate], stored: PackedUpdates
) -> tuple[Arrays, dict[str, float]]:
    """The replayed round's step and the factor each item table was given.

    Item tables (the paper's rule): direction from the server's aggregate of the fresh updates,
    size from the stored round's (`stored`: the same clients' compact updates), measured like for
    like: the fresh updates are cut by the same storage rule (each client's `alpha` share of rows
    that changed most), both sides are averaged row-wise over the clients that touched each row (a
    compact update counts where it touched, not only where it kept rows), and compared by step size
    per changed row, so a replay that reproduces the stored updates takes exactly the stored step.

    Dense layers (NCF's MLP and output): the stored aggregate of the same clients' dense updates,
    direction and size. A `lam`-epoch replay is one Adam step on a tenth of a client's examples;
    every example reaches a dense layer, so its direction there is mostly minibatch noise that
    cancels across clients, and rescaling that small aggregate to the stored size blew the noise
    up 2-15x and cost NCF up to 0.065 HR@10 against Retrain (docs/RESULTS.md). An item row's
    update comes from the few examples that touch it, which the replay samples like training does.
    """
    train = server.config.train

    def mean_step(packed: PackedUpdates) -> Arrays:
        return packed_delta(server.model, shared, packed, train.server_lr, train.dense_server_lr)

    reference = mean_step(stored)
    mirrored = mean_step(PackedUpdates.pack(fresh).compacted(server.config.unlearn.alpha))
    step = server.aggregate_delta(shared, fresh)
    scale = {key: _ratio(_row_size(reference[key]), _row_size(mirrored[key])) for key in server.model.row_keys}
    return {key: step[key] * scale[key] if key in scale else reference[key] for key in step}, scale


def _row_size(delta: np.ndarray) -> float:
    """step_size of an aggregated item-table step, over the rows it changes."""
    return step_size(delta[np.any(delta != 0, axis=1)], per_row=True)


def _ratio(reference: float, size: float) -> float:
    return reference / size if size > 0 else 1.0


def replayed_updates(fresh: list[ClientUpdate], scale: dict[str, float], stored: PackedUpdates) -> list[ClientUpdate]:
    """What the history keeps of each replayed client, so that its stored round adds up to the step
    taken: its fresh item rows times the factor their aggregate got, and its stored dense update
    (the one replay_step applied)."""
    position = {client: i for i, client in enumerate(stored.clients)}
    return [
        replace(
            update,
            rows={key: (value * scale[key]).astype(np.float32) for key, value in update.rows.items()},
            dense={key: value[position[update.client_id]].copy() for key, value in stored.dense.items()},
        )
        for update in fresh
    ]
