"""Branches of a client's private state, so the server can try something on a copy of the
federation (`unlearn.compare`: every unlearning method on a fork, `server.pool.FlowerPool.fork`)
without changing the run.

A message whose task names a branch is handled as usual, but on that branch: `branch_mod` hands the
handler a context whose state is the branch's records and stores them back afterwards, so the
handlers never know. A branch is made lazily, the first time it reaches a client, as a copy of the
client's own state: nothing is broadcast, and a client the fork never talks to pays nothing. Its
records live in `context.state` under `branch:<name>/<key>`, with a marker `branch:<name>`
(a branch whose state was deleted, e.g. by Retrain's forget, must not be copied again).
`query.drop_branch` deletes them all. Messages without a branch (every message of the run itself,
the SecAgg+ stages) pass through untouched."""

from __future__ import annotations

import copy

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp.typing import ClientAppCallable

from clients.common import PINNED
from clients.messages import branch_of, read_drop_branch

PREFIX = "branch:"


def _marker(branch: str) -> str:
    return f"{PREFIX}{branch}"


def _key_prefix(branch: str) -> str:
    return f"{PREFIX}{branch}/"


def _checkout(state: RecordDict, branch: str) -> RecordDict:
    """The branch's records (created now from the client's own state if it is new)."""
    prefix = _key_prefix(branch)
    if _marker(branch) not in state:
        state[_marker(branch)] = ConfigRecord()
        for key, record in list(state.items()):
            if not key.startswith(PREFIX):
                state[prefix + key] = copy.deepcopy(record)
    return RecordDict({key[len(prefix) :]: record for key, record in state.items() if key.startswith(prefix)})


def _commit(state: RecordDict, branch: str, records: RecordDict) -> None:
    """Store the branch's records back, deletions included."""
    prefix = _key_prefix(branch)
    for key in [key for key in state.keys() if key.startswith(prefix) and key[len(prefix) :] not in records]:
        del state[key]
    for key, record in records.items():
        state[prefix + key] = record


def branch_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Run the handler on the branch the message names, or on the client's own state."""
    branch = branch_of(msg.content)
    if not branch:
        return call_next(msg, context)
    view = Context(
        context.run_id, context.node_id, context.node_config, _checkout(context.state, branch),
        context.run_config, context.series_id,
    )  # fmt: skip
    reply = call_next(msg, view)
    _commit(context.state, branch, view.state)
    if PINNED in view.state and PINNED not in context.state:  # a pin made on a branch binds the run:
        context.state[PINNED] = view.state[PINNED]  # dropping the branch must not lift it
    return reply


def drop_branch(msg: Message, context: Context) -> Message:
    """The fork is done: delete every record of its branch (nothing of it leaves the client)."""
    branch = read_drop_branch(msg.content)
    for key in [key for key in context.state.keys() if key == _marker(branch) or key.startswith(_key_prefix(branch))]:
        del context.state[key]
    return Message(RecordDict(), reply_to=msg)
