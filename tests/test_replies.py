"""The server checks every client reply before it touches the model: each malformed kind is
rejected for its own reason, and a good reply passes untouched."""

from dataclasses import replace

import numpy as np
import pytest

from fedunlearn.fl.replies import Reply, ReplyLimits, check_replies
from fedunlearn.fl.updates import ClientEvaluation, ClientUpdate
from fedunlearn.models.mf import MF

IDS = ["a", "b", "c", "d"]
MODEL = MF(n_items=10, dim=3, init_std=0.1)
SHARED = MODEL.init_shared(np.random.default_rng(0))
LIMITS = ReplyLimits.of(MODEL, SHARED, IDS, np.array([5, 5, 5, 5]), 9, full_ranking=False)  # calls ask 1 epoch


def upload(client="a", items=(1, 4, 7), scale=0.1, examples=3):
    rows = np.full((len(items), 3), scale, dtype=np.float32)
    return ClientUpdate(client, examples, np.array(items), {"item_emb": rows}, {}, loss=0.6, epochs=1.0, steps=2)


def rejected_reason(update, sender=0, limits=LIMITS):
    values, rejected, _ = check_replies([Reply(sender, update)], [sender], limits)
    assert values == [] and sum(rejected.values()) == 1
    return next(iter(rejected))


def test_a_well_formed_upload_passes_unchanged():
    good = upload()
    values, rejected, _ = check_replies([Reply(0, good)], [0], LIMITS)
    assert values == [good] and not rejected


@pytest.mark.parametrize(
    ("broken", "reason"),
    [
        (upload(client="b"), "spoof_id"),
        (upload(items=(1, 4, 10)), "item_range"),
        (upload(items=(-1, 4, 7)), "item_range"),
        (upload(items=(4, 4, 7)), "item_range"),
        (replace(upload(), item_ids=np.array([1.0, 4.0, 7.0])), "item_range"),
        (replace(upload(), rows={"item_emb": np.zeros((3, 2), np.float32)}), "shape"),
        (replace(upload(), rows={"item_emb": np.zeros((1, 3), np.float32)}), "shape"),  # broadcastable, still wrong
        (replace(upload(), rows={"item_emb": np.zeros((3, 3), np.int64)}), "shape"),
        (replace(upload(), rows={}), "shape"),
        (replace(upload(), dense={"extra": np.zeros(2, np.float32)}), "shape"),
        (upload(scale=np.nan), "nan"),
        (upload(scale=np.inf), "inf"),
        (replace(upload(), loss=float("nan")), "nan"),
        (replace(upload(), loss=-2.5e4), "loss"),  # a negative training loss: no model has one
        (replace(upload(), loss=2.5e4), "loss"),  # it would set the divergence check's baseline
        (upload(examples=0), "num_examples"),
        (upload(examples=6), "num_examples"),  # more than the client holds
        (replace(upload(), steps=0), "steps"),
        (replace(upload(), steps=4), "steps"),  # 3 examples in one epoch make at most 3 minibatches
        (replace(upload(), epochs=1e9, steps=1), "epochs"),  # it would count 1e9 client-epochs in the costs
        (replace(upload(), epochs=0.0), "epochs"),
        (upload(examples=2.5), "num_examples"),
    ],
)
def test_each_malformed_upload_is_rejected_for_its_reason(broken, reason):
    assert rejected_reason(broken) == reason


def test_claimed_costs_are_bounded_by_what_the_call_asked_for():
    """Claimed epochs and steps add up to the unlearning costs: a half-epoch calibration cannot
    claim a full epoch, nor more minibatches than train.batch_size allows."""
    half, two = replace(LIMITS, epochs=0.5), replace(LIMITS, epochs=2.0)
    assert rejected_reason(replace(upload(), epochs=1.0, steps=3), limits=half) == "epochs"  # 3 examples, not 2
    assert check_replies([Reply(0, replace(upload(), epochs=2 / 3, steps=2))], [0], half)[0]  # round(1.5) = 2
    tiny = replace(upload(examples=1), epochs=1.0, steps=1)  # one example is the least a client trains on
    assert check_replies([Reply(0, tiny)], [0], replace(LIMITS, epochs=0.1))[0]
    assert rejected_reason(replace(upload(), epochs=2.0, steps=7), limits=two) == "steps"  # 3 per epoch at most
    batched = replace(LIMITS, batch_size=2)  # 3 examples in minibatches of 2: at most 2 steps
    assert rejected_reason(replace(upload(), steps=3), limits=batched) == "steps"
    assert check_replies([Reply(0, replace(upload(), steps=2))], [0], batched)[0]


