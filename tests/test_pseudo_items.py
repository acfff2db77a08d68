"""Trained pseudo-items (defence.pseudo_rows = "trained"): fake positives trained like real ones,
without moving the client's own model, the same every round."""

import json

import numpy as np
import pytest
import torch

from fedunlearn.config import load_config
from fedunlearn.engines.choice import choose_engine
from fedunlearn.engines.inprocess import InProcessPool
from fedunlearn.errors import FedUnlearnError
from fedunlearn.fl.fake_items import PSEUDO_SPREAD, batch_scores, fake_positives
from fedunlearn.fl.federation import build_federation
from fedunlearn.fl.training import recommendation_loss
from fedunlearn.models import build_model

SMALL = ["data.synthetic_users=30", "data.synthetic_items=200", "data.synthetic_interactions=15",
         "data.test_negatives=19", "model.dim=8"]  # fmt: skip
TRAINED = ["defence.upload=pseudo-items", "defence.pseudo_rows=trained"]


@pytest.mark.parametrize("model", ["mf", "ncf"])
def test_fake_examples_train_their_item_rows_and_nothing_of_the_clients_own_model(model):
    """The user part's and the dense layers' gradients do not depend on the fake rows at all (a
    fake row's example is scored with them held still), while the fake rows themselves are trained,
    each at the fit of an own positive."""
    config = load_config(None, [*SMALL, f"model.name={model}"])
    split = build_model(config.model, 50)
    rng = np.random.default_rng(0)
    shared = split.init_shared(rng)
    user_np = split.init_user(rng)
    own = np.array([True, False, True, False, False])

    def gradients(fake_shift: float) -> dict[str, np.ndarray]:
        user = {key: torch.tensor(value, requires_grad=True) for key, value in user_np.items()}
        dense = {key: torch.tensor(shared[key], requires_grad=True) for key in split.dense_keys(shared)}
        pos = {key: torch.tensor(shared[key][:5]) for key in split.row_keys}
        neg = {key: torch.tensor(shared[key][10:25].reshape(5, 3, -1)) for key in split.row_keys}
        for table in (*pos.values(), *neg.values()):
            table[~torch.as_tensor(own)] += fake_shift  # only the fake examples' rows change
            table.requires_grad_(True)
        positive, negative = batch_scores(split, user, dense, pos, neg, own)
        # a fake positive's logit is an own positive's (its fit), whatever its row: own examples first
        np.testing.assert_allclose(positive[2:].detach().numpy(), positive[[0, 1, 0]].detach().numpy(), rtol=1e-5)
        recommendation_loss(config.model.loss, positive, negative).backward()
        grads = {f"user.{key}": value.grad.numpy().copy() for key, value in user.items()}
        grads |= {f"dense.{key}": value.grad.numpy().copy() for key, value in dense.items()}
        grads |= {f"pos.{key}": value.grad.numpy().copy() for key, value in pos.items()}
        return grads

    before, after = gradients(0.0), gradients(0.7)
    for key in before:
        if not key.startswith("pos."):
            np.testing.assert_allclose(after[key], before[key], rtol=1e-6, atol=1e-9, err_msg=key)
        else:
            np.testing.assert_allclose(after[key][own], before[key][own], rtol=1e-6, atol=1e-9, err_msg=key)
            assert (np.abs(after[key][~own]).sum(axis=-1) > 0).all()  # every fake row learns


def test_a_trained_pseudo_item_client_sends_the_same_fakes_every_round_beside_its_own_items():
    config = load_config(None, [*SMALL, *TRAINED, "defence.pseudo_items=1.0", "unlearn.target_item=3"])
    federation = build_federation(config.data, 0)
    pool = InProcessPool(config, federation)
    shared, clients = pool.model.init_shared(np.random.default_rng(1)), list(range(federation.n_clients))
    rounds = [{r.value.client_id: r.value for r in pool.train(t, clients, shared, lambda _: None)} for t in (1, 2, 3)]
    counts = []
    for index in clients:
        data = federation.client(index)
        fakes = fake_positives(data, config)
        own = len(data.train_items)
        counts.append(len(fakes) / own)
        assert np.intersect1d(fakes, data.train_items).size == 0
        assert not {data.valid_item, data.test_item, 3} & set(fakes.tolist())
        for uploads in rounds:
            update = uploads[data.client_id]
            assert update.num_examples == own + len(fakes)  # the count sent does not give the own count
            assert set(fakes) <= set(update.item_ids) and set(data.train_items) <= set(update.item_ids)
    low, high = PSEUDO_SPREAD
    assert all(low - 0.1 <= share <= high + 0.1 for share in counts) and np.std(counts) > 0.1


