"""The batched trainer: every sampled client's local training as one tensor program (a reused
workspace, fused Adam on the active prefix, masked per-client losses, and two gradient strategies:
closed form for dot-product models, autograd otherwise). docs/ARCHITECTURE.md, the batched engine."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from fedunlearn.config import Config
from fedunlearn.fl.client import LocalPlan, UserMoments
from fedunlearn.models.base import Arrays, SplitModel, Tensors

CHUNK_ELEMENTS = 2**25  # floats of parameters (or scores) per group of clients: memory stays bounded at any size
GROWTH = 1.25  # a workspace buffer that must grow takes this much more than asked
ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8  # torch.optim.Adam's defaults, as the in-process client uses


@dataclass
class StepIndex:
    """Row indices of one optimizer step for the first `active` clients (padded to the batch size)."""

    active: int
    rows: int  # rows of the touched-row table owned by the active clients
    items: torch.Tensor  # (active, B, 1 + negatives): positive then negatives, into the row table
    mask: torch.Tensor  # (active, B) 1 for real examples
    sizes: torch.Tensor  # (active,) examples in each client's batch


class Workspace:
    """Scratch tensors kept across chunks and rounds: a freshly allocated 100 MB tensor costs more
    in page faults on first touch than the arithmetic done on it."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.buffers: dict[str, torch.Tensor] = {}

    def take(self, name: str, shape: tuple[int, ...], zero: bool = False) -> torch.Tensor:
        size = math.prod(shape)
        buffer = self.buffers.get(name)
        if buffer is None or buffer.numel() < size:  # headroom: the rows touched vary a little from round to round
            buffer = self.buffers[name] = torch.empty(math.ceil(size * GROWTH), device=self.device)
        view = buffer[:size].view(shape)
        return view.zero_() if zero else view


class KeptUserAdam:
    """Adam on the user tables resumed from each client's kept state (train.client_optimizer_state =
    "user"): clients come with different step counts, so the bias correction is per row (torch's
    Adam formula, per client)."""

    def __init__(self, moments: UserMoments, device: torch.device) -> None:
        self.steps = torch.as_tensor(moments.steps, device=device, dtype=torch.float64).unsqueeze(1)
        self.exp_avg = {key: torch.tensor(value, device=device) for key, value in moments.exp_avg.items()}
        self.exp_avg_sq = {key: torch.tensor(value, device=device) for key, value in moments.exp_avg_sq.items()}

    def step(self, key: str, param: torch.Tensor, grad: torch.Tensor, step: int, lr: float) -> None:
        beta1, beta2 = ADAM_BETAS
        active = len(param)
        exp_avg, exp_avg_sq = self.exp_avg[key][:active], self.exp_avg_sq[key][:active]
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        steps = self.steps[:active] + step
        step_size = (lr / (1 - beta1**steps)).float()
        denom = (exp_avg_sq.sqrt() / (1 - beta2**steps).sqrt().float()).add_(ADAM_EPS)
        param.addcdiv_(exp_avg * step_size, denom, value=-1.0)

    def moments(self, steps_taken: np.ndarray) -> UserMoments:
        return UserMoments(
            self.steps.squeeze(1).cpu().numpy().astype(np.int64) + steps_taken,
            {key: value.cpu().numpy() for key, value in self.exp_avg.items()},
            {key: value.cpu().numpy() for key, value in self.exp_avg_sq.items()},
        )


