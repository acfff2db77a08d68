"""Trained pseudo-items (`defence.pseudo_rows = "trained"`): a client's fixed set of fake positives,
trained in its own minibatches so that their rows move as its own items' rows do, without moving
its own model (docs/PRIVACY.md, "Trained pseudo-items")."""

from __future__ import annotations

import numpy as np
import torch

from fedunlearn.config import Config
from fedunlearn.fl.federation import ClientData
from fedunlearn.models.base import SplitModel, Tensors
from fedunlearn.seeding import Stream, client_key, rng_for

PSEUDO_SPREAD = (0.5, 1.5)  # trained pseudo-items: fakes = ratio x own positives x a uniform draw in this range


def pseudo_count(positives: np.ndarray, ratio: float, draw: float) -> np.ndarray:
    """Trained pseudo-items per client with these own positives, at this draw in PSEUDO_SPREAD."""
    return np.floor(ratio * positives * draw + 0.5).astype(np.int64)


def fake_positives(data: ClientData, config: Config) -> np.ndarray:
    """The client's fake positives for trained pseudo-items: one set per client and run seed, the same
    every round (fresh fakes each round would be told apart by intersecting a client's uploads over
    rounds: only its own items come back every time), about `pseudo_items` per own positive, the
    share drawn at random (PSEUDO_SPREAD) so that the rows sent do not give the own count; never a
    held-out item or the promoted target."""
    rng = rng_for(config.defence_seed(), Stream.PSEUDO_ITEMS, client_key(data.client_id))
    excluded = np.zeros(data.n_items, dtype=bool)
    excluded[data.train_items] = True
    excluded[[data.valid_item, data.test_item]] = True
    if config.unlearn.target_item >= 0:
        excluded[config.unlearn.target_item] = True
    pool = np.flatnonzero(~excluded)
    count = int(pseudo_count(np.array(len(data.train_items)), config.defence.pseudo_items, rng.uniform(*PSEUDO_SPREAD)))
    return np.sort(rng.choice(pool, min(len(pool), count), replace=False))


def batch_scores(
    model: SplitModel, user: Tensors, dense: Tensors, pos_rows: Tensors, neg_rows: Tensors, own: np.ndarray,
    own_rows: Tensors | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A minibatch's scores of positives (B,) and negatives (B, n), the client's own examples first.

    The examples of fake positives (`own` False) see the user part and the dense layers held still:
    they train only their item rows, and leave the client's own model as it was. A fake positive's
    logit is moved (a constant, so its gradient keeps its direction) to the logit of an own positive
    of the batch: the user part fits its own items, not the fakes, and the size of a row's gradient
    follows that fit, so unmatched fakes were told apart from own items by how their rows moved
    (docs/PRIVACY.md). A minibatch of fakes only takes the logits of the client's own positives
    (`own_rows`: their rows now) instead."""
    if own.all():
        return model.score(user, pos_rows, dense), model.score(user, neg_rows, dense)
    mask = torch.as_tensor(own, device=next(iter(pos_rows.values())).device)
    held_user = {key: value.detach() for key, value in user.items()}
    held_dense = {key: value.detach() for key, value in dense.items()}

    def scored(rows: Tensors) -> tuple[torch.Tensor, torch.Tensor]:
        return (model.score(user, {key: table[mask] for key, table in rows.items()}, dense),
                model.score(held_user, {key: table[~mask] for key, table in rows.items()}, held_dense))  # fmt: skip

    own_positive, fake_positive = scored(pos_rows)
    if len(own_positive):
        reference = own_positive.detach()
    elif own_rows is None:
        raise ValueError("a minibatch of fake positives only needs the rows of the client's own positives")
    else:
        with torch.no_grad():
            reference = model.score(held_user, own_rows, held_dense)
    matched = reference[torch.arange(len(fake_positive), device=mask.device) % len(reference)]
    fake_positive = fake_positive + (matched - fake_positive.detach())
    return torch.cat([own_positive, fake_positive]), torch.cat(scored(neg_rows))