@pytest.mark.parametrize("rows_like", ["mimic", "trained"])
def test_intersecting_a_clients_uploads_over_rounds_finds_padded_fakes_out_but_not_trained_ones(rows_like):
    """Why the trained fakes are fixed: the padded modes draw new fake items each round, and the
    items a client sends in every round are then nearly only its own; trained fakes come back."""
    sets = [*SMALL, "data.synthetic_users=150", "data.synthetic_items=2000", "defence.upload=pseudo-items",
            f"defence.pseudo_rows={rows_like}"]  # fmt: skip
    config = load_config(None, sets)
    federation = build_federation(config.data, 0)
    pool = InProcessPool(config, federation)
    shared, clients = pool.model.init_shared(np.random.default_rng(1)), list(range(federation.n_clients))
    rounds = [{r.value.client_id: r.value for r in pool.train(t, clients, shared, lambda _: None)} for t in range(1, 6)]
    first, always = [], []
    for index in clients:
        data = federation.client(index)
        own = len(data.train_items)
        common = set.intersection(*(set(uploads[data.client_id].item_ids.tolist()) for uploads in rounds))
        assert set(data.train_items) <= common
        first.append(own / len(rounds[0][data.client_id].item_ids))
        always.append(own / len(common))
    assert np.mean(first) < 0.15  # one upload: about one own item in ten rows
    if rows_like == "mimic":
        assert np.mean(always) > 0.85  # five uploads: nearly every item sent each time is the client's own
    else:
        assert 0.4 < np.mean(always) < 0.6  # own items and fakes, one fake per own item on average


def test_trained_pseudo_items_need_an_engine_that_trains_them(tmp_path):
    assert choose_engine(load_config(None, [*SMALL, *TRAINED])) == "inprocess"
    with pytest.raises(FedUnlearnError, match="pseudo_rows = 'trained'.*run.engine"):
        load_config(None, [*SMALL, *TRAINED, "run.engine=batched"])
    from fedunlearn.cli import main

    out = tmp_path / "run"
    sets = [*SMALL, *TRAINED, "train.rounds=2", "eval.every=2"]
    assert main(["run", "--quiet", "--out", str(out), *[a for s in sets for a in ("--set", s)]]) == 0
    final = json.loads((out / "final.json").read_text())
    assert not [key for key, value in final.items() if key.startswith("rejected_") and value]  # every reply passed


@pytest.mark.parametrize("rows_like", ["mimic", "trained"])
def test_the_rows_of_trained_fakes_look_like_own_rows_to_the_row_attackers(rows_like, monkeypatch):
    """After 6 rounds of a small federation: a jittered copy of a real row sits next to it (the
    neighbour attacker tells mimicked fakes apart), while trained fakes, fitted like own positives,
    sit where own rows do (both attackers near chance; without the fit matching in batch_scores
    they read 0.72 and 0.24 on benchmarks/pseudo_items.py's federation)."""
    from sklearn.metrics import roc_auc_score

    from fedunlearn.fl import uploads
    from fedunlearn.privacy.upload_attack import own_row_scores
    from fedunlearn.progress import Progress
    from fedunlearn.runs.assembly import federated_server

    sets = [*SMALL, "data.synthetic_users=120", "data.synthetic_items=600", "train.rounds=6", "eval.every=6",
            "defence.upload=pseudo-items", f"defence.pseudo_rows={rows_like}"]  # fmt: skip
    config = load_config(None, sets)
    federation = build_federation(config.data, 0)
    pool = InProcessPool(config, federation)
    last, padded, train, pad = {}, {}, pool.train, uploads.pad_pseudo_items

    def keep_last(*args, **kwargs):
        replies = train(*args, **kwargs)
        last.update({reply.value.client_id: reply.value for reply in replies})
        return replies

    def pad_and_note(update, *args, **kwargs):
        sent = pad(update, *args, **kwargs)
        padded[update.client_id] = np.setdiff1d(sent.item_ids, update.item_ids)
        return sent

    monkeypatch.setattr(pool, "train", keep_last)
    monkeypatch.setattr(uploads, "pad_pseudo_items", pad_and_note)
    federated_server(config, federation, pool, Progress(6, False)).run()
    aucs = {"residual": [], "neighbour": []}
    for index in range(federation.n_clients):
        data = federation.client(index)
        update = last[data.client_id]
        fakes = fake_positives(data, config) if rows_like == "trained" else padded[data.client_id]
        own, fake = np.isin(update.item_ids, data.train_items), np.isin(update.item_ids, fakes)
        for name, score in own_row_scores(update, pool.model.row_keys).items():
            aucs[name].append(roc_auc_score(own[own | fake], score[own | fake]))
    medians = {name: float(np.median(values)) for name, values in aucs.items()}
    if rows_like == "mimic":
        assert medians["neighbour"] > 0.95, medians
    else:
        assert abs(medians["residual"] - 0.5) < 0.06 and abs(medians["neighbour"] - 0.5) < 0.06, medians


