"""Run one configured job (federated on an engine, central, or popularity) and time it."""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import numpy as np

from fedunlearn.config import Config, ModelConfig, audits_privacy, derive
from fedunlearn.errors import FedUnlearnError
from fedunlearn.fl.checkpoint import Checkpoint
from fedunlearn.fl.federation import Federation, build_federation, cached_federation
from fedunlearn.fl.history import HistoryStore
from fedunlearn.fl.replies import LOSS_CAP
from fedunlearn.fl.rounds import FederatedServer, FederationResult, reasons_text
from fedunlearn.fl.schedule import build_schedule
from fedunlearn.fl.uploads import run_epsilon
from fedunlearn.models import build_model
from fedunlearn.progress import Progress
from fedunlearn.runs.assembly import federated_server, reproducible_torch
from fedunlearn.unlearning.methods import history_policy

Trainer = Callable[[Config, HistoryStore | None, dict[int, list[str]]], FederationResult]
LOSS_ROSE = 1.5  # a final loss over this x the first is a rise, not the drift of a run that barely moved


@dataclass
class RunOutcome:
    config: Config  # the config that ran: the engine `auto` chose, the attackers a poisoned schedule named
    result: FederationResult
    info: dict[str, Any] = field(default_factory=dict)


def execute(config: Config, folder: Path, show_progress: bool = True) -> RunOutcome:
    """Run the configured job; `folder` (the staging results folder) receives the history database and
    the resume checkpoint, and a federated run on a single-machine engine continues from that
    checkpoint when the folder holds one (central, popularity and Flower runs start afresh)."""
    started = time.perf_counter()
    federation = build_federation(config.data, config.run.seed)
    config = recorded_config(config, federation)  # the drop schedule is checked where it is built
    info = run_facts(config, federation)
    mode = config.run.mode
    if mode == "popularity":
        from fedunlearn.reference.popularity import rank_by_popularity

        result = rank_by_popularity(config, federation)
    elif mode == "central":
        from fedunlearn.reference.central import train_central

        progress = Progress(config.central.epochs, show_progress, label="epochs")
        try:
            with reproducible_torch(config.run.num_cpus):
                result = train_central(config, federation, progress)
        finally:
            progress.close()
        warn_if_unlearned(config, federation, result, info)
    else:
        config, result = _federated(config, federation, folder, show_progress, info)
    # the whole run's wall time; a resumed run adds its interrupted legs' rounds (their start-up is not known)
    info["seconds"] = round(time.perf_counter() - started + result.earlier_seconds, 2)
    if result.earlier_seconds:
        info["earlier_legs_seconds"] = round(result.earlier_seconds, 2)
    return RunOutcome(config, result, info)


def run_facts(config: Config, federation: Federation) -> dict[str, Any]:
    """What final.json and summary.md say of the data a run trained on (every engine, `flwr run` too)."""
    return {"dataset": config.data.dataset, "clients": federation.n_clients, "items": federation.n_items}


def warn_if_unlearned(config: Config, federation: Federation, result: FederationResult, info: dict[str, Any]) -> None:
    """A trained model that ranks the held-out items no better than item popularity has learned
    nothing a count could not tell: say so (final.json keeps the popularity ranker's HR@10)."""
    from fedunlearn.reference.popularity import rank_by_popularity

    if "HR@10" not in result.final:
        return
    left = [client for event in result.events for client in event["clients"]]  # the retained users' reference
    popular = rank_by_popularity(config, federation, left).final["HR@10"]
    info["popularity_HR@10"] = popular
    rounds = sorted({event["round"] for event in result.events})  # each event: the users retained right after it
    gone = {r: [c for event in result.events if event["round"] <= r for c in event["clients"]] for r in rounds}
    warn_if_unlearning_collapsed(result, {r: rank_by_popularity(config, federation, gone[r]).final["HR@10"]
                                          for r in rounds})  # fmt: skip
    if result.final["HR@10"] <= popular:
        federated = config.run.mode == "federated"
        fix = "train.lr or train.server_lr" if federated else "central.lr"
        losses = result.losses
        if diverged_uploads(info):
            advice = f"some clients' training diverged (above): lower {fix}"
        elif len(losses) > 1 and losses[-1] > LOSS_ROSE * losses[0]:  # a run that learns lowers its loss
            unit = "round" if federated else "epoch"
            if federated and "ldp" in config.defence.upload:  # the noise, not the step, may carry it up
                fix += ", or the LDP noise (raise defence.ldp_epsilon)"
            advice = (f"its training loss rose from {losses[0]:.3g} ({unit} 1) to {losses[-1]:.3g} ({unit} "
                      f"{len(losses)}): the training is unstable; lower {fix}")  # fmt: skip
        else:
            advice = (f"the model has not learned yet; train longer "
                      f"({'train.rounds' if federated else 'central.epochs'}) or check the data")  # fmt: skip
        print(f"fedunlearn: warning: HR@10 {result.final['HR@10']:.4f} is no better than ranking by popularity "
              f"({popular:.4f}): {advice}", file=sys.stderr)  # fmt: skip