def test_a_gradient_ascent_reply_carries_minus_a_loss():
    ascent = replace(LIMITS, ascent=True)
    assert check_replies([Reply(0, replace(upload(), loss=-0.6))], [0], ascent)[0]
    assert rejected_reason(upload(), limits=ascent) == "loss"  # +0.6 is no ascent's loss
    assert rejected_reason(replace(upload(), loss=-0.6)) == "loss"


def test_replies_from_clients_not_asked_or_twice_are_rejected():
    replies = [Reply(0, upload()), Reply(0, upload()), Reply(2, upload(client="c"))]
    values, rejected, _ = check_replies(replies, [0, 1], LIMITS)
    assert len(values) == 1 and rejected == {"duplicate": 1, "unexpected": 1}


def test_failed_replies_are_counted_with_their_detail():
    replies = [Reply(0, failure="exception", detail="boom"), Reply(1, failure="timeout"), Reply(2, upload("c"))]
    values, rejected, details = check_replies(replies, [0, 1, 2], LIMITS)
    assert len(values) == 1 and rejected == {"exception": 1, "timeout": 1} and details == ["boom"]


def test_an_upload_far_above_the_median_norm_is_rejected_and_cannot_raise_the_bar():
    replies = [Reply(i, upload(client=c, scale=0.1 + 0.01 * i)) for i, c in enumerate("abc")]
    replies.append(Reply(3, upload(client="d", scale=0.1 * 1e6)))
    values, rejected, _ = check_replies(replies, [0, 1, 2, 3], LIMITS, norm_ratio=100.0)
    assert [v.client_id for v in values] == ["a", "b", "c"] and rejected == {"norm": 1}
    just_under = [Reply(0, upload("a", scale=0.1)), Reply(1, upload("b", scale=0.1)), Reply(2, upload("c", scale=9.9))]
    assert len(check_replies(just_under, [0, 1, 2], LIMITS, norm_ratio=100.0)[0]) == 3


@pytest.mark.parametrize(
    ("evaluation", "reason"),
    [
        (ClientEvaluation("a", rank=-1, valid_rank=0, full_rank=-1), "rank_range"),
        (ClientEvaluation("a", rank=10, valid_rank=0, full_rank=-1), "rank_range"),  # only 9 negatives
        (ClientEvaluation("a", rank=0, valid_rank=0, full_rank=3), "rank_range"),  # no full ranking was asked
        (ClientEvaluation("a", rank=0, valid_rank=0, full_rank=-1, target_rank=10), "rank_range"),
        (ClientEvaluation("a", rank=2.5, valid_rank=0, full_rank=-1), "rank_range"),  # a rank is a count
        (ClientEvaluation("a", rank=float("nan"), valid_rank=0, full_rank=-1), "rank_range"),  # int(nan) raised
        (ClientEvaluation("a", rank=0, valid_rank=float("inf"), full_rank=-1), "rank_range"),
        (ClientEvaluation("a", rank=0, valid_rank=0, full_rank=-1, target_rank=0), "rank_range"),  # no target here
        (ClientEvaluation("b", rank=0, valid_rank=0, full_rank=-1), "spoof_id"),
    ],
)
def test_impossible_evaluations_are_rejected(evaluation, reason):
    assert rejected_reason(evaluation) == reason
    good = ClientEvaluation("a", rank=9, valid_rank=0, full_rank=-1, target_rank=-1)
    assert check_replies([Reply(0, good)], [0], LIMITS)[0] == [good]
    ranked = ClientEvaluation("a", rank=9, valid_rank=0, full_rank=-1, target_rank=0)  # a run promoting an item
    assert check_replies([Reply(0, ranked)], [0], replace(LIMITS, target=True))[0] == [ranked]