@pytest.mark.flower
def test_trained_pseudo_items_on_flower_give_the_inprocess_run(tmp_path):
    """The clients train their fakes inside the ClientApp too, and the server accepts every reply."""
    import pandas as pd
    from helpers import run_cli

    sets = [*SMALL, "data.synthetic_users=12", "train.rounds=2", "eval.every=2", *TRAINED]
    flower, inprocess = (pd.read_csv(run_cli(sets, engine, tmp_path / engine) / "metrics.csv").drop(columns="seconds")
                         for engine in ("flower", "inprocess"))  # fmt: skip
    pd.testing.assert_frame_equal(flower, inprocess)
    assert (flower["rejected"] == 0).all()


def test_a_minibatch_of_fakes_only_takes_the_own_positives_logits():
    config = load_config(None, SMALL)
    split = build_model(config.model, 50)
    rng = np.random.default_rng(0)
    shared, user_np = split.init_shared(rng), split.init_user(rng)
    user = {key: torch.tensor(value, requires_grad=True) for key, value in user_np.items()}
    pos = {key: torch.tensor(shared[key][:3], requires_grad=True) for key in split.row_keys}
    neg = {key: torch.tensor(shared[key][10:19].reshape(3, 3, -1)) for key in split.row_keys}
    own_rows = {key: torch.tensor(shared[key][30:32]) for key in split.row_keys}
    positive, _ = batch_scores(split, user, {}, pos, neg, np.zeros(3, dtype=bool), own_rows)
    reference = split.score(user, own_rows, {}).detach().numpy()
    np.testing.assert_allclose(positive.detach().numpy(), reference[[0, 1, 0]], rtol=1e-5)
    with pytest.raises(ValueError, match="fake positives only"):
        batch_scores(split, user, {}, pos, neg, np.zeros(3, dtype=bool))


def test_the_fru_sampler_never_draws_a_positive_as_a_negative(tmp_path):
    """FRU's informative pool is built around the client's own items; its trained fakes and an
    attacker's promoted target are positives too, and must not come back as its negatives."""
    from fedunlearn.fl.client import plan_local_training
    from fedunlearn.runs.runner import schedule_and_history

    config = load_config(None, [*SMALL, *TRAINED, "train.negative_sampler=fru", "unlearn.beta=1.0",
                                "unlearn.poison=true", 'unlearn.drop="5@2"'])  # fmt: skip
    federation = build_federation(config.data, 0)
    config, _, _ = schedule_and_history(config, federation, tmp_path)  # the attackers: the leaving clients
    pool = InProcessPool(config, federation)
    shared = pool.model.init_shared(np.random.default_rng(1))
    attackers = 0
    for index in range(federation.n_clients):
        plan = plan_local_training(pool.model, federation.client(index), pool.user(index), shared, config, 1)
        negatives = plan.touched[plan.local_neg]
        assert plan.real < len(plan.positives) and not np.isin(negatives, plan.positives).any()
        attackers += plan.attacker
    assert attackers >= 1 and config.unlearn.target_item >= 0  # an attacker trained its promoted target


def test_an_ascending_client_trains_its_fakes_too_so_its_ascent_upload_reads_like_the_others():
    from fedunlearn.fl.client import local_train

    config = load_config(None, [*SMALL, *TRAINED])
    federation = build_federation(config.data, 0)
    pool = InProcessPool(config, federation)
    shared = pool.model.init_shared(np.random.default_rng(1))
    data = federation.client(0)
    fakes = fake_positives(data, config)
    update, _ = local_train(pool.model, data, pool.user(0), shared, config, 1, torch.device("cpu"), ascent=True)
    assert set(fakes) <= set(update.item_ids) and update.num_examples == len(data.train_items) + len(fakes)
    assert update.loss < 0  # it ascended