class Adam:
    """Adam (torch's fused kernel, one pass over every tensor) on a prefix of each parameter table,
    so clients that have finished their local steps keep their state untouched. Every active client
    is at the same step number, so one step count serves them all (except kept user state: `kept`)."""

    def __init__(self, lr: float, use_adam: bool, workspace: Workspace, kept: KeptUserAdam | None = None) -> None:
        self.lr, self.use_adam, self.workspace, self.kept = lr, use_adam, workspace, kept
        self.state: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # per table: exp_avg, exp_avg_sq

    def step(self, tables: dict[str, torch.Tensor], counts: dict[str, int], grads: list[torch.Tensor],
             step: int) -> None:  # fmt: skip
        if self.kept is not None:
            fresh = dict(zip(tables, grads, strict=True))
            for key in self.kept.exp_avg:
                self.kept.step(key, tables[key][: counts[key]], fresh.pop(key), step, self.lr)
            tables, grads = {key: tables[key] for key in fresh}, list(fresh.values())
        params = [tables[key][: counts[key]] for key in tables]
        grads = [grad.contiguous() for grad in grads]  # the fused kernel ignores strides (autograd may transpose)
        if not self.use_adam:
            torch._foreach_add_(params, grads, alpha=-self.lr)
            return
        for key, table in tables.items():
            if key not in self.state:
                moments = (self.workspace.take(f"{key}.{moment}", tuple(table.shape), zero=True) for moment in "mv")
                self.state[key] = tuple(moments)  # type: ignore[assignment]
        exp_avgs = [self.state[key][0][: counts[key]] for key in tables]
        exp_avg_sqs = [self.state[key][1][: counts[key]] for key in tables]
        steps = [torch.tensor(float(step), device=table.device) for table in params]
        beta1, beta2 = ADAM_BETAS
        torch._fused_adam_(
            params, grads, exp_avgs, exp_avg_sqs, [], steps, lr=self.lr, beta1=beta1, beta2=beta2,
            weight_decay=0.0, eps=ADAM_EPS, amsgrad=False, maximize=False,
        )  # fmt: skip


def client_losses(
    config: Config, positive: torch.Tensor, negative: torch.Tensor, mask: torch.Tensor, sizes: torch.Tensor
) -> torch.Tensor:
    """Each client's `recommendation_loss` over its own batch: (C, B) positives, (C, B, n) negatives."""
    if config.model.loss == "bpr":
        pairs = -F.logsigmoid(positive.unsqueeze(-1) - negative) * mask.unsqueeze(-1)
        return pairs.sum((1, 2)) / (sizes * negative.shape[-1])
    total = (F.softplus(-positive) * mask).sum(1) + (F.softplus(negative) * mask.unsqueeze(-1)).sum((1, 2))
    return total / (sizes * (1 + negative.shape[-1]))


class BatchedTrainer:
    """Trains one chunk of clients (already ordered by steps, most first) from the shared parameters."""

    def __init__(self, model: SplitModel, config: Config, device: torch.device) -> None:
        self.model, self.config, self.device = model, config, device
        self.workspace = Workspace(device)

    def step_indices(self, plans: list[LocalPlan], offsets: np.ndarray) -> list[StepIndex]:
        width = max(len(batch) for plan in plans for _, batch in plan.batches)
        negatives = self.config.model.negatives
        steps = []
        for step in range(len(plans[0].batches)):
            active = sum(1 for plan in plans if len(plan.batches) > step)
            items = np.empty((active, width, 1 + negatives), dtype=np.int64)
            mask = np.zeros((active, width), dtype=np.float32)
            for c, plan in enumerate(plans[:active]):
                epoch, batch = plan.batches[step]
                items[c] = offsets[c]  # padding points at a real row; the mask drops it
                items[c, : len(batch), 0] = offsets[c] + plan.local_pos[batch]
                items[c, : len(batch), 1:] = offsets[c] + plan.local_neg[epoch][batch]
                mask[c, : len(batch)] = 1
            steps.append(
                StepIndex(
                    active,
                    int(offsets[active]),
                    torch.as_tensor(items, device=self.device),
                    torch.as_tensor(mask, device=self.device),
                    torch.as_tensor(mask.sum(1), device=self.device),
                )
            )
        return steps

    def train(
        self, plans: list[LocalPlan], users: Arrays, shared: Arrays, ascent: bool, moments: UserMoments | None = None
    ) -> tuple[Arrays, list[Arrays], list[Arrays], np.ndarray]:
        """-> new user parts (C, .) per table, each client's changes of its touched rows and dense
        layers, and its mean loss per step. With `moments` (one row per client) Adam resumes the user
        tables from them, and they are replaced by the new state."""
        model, config, device = self.model, self.config, self.device
        lengths = np.array([len(plan.touched) for plan in plans])
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        everything = torch.as_tensor(np.concatenate([plan.touched for plan in plans]), device=device)
        initial = {key: torch.as_tensor(shared[key]).to(device) for key in shared}

        def gather(key: str, name: str) -> torch.Tensor:
            out = self.workspace.take(name, (len(everything), shared[key].shape[1]))
            return torch.index_select(initial[key], 0, everything, out=out)

        user = {key: torch.tensor(value, device=device) for key, value in users.items()}
        rows = {key: gather(key, f"{key}.rows") for key in model.row_keys}
        dense = {key: initial[key].repeat(len(plans), *([1] * shared[key].ndim)) for key in model.dense_keys(shared)}
        tables = {**user, **rows, **dense}
        # gradients of the row tables, one buffer each: zeroed for autograd's scatter (and cleared
        # after each step); the closed form writes every active row
        row_grads = {
            key: self.workspace.take(f"{key}.grad", tuple(table.shape), zero=not model.dot_product)
            for key, table in rows.items()
        }
        if model.dot_product:
            gradients: StepGradients = DotProductGradients(config, user, rows, row_grads, lengths, ascent)
        else:
            gradients = AutogradGradients(model, config, user, rows, dense, row_grads, ascent)
        kept = None if moments is None else KeptUserAdam(moments, device)
        optimizer = Adam(config.train.lr, config.train.optimizer == "adam", self.workspace, kept)
        losses = torch.zeros(len(plans), dtype=torch.float64, device=device)
        for number, index in enumerate(self.step_indices(plans, offsets), start=1):
            with torch.no_grad():
                grads, loss = gradients(index)
                counts = {key: (index.rows if key in rows else index.active) for key in tables}
                optimizer.step(tables, counts, [grads[key] for key in tables], number)
                gradients.clear(index)
            losses[: index.active] += loss.double()
        # a new array per table (the uploads outlive the workspace's next use), each client's rows a
        # view of it: a copy per client cost 40 us each, 9% of a round's training on ML-100K
        row_changes = {key: (rows[key] - gather(key, f"{key}.initial")).cpu().numpy() for key in rows}
        dense_changes = {key: (dense[key] - initial[key]).cpu().numpy() for key in dense}
        per_client_rows = [
            {key: table[offsets[c] : offsets[c + 1]] for key, table in row_changes.items()} for c in range(len(plans))
        ]
        per_client_dense = [{key: table[c] for key, table in dense_changes.items()} for c in range(len(plans))]
        steps_taken = np.array([len(plan.batches) for plan in plans])
        if kept is not None and moments is not None:
            new = kept.moments(steps_taken)
            moments.steps, moments.exp_avg, moments.exp_avg_sq = new.steps, new.exp_avg, new.exp_avg_sq
        mean_loss = losses.cpu().numpy() / steps_taken
        return {key: value.cpu().numpy() for key, value in user.items()}, per_client_rows, per_client_dense, mean_loss


