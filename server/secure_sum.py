"""One SecAgg+ round from our own Grid main loop: each chosen client adds a float vector, the server
learns only the sum.

Flower 1.41 ships SecAgg+ as `SecAggPlusWorkflow`, written for the legacy strategy loop and accepting
only a `LegacyContext`: it asks `context.strategy.configure_fit` whom to ask and what to send, reads
the round number and the parameters to broadcast from `context.state`, and hands the unmasked result
to `context.strategy.aggregate_fit`. So one secure sum here is one call of the workflow on a private
LegacyContext (the caller's own state is never touched) whose stand-in strategy names exactly our
nodes, ships `task` as the FitIns config and catches the aggregate. On the clients, `secaggplus_mod`
on the default "train" handler answers the protocol and calls the handler once, for the vector.

Arithmetic: each value x (|x| <= bound, else the client refuses) is stochastically rounded to an
integer in [0, Q] on the grid 2 bound / Q; the n masked integers are added modulo 2**32, which is
exact while n Q < 2**32, so Q is the largest such value up to 2**28 (the client rounds through int32).
With weight 1 per client the workflow returns the mean; times n it is the sum, off by at most
n * resolution(n, bound) per value."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import FitIns, FitRes, Parameters, parameters_to_ndarrays
from flwr.common.logger import FLOWER_LOGGER
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.serverapp import Grid

from clients.messages import BOUND

MODULUS = 2**32
MAX_QUANTIZATION = 2**28
NEIGHBOURS = 15  # each client's key shares go to this many (odd) others when there are more, not to all


def quantization_range(n_clients: int) -> int:
    """The finest grid whose n-fold sum (and the n weight factors, each Q) cannot wrap modulo 2**32.
    Even, so that a zero (at Q / 2 on the grid) is rounded exactly: rows nobody touched sum to zero."""
    largest = min(MAX_QUANTIZATION, (MODULUS - 1) // n_clients)
    return largest - largest % 2


def resolution(n_clients: int, bound: float) -> float:
    """The rounding grid's step; the sum is off by at most n times this per value."""
    return 2 * bound / quantization_range(n_clients)


def secure_sum(
    grid: Grid,
    node_ids: list[int],
    task: dict[str, Any],
    bound: float,
    timeout: float | None = None,
    on_reply: Callable[[Message], None] | None = None,
) -> np.ndarray:
    """Sum of the vectors the nodes contribute for `task` (values within +-bound), by SecAgg+.

    Raises, with the clients' reasons, if any node fails or drops out: the protocol itself would go
    on and leave it out of the sum. `on_reply` sees every good reply of every stage as the server
    received it (for audits and tests)."""
    nodes = sorted(set(node_ids))
    if len(nodes) < 2 or len(nodes) != len(node_ids):
        raise ValueError(f"a secure sum needs at least 2 clients, each once; got nodes {list(node_ids)}")
    catcher = _SumCatcher(nodes, grid, task | {BOUND: float(bound)})
    private = Context(grid.run.run_id, 0, {}, RecordDict(), {})
    context = LegacyContext(private, strategy=catcher)
    context.state.config_records["config"] = ConfigRecord({"current_round": 1})
    context.state.array_records["parameters"] = ArrayRecord()  # nothing to broadcast: the task says it all
    workflow = SecAggPlusWorkflow(
        num_shares=1.0 if len(nodes) <= NEIGHBOURS else NEIGHBOURS,  # SecAgg+: key shares to a few neighbours
        reconstruction_threshold=0.5,
        max_weight=1.0,
        clipping_range=float(bound),
        quantization_range=quantization_range(len(nodes)),
        modulus_range=MODULUS,
        timeout=timeout,
    )
    tap = _Tap(grid, on_reply)
    if not any(isinstance(known, _WorkflowChatter) for known in FLOWER_LOGGER.filters):
        FLOWER_LOGGER.addFilter(_WorkflowChatter())
    workflow(tap, context)
    if catcher.mean is None or catcher.contributors != len(nodes) or tap.errors:
        raise SecureSumError(len(nodes), sorted(set(tap.errors)))
    return catcher.mean * catcher.contributors


class _WorkflowChatter(logging.Filter):
    """The workflow's four INFO lines per secure sum, written for one legacy round: a run makes one
    per round and per defence step, and its "strategy sampled N clients (out of 0)" reads as an
    error (our nodes are named directly, not drawn from a client manager). Warnings and errors stay."""

    LINES = (
        "Secure aggregation commencing.",
        "Secure aggregation completed.",
        "configure_fit: strategy sampled %s clients (out of %s)",
        "aggregate_fit: received %s results and %s failures",
    )

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.INFO or record.msg not in self.LINES


class SecureSumError(RuntimeError):
    """A secure sum that did not complete, with the clients' own reasons."""

    def __init__(self, clients: int, reasons: list[str]) -> None:
        self.reasons = [_client_message(reason) for reason in reasons]
        super().__init__(f"secure sum over {clients} clients failed: {'; '.join(self.reasons) or 'see the log'}")

    @property
    def first_reason(self) -> str:
        return self.reasons[0] if self.reasons else "the protocol halted (see the log)"


def _client_message(reason: str) -> str:
    """The client's own message out of Flower's wrapping ("Exception ... occurred. Message: ...'>")."""
    message = reason.split("Message: ", 1)[-1]
    return message[:-2] if message.endswith("'>") else message


class _SumCatcher(Strategy):
    """The stand-in strategy: the workflow calls only configure_fit and aggregate_fit. Every FitRes it
    passes to aggregate_fit holds the same unmasked (weighted) mean."""

    def __init__(self, node_ids: list[int], grid: Grid, config: dict[str, Any]) -> None:
        self.proxies = [GridClientProxy(node, grid, grid.run.run_id) for node in node_ids]
        self.config = config
        self.mean: np.ndarray | None = None
        self.contributors = 0

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return None

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        return [(proxy, FitIns(parameters, dict(self.config))) for proxy in self.proxies]

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Any]]:
        self.contributors = len(results)
        if results:
            (self.mean,) = parameters_to_ndarrays(results[0][1].parameters)
        return None, {}

    def configure_evaluate(self, server_round: int, parameters: Parameters, client_manager: ClientManager) -> list:
        return []

    def aggregate_evaluate(self, server_round: int, results: list, failures: list) -> tuple[None, dict]:
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters) -> None:
        return None


class _Tap:
    """The grid, noting the reason of every failed reply of `send_and_receive` (the only grid call the
    workflow makes) and showing every other reply to `on_reply`."""

    def __init__(self, grid: Grid, on_reply: Callable[[Message], None] | None) -> None:
        self._grid = grid
        self._on_reply = on_reply
        self.errors: list[str] = []

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> list[Message]:
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        for reply in replies:
            if reply.has_error():
                self.errors.append(reply.error.reason.strip().splitlines()[-1])
            elif self._on_reply:
                self._on_reply(reply)
        return replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)