def diverged_uploads(info: dict[str, Any]) -> int:
    """Uploads rejected for a training loss outside [0, LOSS_CAP]: no fault kind makes one, so each is
    a client whose local training diverged (or that lied about its loss)."""
    return int(info.get("rejected_updates", {}).get("loss", 0))


def warn_if_clients_diverged(info: dict[str, Any]) -> None:
    """A run whose mean loss stays under train.max_loss_growth can still have lost many clients'
    updates to divergence (ML-100K defaults at train.lr = 3: 297 of 600 in round 5, HR@10 below
    popularity): the model is averaged over the rest, which is not the run the config describes."""
    count = diverged_uploads(info)
    if count:
        print(f"fedunlearn: warning: {count} uploads were rejected for a training loss outside [0, {LOSS_CAP:g}] "
              "(metrics.csv rejected_loss): those clients' training diverged and the model is averaged over the "
              "rest; lower train.lr or train.server_lr", file=sys.stderr)  # fmt: skip


def warn_if_unlearning_collapsed(result: FederationResult, popular: dict[int, float]) -> None:
    """An unlearned model (each drop event's, and each method `unlearn.compare` tried) that ranks
    the retained users' held-out items no better than item popularity (`popular`, per event: over
    the users retained right after it) has been broken by the removal (NCF under an early FedEraser
    rule ranked items upside down, HR@10 0.05 against Retrain's 0.53, and printed no word of it):
    say so, per method and event."""
    rows = [{"event": event["round"], "method": event["method"], "HR@10": event["after"]["HR@10"]}
            for event in result.events] + list(result.comparison)  # fmt: skip
    rows = list({(row["event"], row["method"]): row for row in rows}.values())  # the run's method is compared too
    for row in rows:
        reference = popular[row["event"]]
        if row["method"] not in ("none", "retrain") and row.get("HR@10", np.inf) <= reference:  # not the references
            print(f"fedunlearn: warning: after the drop before round {row['event']}, {row['method']}'s model ranks "
                  f"the retained users' items no better than popularity (HR@10 {row['HR@10']:.4f} against "
                  f"{reference:.4f}): if it ranked better before the drop, the removal broke it; compare with "
                  "Retrain (unlearn.compare)", file=sys.stderr)  # fmt: skip


IDLE_RETENTION = 0.1  # under this share of the step AttrCloak's retention loss barely shapes it


def warn_if_retention_idle(config: Config, report: Any) -> None:
    """AttrCloak's min-norm weight on raw gradients follows their sizes: where the retention gradient
    is far the larger (DD's training loss on a trained model, minibatch noise included) the min-norm
    point sits next to the attribute gradient, and the defence is an attribute-only descent whose
    only brake on utility is its stopping rule (docs/PRIVACY.md). Say so when the configured
    defence chose its weights so and its retention took under a tenth of the step."""
    from fedunlearn.privacy.stage import cloak_settings

    share = np.nan if report is None else report.retention_share
    if np.isnan(share) or cloak_settings(config.defence).fixed_weight is not None or share >= IDLE_RETENTION:
        return
    print(
        f"fedunlearn: warning: {config.defence.method}'s retention loss made {share:.3f} of its steps on average: "
        "the min-norm weight on raw gradients went to the attribute loss, so it acted as an attribute-only "
        "descent braked only by defence.cloak_stop (docs/PRIVACY.md, 'Where AttrCloak-DD's weight goes': "
        "defence.cloak_balance = \"unit\" keeps more utility and removes less)",
        file=sys.stderr,
    )