class StepGradients(Protocol):
    def __call__(self, index: StepIndex) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Gradients of every table's active prefix for this step, and each active client's loss."""

    def clear(self, index: StepIndex) -> None:
        """Reset what the step wrote into the row-gradient buffers."""


class AutogradGradients:
    """Any model: autograd through `model.score` on the rows each example uses, scattered into the
    row-gradient buffers (and cleared there afterwards: a fresh dense gradient per step would write
    every active row each time)."""

    def __init__(self, model: SplitModel, config: Config, user: Tensors, rows: Tensors, dense: Tensors,
                 row_grads: Tensors, ascent: bool) -> None:  # fmt: skip
        self.model, self.config, self.ascent = model, config, ascent
        self.user, self.rows, self.dense, self.row_grads = user, rows, dense, row_grads

    def __call__(self, index: StepIndex) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        model, config, rows, active = self.model, self.config, self.rows, index.active
        with torch.enable_grad():
            small = {
                key: table[:active].detach().requires_grad_(True) for key, table in {**self.user, **self.dense}.items()
            }
            flat = index.items.reshape(-1)
            item_rows = {key: rows[key].index_select(0, flat).requires_grad_(True) for key in rows}
            scores = model.score(
                {key: small[key].unsqueeze(1) for key in self.user},
                {key: value.reshape(active, -1, value.shape[-1]) for key, value in item_rows.items()},
                {key: small[key] for key in self.dense},
            ).reshape(index.items.shape)
            loss = client_losses(config, scores[..., 0], scores[..., 1:], index.mask, index.sizes)
            if self.ascent:
                loss = -loss
            elif config.train.weight_decay:
                squares = sum((small[key] ** 2).sum(-1) for key in self.user)
                used = sum((item_rows[key] * item_rows[key]).sum(-1).reshape(index.items.shape) for key in rows)
                squares = squares + (used * index.mask.unsqueeze(-1)).sum((1, 2))
                loss = loss + config.train.weight_decay * squares / index.sizes
            inputs = {**small, **item_rows}
            grads = dict(zip(inputs, torch.autograd.grad(loss.sum(), list(inputs.values())), strict=True))
        for key in rows:
            self.row_grads[key].index_add_(0, flat, grads[key])
            grads[key] = self.row_grads[key][: index.rows]
        return grads, loss.detach()

    def clear(self, index: StepIndex) -> None:
        for buffer in self.row_grads.values():
            buffer.index_fill_(0, index.items.reshape(-1), 0.0)


class DotProductGradients:
    """Models whose score is user_emb . item_emb (MF): the gradients in closed form, a few dense
    passes over the active rows instead of a 64-wide gather and scatter per example. Each row r of
    client c gets the score s_r = u_c . v_r; an example's score is s at its row, so autograd runs
    on scalars only, giving c_r = dL/ds_r. Then dL/dv_r = c_r u_c + 2 wd n_r v_r / size_c (n_r: the
    row's uses in the batch) and dL/du_c = sum over c's rows of c_r v_r + 2 wd u_c / size_c. Both
    sums over a client's rows are sparse products with the (rows x clients) ownership pattern."""

    def __init__(self, config: Config, user: Tensors, rows: Tensors, row_grads: Tensors, lengths: np.ndarray,
                 ascent: bool) -> None:  # fmt: skip
        self.config, self.ascent = config, ascent
        (self.user,), (self.rows,), (self.row_grads,) = user.values(), rows.values(), row_grads.values()
        self.user_key, self.row_key = next(iter(user)), next(iter(rows))
        device = self.rows.device
        lengths_t = torch.as_tensor(lengths, device=device)
        self.owner = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths_t)
        self.offsets = torch.cat([lengths_t.new_zeros(1), lengths_t.cumsum(0)])
        self.positions = torch.arange(len(self.owner) + 1, device=device)
        self.ones = torch.ones(len(self.owner), device=device)

    def __call__(self, index: StepIndex) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        active, count = index.active, index.rows
        decay = 0.0 if self.ascent else self.config.train.weight_decay
        u, v, owner = self.user[:active], self.rows[:count], self.owner[:count]
        owned = _csr(self.positions[: count + 1], owner, self.ones[:count], (count, active))  # row r -> its client
        row_scores = torch.sparse.sampled_addmm(owned, v, u.T, beta=0.0).values()  # v_r . u_c at (r, c)
        flat = index.items.reshape(-1)
        with torch.enable_grad():
            row_scores = row_scores.detach().requires_grad_(True)
            scores = row_scores.index_select(0, flat).reshape(index.items.shape)  # backward: index_add_
            loss = client_losses(self.config, scores[..., 0], scores[..., 1:], index.mask, index.sizes)
            if self.ascent:
                loss = -loss
            (coefficient,) = torch.autograd.grad(loss.sum(), [row_scores])
        grad_rows = torch.index_select(u, 0, owner, out=self.row_grads[:count]).mul_(coefficient.unsqueeze(1))
        weights = _csr(self.offsets[: active + 1], self.positions[:count], coefficient, (active, count))
        grad_user = weights @ v  # client c: sum over its rows of c_r v_r
        loss = loss.detach()
        if decay:
            uses = torch.zeros(count, device=v.device).index_add_(
                0, flat, index.mask.unsqueeze(-1).expand(index.items.shape).reshape(-1)
            )
            grad_rows.addcmul_(v, (2 * decay * uses / index.sizes[owner]).unsqueeze(1))
            grad_user.add_(u * (2 * decay / index.sizes).unsqueeze(1))
            squares = torch.linalg.vector_norm(v, dim=-1).square_()
            row_squares = torch.zeros(active, device=v.device).index_add_(0, owner, uses * squares)
            loss = loss + decay * ((u * u).sum(-1) + row_squares) / index.sizes
        return {self.user_key: grad_user, self.row_key: grad_rows}, loss

    def clear(self, index: StepIndex) -> None:
        """Nothing to clear: every step overwrites its whole prefix of the buffer."""


def _csr(crow: torch.Tensor, columns: torch.Tensor, values: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    with warnings.catch_warnings():  # "CSR support is in beta": used here for two plain products
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, columns, values, size=size, check_invariants=False)