def test_a_flower_reply_that_cannot_be_decoded_is_rejected_and_the_others_kept():
    """FlowerPool decoded each reply before the checks: a missing field raised KeyError and lost
    every other reply of the call; an extra array was dropped silently and the reply accepted."""
    from types import SimpleNamespace

    from flwr.app import Array, MetricRecord

    from clients.messages import arrays_to_record, decode_evaluation, decode_update, encode_evaluation, encode_update
    from server.pool import FlowerPool

    pool = SimpleNamespace(_sender=lambda reply: reply.metadata.src_node_id)

    def message(node, content):
        return SimpleNamespace(content=content, metadata=SimpleNamespace(src_node_id=node))

    missing, extra, typed = encode_update(upload("b")), encode_update(upload("c")), encode_update(upload("d"))
    missing["update"] = arrays_to_record({"rows.item_emb": np.ones((3, 3), np.float32)})  # no item_ids
    extra["update"] = arrays_to_record({**{k: v.numpy() for k, v in extra["update"].items()}, "secret": np.ones(2)})
    typed["metrics"] = MetricRecord({"num-examples": [3], "loss": 0.6, "epochs": 1.0, "steps": 2})
    empty = encode_update(upload("a"))  # an array with no bytes: np.load raises EOFError inside Flower
    empty["update"]["item_ids"] = Array(dtype="int64", shape=(3,), stype="numpy.ndarray", data=b"")
    sent = [message(0, encode_update(upload())), message(1, missing), message(2, extra), message(3, typed)]
    replies = [FlowerPool._decoded(pool, reply, decode_update) for reply in sent]
    values, rejected, details = check_replies(replies, [0, 1, 2, 3], LIMITS)
    assert [value.client_id for value in values] == ["a"] and rejected == {"shape": 3}
    assert FlowerPool._decoded(pool, message(0, empty), decode_update).failure == "shape"
    assert all(detail.startswith("malformed reply") for detail in details)
    evaluation = encode_evaluation(ClientEvaluation("a", rank=3, valid_rank=0, full_rank=-1))
    evaluation["metrics"]["extra"] = 1.0
    assert FlowerPool._decoded(pool, message(0, evaluation), decode_evaluation).failure == "shape"


def test_a_fractional_count_sent_through_flower_reaches_the_checks_unrounded():
    """decode_update / decode_evaluation used to int() the counts, so 2.7 examples became 2 before
    the check could see it; now the check rejects them."""
    from flwr.app import MetricRecord

    from clients.messages import decode_evaluation, decode_update, encode_evaluation, encode_update

    content = encode_update(upload())
    content["metrics"] = MetricRecord({"num-examples": 2.7, "loss": 0.6, "epochs": 1.0, "steps": 1.9})
    assert rejected_reason(decode_update(content)) == "num_examples"
    sent = encode_evaluation(ClientEvaluation("a", rank=3, valid_rank=0, full_rank=-1))
    sent["metrics"]["rank"] = 2.5
    values, rejected, _ = check_replies([Reply(0, decode_evaluation(sent))], [0], LIMITS)
    assert values == [] and rejected == {"rank_range": 1}
    assert decode_update(encode_update(upload())).num_examples == 3  # a whole count passes as an int


def test_a_flower_reply_naming_another_client_is_refused():
    """Membership and audit replies are keyed by the client id written in them: it must be the
    sending node's own, once (else one client's answer is filed under another, or lost)."""
    from types import SimpleNamespace

    from helpers import TINY

    from clients.messages import decode_membership, encode_membership
    from fedunlearn.config import load_config
    from fedunlearn.errors import FedUnlearnError
    from fedunlearn.fl.federation import cached_federation
    from server.pool import FlowerPool

    config = load_config(None, TINY)
    ids = cached_federation(config.data, config.run.seed).client_ids
    pool = SimpleNamespace(config=config, _sender=lambda reply: reply.metadata.src_node_id)

    def reply(node, claimed, auc=0.7):
        return SimpleNamespace(content=encode_membership(claimed, auc), metadata=SimpleNamespace(src_node_id=node))

    good = FlowerPool._by_sender(pool, [reply(0, ids[0]), reply(1, ids[1], 0.4)], decode_membership, "membership")
    assert good == {ids[0]: 0.7, ids[1]: 0.4}
    for replies in ([reply(0, ids[1])], [reply(0, ids[0]), reply(0, ids[0])]):
        with pytest.raises(FedUnlearnError, match="not its own or twice"):
            FlowerPool._by_sender(pool, replies, decode_membership, "membership")