def warn_if_defence_left_readable(config: Config, report: Any) -> None:
    """Every client defended (defence.clients = "all"), yet an audited attacker still reads an
    attribute from the defended embeddings above its null band (relabelled balanced accuracy over
    null_95): say so per defence. AttrCloak stops at the null level of its own Gaussian separation
    of the class means and covariances, which a nonlinear attacker can pass (a review, a planted
    federation: XGBoost 0.662 after DD against null_95 0.556, no word said). With at-risk or listed
    clients the rest stay readable by design."""
    if report is None or report.table.empty or config.defence.clients != "all":
        return
    from fedunlearn.privacy.stage import POST_TRAINING

    table = report.table
    global_embedding = table[(table["view"] == "embedding") & (table["audit"] == "global")]
    readable = global_embedding["balanced_accuracy_relabelled"] > global_embedding["null_95"]
    defended = global_embedding["defence"].isin([method for method in POST_TRAINING if method != "none"])
    # the rows before any post-training defence: "none", or the upload defence's name (stage.py)
    before = {(row.attribute, row.attacker): bool(read) for row, read, post in
              zip(global_embedding.itertuples(), readable, defended) if not post}  # fmt: skip
    for defence, found in global_embedding[defended & readable].groupby("defence", sort=False):
        still = [row for row in found.itertuples() if before.get((row.attribute, row.attacker), True)]
        made = [row for row in found.itertuples() if not before.get((row.attribute, row.attacker), True)]
        parts = [f"{', '.join(map(_reading, still))}: the defence did not take these to chance"] if still else []
        parts += [f"{', '.join(map(_reading, made))}: within the band before it, so the defence made these "
                  "readable (pushing the classes past each other)"] if made else []  # fmt: skip
        print(f"fedunlearn: warning: after {defence}, attackers read the defended embeddings above the null band: "
              f"{'; '.join(parts)} (audit.csv)", file=sys.stderr)  # fmt: skip


def _reading(row: Any) -> str:
    return f"{row.attacker} on {row.attribute} {row.balanced_accuracy_relabelled:.3f} (null_95 {row.null_95:.3f})"


def check_model_fits(config: Config, federation: Federation) -> None:
    """Refuse a model whose parameters alone (item tables, every user part, dense layers) would not
    fit in this machine's memory, before anything of that size is allocated."""
    floats = parameter_floats(config.model, federation.n_items, federation.n_clients)
    needed, memory = 4 * floats, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if needed > memory / 4:  # training keeps several copies (gradients, Adam moments, the clients' copies)
        raise FedUnlearnError(
            f"model.dim = {config.model.dim} needs {needed / 2**30:.1f} GiB for the parameters alone "
            f"(this machine has {memory / 2**30:.0f} GiB): lower model.dim"
        )


def parameter_floats(model_config: ModelConfig, n_items: int, n_clients: int) -> int:
    """Floats of the item tables, every client's user part and the dense layers, read off two probes
    of width 1 and 2 with one item: every table is linear in model.dim and every dense layer affine
    in it, so nothing of the real size is built (a probe at the real width would allocate it)."""

    def probe(dim: int) -> tuple[int, int, int]:
        model = build_model(replace(model_config, dim=dim), 1)
        shared = model.init_shared(np.random.default_rng(0))
        dense = sum(value.size for key, value in shared.items() if key not in model.row_keys)
        return len(model.row_keys), len(model.init_user(np.random.default_rng(0))), dense

    (rows, users, dense_1), (_, _, dense_2) = probe(1), probe(2)
    dense = dense_1 + (dense_2 - dense_1) * (model_config.dim - 1)
    return (rows * n_items + users * n_clients) * model_config.dim + dense


def preflight(config: Config, federation: Federation | None = None) -> None:
    """Every check a run can make before it trains (the data loads, the model fits in memory, the
    audited attributes, the drop schedule), so that an experiment, a suite or a deployment says it
    before its first run starts."""
    federation = federation or cached_federation(config.data, config.run.seed)
    config = recorded_config(config, federation)
    if config.run.mode == "federated":
        checked_schedule(config, federation)


def recorded_config(config: Config, federation: Federation) -> Config:
    """The config as the run records it (the engine `auto` chose, the audit a single-machine engine
    runs for any defence), once the model is known to fit and the audited attributes to exist."""
    check_model_fits(config, federation)
    if config.run.mode != "federated":
        return config
    from fedunlearn.engines.choice import choose_engine

    config = derive(config, {"run.engine": choose_engine(config)})  # recorded as the engine that ran
    if config.run.engine != "flower" and audits_privacy(config):  # a single-machine engine audits any defence
        config = derive(config, {"audit.enabled": True})  # so the recorded config says the audit ran
    if config.audit.enabled or config.defence.method != "none" or config.defence.compare:
        from fedunlearn.privacy.audit import audited_attributes

        audited_attributes(config.audit, federation.dataset.attributes)
    return config


