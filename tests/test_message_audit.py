"""Every message type the ServerApp can send, on one small Flower federation, and every reply
searched for what must never leave a client: its user embedding (as first drawn, after training,
after each defence: an exact, scaled, noisy or embedded copy), its attribute values and its
interaction list. The one exception is `query.audit_users`, the simulation's measurement oracle,
which the audit asks for and which must carry the embedding.

The run: 8 clients, 3 rounds, 3 clients leave before round 3 with every unlearning method tried
(`unlearn.compare`: calibration, replay, ascent, forks and their branches), the audit (its local
part through SecAgg+) and every post-training defence (`defence.compare`). `SENT` lists the message
types; a new one must join it, and it must equal what the ClientApp registers."""

import numpy as np
import pytest
from helpers import TINY, assert_vectors_absent, run_cli

from clients.app import app as client_app
from clients.messages import AUDIT_USERS, decode_audit_user, record_to_arrays
from fedunlearn.config import load_config
from fedunlearn.fl.client import init_user
from fedunlearn.fl.federation import build_federation
from fedunlearn.models import build_model

pytestmark = [
    pytest.mark.slow,
    pytest.mark.flower,
    pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning"),
]

CLIENTS = 8
SETTINGS = TINY + [
    f"data.synthetic_users={CLIENTS}",
    "train.rounds=3",
    "eval.every=3",
    'unlearn.drop="3@3"',
    "unlearn.method=federaser",
    "unlearn.compare=true",
    "audit.enabled=true",
    'audit.attributes=["gender", "age"]',
    "audit.attackers=[mlp]",
    "defence.compare=true",
    "defence.method=attrcloak-df",
    "defence.steps=2",
    "defence.cloak_stop=steps",  # AttrCloak takes its steps (the null stop may settle before any)
]
SENT = [
    "query.whoami",  # node discovery
    "train.fit",  # rounds, FedEraser's calibration, FRU's replay, gradient ascent
    "evaluate.default",
    "query.membership",  # the leaving clients' MIA
    "query.forget",
    "query.drop_branch",  # a compare trial's fork is done
    "query.audit_users",  # the oracle
    "train.default",  # SecAgg+ stages: class sums, fourth powers, products, feature sums, local audit
    "query.defence_start",
    "query.defence_step",
    "query.defence_finish",
    "query.regularised_step",
    "query.defence_end",
]


class RecordingGrid:
    """The ServerApp's grid, noting every message type sent and every reply received."""

    def __init__(self, grid):
        self._grid, self.sent, self.replies, self.contents = grid, set(), [], []

    def _note(self, messages):
        messages = list(messages)
        self.sent |= {m.metadata.message_type for m in messages}
        self.contents += [m.content for m in messages]
        return messages

    def _received(self, replies):
        replies = list(replies)
        self.replies += [(m.metadata.message_type, m.content) for m in replies if m.has_content()]
        return replies

    def push_messages(self, messages):
        return self._grid.push_messages(self._note(messages))

    def pull_messages(self, message_ids):
        return self._received(self._grid.pull_messages(message_ids))

    def send_and_receive(self, messages, *, timeout=None):
        return self._received(self._grid.send_and_receive(self._note(messages), timeout=timeout))

    def __getattr__(self, name):
        return getattr(self._grid, name)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    import server.pool

    grids = []
    original = server.pool.FlowerPool.__init__

    def recording(self, grid, *args, **kwargs):
        grids.append(RecordingGrid(grid))
        original(self, grids[-1], *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(server.pool.FlowerPool, "__init__", recording)
        run_cli(SETTINGS, "flower", tmp_path_factory.mktemp("audit") / "run")
    (grid,) = grids
    return grid


def _full(message_type):
    return message_type if "." in message_type else f"{message_type}.default"


def test_the_run_sends_every_message_type_the_client_app_handles(recorded):
    assert {_full(kind) for kind in recorded.sent} == set(SENT)
    assert set(SENT) == set(client_app._registered_funcs)  # a new handler must join SENT


def test_no_reply_but_the_oracles_carries_an_embedding_an_attribute_or_an_interaction_list(recorded):
    config = load_config(None, SETTINGS)
    federation = build_federation(config.data, config.run.seed)
    model = build_model(config.model, federation.n_items)
    oracle = [content for kind, content in recorded.replies if _full(kind) == AUDIT_USERS]
    assert oracle, "the audit asked the oracle nothing: the search would have no trained embeddings"
    drawn = [init_user(model, config.run.seed, client) for client in federation.client_ids]
    held = [decode_audit_user(content)[1] for content in oracle]  # trained, then after each defence
    vectors = np.stack([np.concatenate([user[key] for key in sorted(user)]) for user in drawn + held])
    attributes = {str(value) for value in federation.dataset.attributes.to_numpy().ravel()}
    interactions = [np.sort(federation.split.train_of(i)) for i in range(federation.n_clients)]
    others = [(kind, content) for kind, content in recorded.replies if _full(kind) != AUDIT_USERS]
    assert {_full(kind) for kind, _ in others} == set(SENT) - {AUDIT_USERS}  # every kind's replies searched
    for kind, content in others:
        assert_vectors_absent(content, vectors)
        for record in content.config_records.values():
            for key, value in record.items():
                if key not in ("client-id", "index"):  # the sender's identity is what the protocol sends
                    values = value if isinstance(value, list) else [value]
                    assert not any(isinstance(v, str) and v in attributes for v in values), (kind, key)
        for record in content.array_records.values():
            for array in record_to_arrays(record).values():
                flat = np.sort(np.asarray(array).ravel())
                assert not any(len(flat) == len(items) and np.array_equal(flat, items) for items in interactions), kind
    print(f"searched {len(others)} replies of {len({_full(k) for k, _ in others})} message types")


def test_no_message_the_server_sends_names_the_leaving_client(recorded):
    """The config every message carries held the drop schedule: each client read who would leave,
    and every message after the event named who had."""
    assert recorded.contents
    for content in recorded.contents:
        for record in content.config_records.values():
            for value in record.values():
                assert not (isinstance(value, str) and "3@3" in value)