def schedule_and_history(
    config: Config, federation: Federation, folder: Path
) -> tuple[Config, dict[int, list[str]], HistoryStore | None]:
    """The config with the poisoning attackers and target filled in, the checked drop schedule, and
    the history database the server keeps when anyone leaves."""
    config, schedule = checked_schedule(config, federation)
    if not schedule:
        return config, schedule, None
    return config, schedule, HistoryStore(folder / "history.sqlite", history_policy(config.unlearn))


def checked_schedule(config: Config, federation: Federation) -> tuple[Config, dict[int, list[str]]]:
    """The drop schedule, checked against the federation and the other settings, and the config with
    the poisoning attackers and target filled in."""
    unlearn = config.unlearn
    excluded = set(config.data.exclude_clients)
    candidates = [c for c in federation.client_ids if c not in excluded]  # random drops draw among these
    schedule = build_schedule(unlearn.drop, "", federation.client_ids, config.train.rounds, config.run.seed)
    never_joined = sorted(excluded & {c for clients in schedule.values() for c in clients})
    if never_joined:
        raise FedUnlearnError(
            f"unlearn.drop names clients excluded by data.exclude_clients ({', '.join(never_joined[:5])}): "
            "they never took part, so there is nothing to forget"
        )
    if unlearn.drop_random.strip():
        schedule = build_schedule(unlearn.drop, unlearn.drop_random, candidates, config.train.rounds, config.run.seed)
    if not schedule and (unlearn.method != "none" or unlearn.compare or unlearn.poison):
        raise FedUnlearnError(
            "unlearn.method, unlearn.compare and unlearn.poison act at a drop event: add unlearn.drop or "
            "unlearn.drop_random (e.g. --drop-random 5%@10), or leave them at their defaults"
        )
    defends = config.defence.method != "none" or config.defence.compare
    listed = config.defence.client_ids if config.defence.clients == "listed" and defends else []
    leaving = {c for clients in schedule.values() for c in clients} | excluded
    absent = sorted(set(listed) - set(federation.client_ids)), sorted(set(listed) & leaving)
    if absent[0] or absent[1]:  # said now, not after all the training
        which = f"unknown clients {absent[0][:5]}" if absent[0] else f"clients {absent[1][:5]} who leave or never join"
        raise FedUnlearnError(f"defence.client_ids names {which}: list clients present at the end of training")
    if unlearn.target_item >= federation.n_items:
        raise FedUnlearnError(
            f"unlearn.target_item = {unlearn.target_item} but the catalogue has items 0..{federation.n_items - 1}: "
            "pick one in range, or -1 for the least popular"
        )
    if unlearn.poison:
        target = unlearn.target_item
        if target < 0:
            target = int(np.argmin(np.bincount(federation.split.train_items, minlength=federation.n_items)))
        attackers = sorted({c for clients in schedule.values() for c in clients})
        config = derive(config, {"unlearn.attackers": attackers, "unlearn.target_item": target})
    return config, schedule


def outcome_info(config: Config, result: FederationResult, history: HistoryStore | None) -> dict[str, Any]:
    """What final.json records of a federated run beyond its metrics, on every engine and under
    `flwr run`: the rejected replies by reason, the defence's time and reach, the history's size and
    the drop events (call it before the history is closed)."""
    info: dict[str, Any] = {f"rejected_{kind}": counts for kind, counts in result.rejected.items()}
    if result.ldp_uploads:  # defence.ldp_epsilon is per upload; a client's uploads compose over the run
        info["ldp_uploads_max"] = result.ldp_uploads
        info["ldp_epsilon_run"] = round(run_epsilon(config.defence, result.ldp_uploads), 2)
    if result.privacy is not None:
        if config.defence.method != "none":  # the defence kept (with defence.compare and none: every
            info["defence_seconds"] = round(result.privacy.defence_seconds, 2)  # defence's is in audit.csv)
            info["defence_steps"] = result.privacy.defence_steps
        info["defending_clients"] = result.privacy.defending
        if result.privacy.left_out:  # the clients holding a value too rare to sum
            info["left_out_of_defence"] = result.privacy.left_out
        if result.privacy.undefended:
            info["attributes_not_defended"] = result.privacy.undefended
        if result.privacy.upload_recovery is not None:
            recovery = dataclasses.asdict(result.privacy.upload_recovery)  # a figure of no client read is null
            info["upload_attack"] = {key: None if isinstance(value, float) and math.isnan(value) else value
                                     for key, value in recovery.items()}  # fmt: skip
    if result.defence:
        info["defence"] = result.defence
    if history is not None:
        info["history_bytes"] = history.bytes_by_kind()
        info["events"] = result.events
    return info


def _privacy(
    config: Config, federation: Federation, server: FederatedServer, pool: Any, result: FederationResult
) -> Any:
    """Audit and defend on the clients still in the federation after training (in-process or
    batched pool: the privacy stage reads their user parts as a simulation's auditor)."""
    from fedunlearn.privacy.stage import privacy_stage

    clients = list(server.active)
    users = [pool.user(i) for i in clients]
    uploads = None if result.uploads is None else {k: v[clients] for k, v in result.uploads.items()}

    def install(candidate: list[Any]) -> None:
        for index, user in zip(clients, candidate, strict=True):
            pool.set_user(index, user)

    def evaluate(candidate: list[Any]) -> dict[str, float]:
        install(candidate)
        metrics = server.evaluate()
        return {key: metrics[key] for key in ("HR@10", "NDCG@10")}

    report, users_after = privacy_stage(
        config, server.model, federation, clients, result.shared, users, uploads, evaluate, progress=server.progress
    )
    install(users_after)  # the clients keep the configured defence's embeddings
    return report


def plugged_engine(name: str) -> Any:
    """An engine that lives outside the core (the Flower simulation, in `server/`), registered under
    the `fedunlearn.engines` entry points of pyproject.toml, so the core never imports the glue."""
    found = entry_points(group="fedunlearn.engines", name=name)
    if not found:
        raise FedUnlearnError(f"run.engine = {name!r} is not registered: reinstall fedunlearn (pip install -e .)")
    return next(iter(found)).load()


def federated_job(
    config: Config, federation: Federation, folder: Path, train: Trainer, info: dict[str, Any]
) -> tuple[Config, FederationResult]:
    """A federated job on any engine (`train` runs the rounds and the privacy stage with the history
    and drop schedule it is given): the same set-up, record and warning for `fedunlearn run` and for
    `flwr run`."""
    config, schedule, history = schedule_and_history(config, federation, folder)
    try:
        result = train(config, history, schedule)
        info |= outcome_info(config, result, history)
        info.setdefault("torch_threads", 1)  # Flower: each ClientApp trains with one (clients.common.setup)
    finally:
        if history is not None:
            history.close()
    warn_if_clients_diverged(info)
    warn_if_unlearned(config, federation, result, info)
    warn_if_retention_idle(config, result.privacy)
    warn_if_defence_left_readable(config, result.privacy)
    rejected = info.get("rejected_evaluations")
    if rejected:  # no fault is injected into evaluations: a rejected one is a broken or lying client
        print(f"fedunlearn: warning: evaluation replies were rejected ({reasons_text(rejected)}): HR@10 and "
              "NDCG@10 are over the users whose replies passed (metrics.csv `evaluated`)", file=sys.stderr)  # fmt: skip
    return config, result


def _federated(
    config: Config, federation: Federation, folder: Path, show_progress: bool, info: dict[str, Any]
) -> tuple[Config, FederationResult]:
    if config.run.engine == "flower":  # the clients' state lived in the killed simulation: start afresh
        (folder / "history.sqlite").unlink(missing_ok=True)
        run_flower = plugged_engine("flower")

        def train(config: Config, history: HistoryStore | None, schedule: dict[int, list[str]]) -> FederationResult:
            return run_flower(config, history=history, schedule=schedule, show_progress=show_progress)[0]

        return federated_job(config, federation, folder, train, info)

    def train_here(config: Config, history: HistoryStore | None, schedule: dict[int, list[str]]) -> FederationResult:
        from fedunlearn.engines.choice import make_pool

        checkpoint = Checkpoint(folder, history)  # resumes from the last complete round, if any
        progress = Progress(config.train.rounds, show_progress)
        try:
            pool = make_pool(config, federation)
            info["torch_threads"] = min(pool.threads, os.cpu_count() or 1)  # as reproducible_torch sets them
            with reproducible_torch(pool.threads):
                server = federated_server(config, federation, pool, progress, history, schedule, checkpoint)
                result = server.run()
                if audits_privacy(config):  # its stages show on the same bar
                    result.privacy = _privacy(config, federation, server, pool, result)
            if hasattr(pool, "seconds"):  # the batched engine: where its training time went
                info["engine_seconds"] = {key: round(value, 3) for key, value in pool.seconds.items()}
            return result
        finally:
            progress.close()
            checkpoint.close()

    return federated_job(config, federation, folder, train_here, info)
