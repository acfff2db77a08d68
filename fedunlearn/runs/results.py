"""Results folders: written under a `.partial` name, renamed only when complete, final.json written
last, so a failed or killed run never leaves a folder that looks finished; an interrupted one can
be resumed (checkpoint.py)."""

from __future__ import annotations

import fcntl
import json
import math
import shutil
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import pandas as pd
import tomli_w

from fedunlearn.config import Config
from fedunlearn.errors import FedUnlearnError
from fedunlearn.fl.rounds import FederationResult
from fedunlearn.runs.tables import privacy_summary, readable

LOCK = ".lock"  # held (flock) by the process writing the folder
FINAL = "final.json"  # written last, into the renamed folder: its presence means finished


@dataclass
class Staging:
    """A results folder being written: `folder` (`<out>.partial`, or `out` itself when a kill came
    between the rename and final.json) becomes `out` once `final` is set and the block ends."""

    out: Path
    folder: Path
    lock: IO[str]
    final: dict[str, Any] | None = None


def partial_of(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def lock_folder(folder: Path, out: Path | None = None) -> IO[str]:
    """Hold the folder's lock file, or refuse at once if another process holds it."""
    out = folder if out is None else out
    handle = open(folder / LOCK, "a")  # noqa: SIM115 (held until the run ends)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise FedUnlearnError(f"another fedunlearn process is writing {out} now: wait for it or choose another --out")
    return handle


def unlock(folder: Path, handle: IO[str]) -> None:
    """The writer is done: the lock file goes, then the lock."""
    (folder / LOCK).unlink(missing_ok=True)
    handle.close()


def _new(out: Path) -> Staging:
    partial = partial_of(out)
    if out.exists():
        raise FedUnlearnError(f"results folder {out} already exists: choose another --out or remove it")
    if partial.exists():
        if (partial / LOCK).exists():
            lock_folder(partial, out).close()  # refuses at once while another run holds it
        raise FedUnlearnError(
            f"{partial} holds an interrupted run: continue it with fedunlearn run --resume {out}, or remove it"
        )
    partial.mkdir(parents=True)
    return Staging(out, partial, lock_folder(partial, out))


def run_folder_of(path: str | Path) -> Path:
    """The results folder a --resume argument names (`X` or `X.partial`)."""
    path = Path(path)
    return path.with_name(path.name[: -len(".partial")]) if path.name.endswith(".partial") else path


def _resumed(out: Path) -> Staging:
    partial = partial_of(out)
    if (out / FINAL).exists():
        raise FedUnlearnError(f"{out} is a finished run (it has {FINAL}): nothing to resume")
    for folder in (partial, out):
        if folder.is_dir() and (folder / "config.toml").is_file() and (folder / LOCK).exists():
            return Staging(out, folder, lock_folder(folder, out))
    raise FedUnlearnError(f"{out} is not an interrupted fedunlearn run: no {partial.name} with a config.toml")


@contextmanager
def staged(out: str | Path, resume: bool = False, resumable: bool = True) -> Iterator[Staging]:
    """A staging folder that becomes `out` only if the block finishes and sets `final`. A bad input
    (FedUnlearnError) removes a new one (a resumed one stays: a moved data file must not cost the
    rounds already run); an interruption or crash keeps it for `--resume`, never holding
    final.json, unless the run is not `resumable` (a ServerApp under `flwr run`: its clients' state
    lives on the SuperNodes), which removes it on any failure; a second writer is refused at once
    (the lock)."""
    out = Path(out) if Path(out).name else Path(out).resolve()  # "." or ".." names the folder it resolves to
    if not out.name:
        raise FedUnlearnError(f"--out {out} names no folder: give a new folder's path, e.g. results/run1")
    staging = _resumed(out) if resume else _new(out)
    try:
        yield staging
    except FedUnlearnError as error:
        staging.lock.close()
        if not resume:
            shutil.rmtree(staging.folder, ignore_errors=True)
            raise
        raise FedUnlearnError(f"{error} (the interrupted run stays in {staging.folder}: --resume it once that is "
                              "fixed, or remove it to start again with other settings)") from None  # fmt: skip
    except BaseException:
        staging.lock.close()
        if not resumable:
            shutil.rmtree(staging.folder, ignore_errors=True)
        raise
    if staging.final is None:
        raise RuntimeError("the staged block set no final record")
    publish(staging)


def publish(staging: Staging) -> None:
    """Rename the folder to `out`, write final.json last and atomically, drop the resume files."""
    from fedunlearn.fl.checkpoint import RESUME_FILE

    if staging.folder != staging.out:
        staging.folder.rename(staging.out)
    pending = staging.out / (FINAL + ".tmp")
    pending.write_text(json.dumps(staging.final, indent=2, allow_nan=False) + "\n")  # NaN is no result
    pending.rename(staging.out / FINAL)
    (staging.out / RESUME_FILE).unlink(missing_ok=True)
    unlock(staging.out, staging.lock)


EMBEDDINGS_FILE = "central_view_embeddings.npz"
ATTRIBUTE_PREFIX = "attribute_"  # the users' attribute values beside their embeddings in EMBEDDINGS_FILE


def saved_attributes(arrays: dict[str, np.ndarray]) -> pd.DataFrame:
    """The users' attribute values a central view holds (empty when written before they were kept)."""
    return pd.DataFrame({key[len(ATTRIBUTE_PREFIX) :]: value for key, value in arrays.items()
                         if key.startswith(ATTRIBUTE_PREFIX)})  # fmt: skip


def read_central_view(saved: Path) -> dict[str, np.ndarray]:
    """The arrays of an EMBEDDINGS_FILE (`clients`, `before`, maybe `after` and the attribute
    values), or a one-line error when the file is damaged."""
    try:
        with np.load(saved, allow_pickle=False) as stored:
            arrays = {key: stored[key] for key in stored.files}
        arrays["clients"]  # noqa: B018 (every central view names its clients)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
        raise FedUnlearnError(f"{saved} is damaged ({type(error).__name__}): rerun the audited run") from None
    return arrays


def write_config(folder: Path, config: Config) -> None:
    (folder / "config.toml").write_text(tomli_w.dumps(config.to_dict()))


def write_run(
    folder: str | Path, config: Config, result: FederationResult, info: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Resolved config, per-round metrics CSV and a short Markdown summary; returns the final record
    (final metrics, engine, sizes, seconds) that `publish` writes as final.json last."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_config(folder, config)
    pd.DataFrame(result.rounds).to_csv(folder / "metrics.csv", index=False)
    final = {"engine": config.run.engine, "mode": config.run.mode, **(info or {}), "metrics": result.final}
    try:
        json.dumps(final, allow_nan=False)  # a NaN anywhere is an error before anything is published
    except ValueError:
        bad = sorted(k for k, v in result.final.items() if isinstance(v, float) and not math.isfinite(v))
        raise FedUnlearnError(f"the run ended with non-finite results ({', '.join(bad) or 'in its record'}): "
                              "lower the learning rate (train.lr, central.lr)") from None  # fmt: skip
    if result.unlearned:
        np.savez_compressed(folder / "unlearned.npz", **result.unlearned)
    if result.privacy is not None:
        write_privacy(folder, config, result.privacy)
    if result.comparison:
        table = pd.DataFrame(result.comparison)
        table.to_csv(folder / "unlearning.csv", index=False)
        (folder / "unlearning.md").write_text(readable(table) + "\n")
    (folder / "summary.md").write_text(summary_markdown(folder, config, result, info or {}))  # links what is there
    return final


LINKED = {
    "metrics.csv": "metrics per evaluated round",
    "unlearning.md": "every unlearning method against Retrain at each drop event",
    "audit.md": "the attribute audit, every view, attacker and defence",
    "tradeoff.png": "attack accuracy against NDCG@10 per defence",
    "embeddings.png": "user embeddings by class before and after the defence",
    "final.json": "the machine-readable record",
}


def final_heading(config: Config, final: dict[str, Any]) -> str:
    """The metrics' heading, naming the round they come from: with eval.select = best_valid it is the
    round of the best validation HR@10, not the last (an independent check found it shown as final)."""
    unit = "round" if config.run.mode == "federated" else "epoch"
    where = f"{unit} {final['round']:g}" if isinstance(final.get("round"), int | float) else ""
    if config.eval.select == "best_valid" and where:
        return f"## Metrics of {where} (eval.select = best_valid: the best validation HR@10, not the last {unit})"
    return f"## Final metrics ({where})" if where else "## Final metrics"


def summary_markdown(folder: Path, config: Config, result: FederationResult, info: dict[str, Any]) -> str:
    """A readable digest of the run: what ran, the final metrics, each drop event, the privacy
    stage and the history, with links to the files that hold the rest."""
    metrics = {k: v for k, v in result.final.items() if "@" in k}
    what = f"engine {config.run.engine}" if config.run.mode == "federated" else f"mode {config.run.mode}"
    lines = [
        f"# fedunlearn run: {config.model.name.upper()} on {config.data.dataset} ({config.run.mode})",
        "",
        f"{info.get('clients', '?')} clients, {info.get('items', '?')} items, {what}, seed {config.run.seed}, "
        f"{info.get('seconds', 0.0):.1f} s.",
        "",
        final_heading(config, result.final),
        "",
        readable(pd.DataFrame([metrics])),
        "",
    ]
    if config.defence.method != "none":
        method = config.defence.method
        before = f"These score the model as trained, before {method} moved the user parts the clients keep"
        defence = info.get("defence")
        if isinstance(defence, dict):  # Flower without the audit: no audit table, the clients measured it
            after = f"after it: HR@10 {defence['HR@10']:.4f}, NDCG@10 {defence['NDCG@10']:.4f} (final.json, `defence`)"
        else:
            after = "the audit table gives NDCG@10 after it"
        lines += [f"{before}; {after}.", ""]
    if "popularity_HR@10" in info:
        lines += [f"Ranking by item popularity alone: HR@10 {info['popularity_HR@10']:.4f}.", ""]
    rejected = {kind: counts for kind, counts in info.items() if kind.startswith("rejected_") and counts}
    lines += [f"Rejected replies: {json.dumps(rejected) if rejected else 'none'}.", ""]
    if info.get("events"):
        rows = [
            {"round": event["round"], "clients removed": len(event["clients"]), "method": event["method"],
             "seconds": event["seconds"], "client-epochs": event["client_epochs"],
             "optimizer steps": event["optimizer_steps"], "retained HR@10": event["after"].get("HR@10"),
             "MIA AUC": event.get("MIA_AUC"), "history MB": event["history_bytes"]["file"] / 1e6}  # fmt: skip
            for event in info["events"]
        ]
        lines += ["## Drop events", "", readable(pd.DataFrame(rows)), ""]
        if config.unlearn.compare:
            lines += [f"These are the run's own {config.unlearn.method} at each event. unlearning.md tries every "
                      "method on a copy of the server first, each timed on its own: the same method's two "
                      "executions give the same figures, their seconds differ by what else the machine ran.",
                      ""]  # fmt: skip
    if "ldp_epsilon_run" in info:
        lines += [f"LDP: epsilon {config.defence.ldp_epsilon:g} per upload; a client sent up to "
                  f"{info['ldp_uploads_max']}, together epsilon {info['ldp_epsilon_run']:g} for the run.",
                  ""]  # fmt: skip
    if info.get("events"):
        held = max(event["history_bytes"]["file"] for event in info["events"]) / 1e6
        lines += [f"History the server held for the drop events: at most {held:.1f} MB (emptied after the last "
                  "event: only the empty file stays).", ""]  # fmt: skip
    if "defending_clients" in info:
        lines += ["## Attribute privacy", ""]
        if config.defence.compare:
            lines.append(f"defence.compare: every defence tried on {info['defending_clients']} clients, each from "
                         "the trained embeddings (audit.md; seconds per defence in audit.csv).")  # fmt: skip
        elif config.defence.method == "none":
            upload = config.defence.upload
            lines.append("The audit alone, no post-training defence" + (f"; the uploads were defended with {upload} "
                         "(audit.csv's defence column)." if upload != "none" else "."))  # fmt: skip
        elif info.get("defence_steps", 1) == 0:  # 0 since 2026-12-07; older records have no count
            lines.append(f"{config.defence.method} on {info['defending_clients']} clients took no step: every "
                         "audited attribute was at its null level already, or none could be attacked (audit.md); "
                         "the embeddings are as trained.")  # fmt: skip
        else:
            steps = f"{info['defence_steps']} steps, " if "defence_steps" in info else ""
            lines.append(f"{info['defending_clients']} clients defended with {config.defence.method} "
                         f"({steps}{info['defence_seconds']:.1f} s).")  # fmt: skip
        if info.get("left_out_of_defence"):
            lines.append(f"{info['left_out_of_defence']} clients were left out of the defence's sums and not "
                         "defended: each holds a value fewer than three clients share, whose class sums (or their "
                         "difference from another attribute's) would give them away.")  # fmt: skip
        if info.get("attributes_not_defended"):
            lines.append(f"Not defended (fewer than two classes of three or more clients): "
                         f"{', '.join(info['attributes_not_defended'])}.")  # fmt: skip
        if "upload_attack" in info:
            attack = {key: "-" if value is None else f"{value:.3f}" for key, value in info["upload_attack"].items()}
            lines.append(
                f"The upload-structure attack on one round's uploads recovered the clients' interactions at "
                f"precision {attack['precision']} / recall {attack['recall']} and the direction of their "
                f"embeddings at cosine {attack['cosine']} ({info['upload_attack']['clients']} clients; - where it "
                "read nothing)."
            )
        lines.append("")
        table = result.privacy.table if result.privacy is not None else pd.DataFrame()
        if table.empty:  # the console said so; the summary said nothing (a review)
            lines += ["No attribute could be attacked: too few clients per class, or no attribute values "
                      "(the console's notes name them).", ""]  # fmt: skip
        else:
            lines += ["The attack on the embeddings (as the console shows it; every view and attacker in audit.md): "
                      "a relabelled balanced accuracy above null_95 is an attribute still read.", "",
                      readable(privacy_summary(table), digits=3), ""]  # fmt: skip
    present = [name for name in LINKED if (folder / name).exists() or name == FINAL]  # final.json comes last
    lines += ["## Files", "", *(f"- [{name}]({name}): {LINKED[name]}" for name in present), ""]
    lines += ["Plots and tables of this and other runs: `fedunlearn report THIS_FOLDER ... --out REPORT`.", ""]
    return "\n".join(lines)


AUDIT_COUNTS = ("tested", "steps")  # users an attack was tested on, a defence's optimizer steps


def write_audit_csv(table: pd.DataFrame, path: Path) -> None:
    """An audit table as CSV, its counts as integers (rows without one, e.g. the local audit's,
    made them floats)."""
    table.astype({column: "Int64" for column in AUDIT_COUNTS if column in table}).to_csv(path, index=False)


def write_privacy(folder: Path, config: Config, report: Any) -> None:
    """audit.csv / audit.md, the embeddings the global audit saw with the users' attribute values
    (the central view: a simulation privilege, for `fedunlearn audit` and the plots) and the plots."""
    from fedunlearn.runs.plots import plot_embeddings, plot_tradeoff

    write_audit_csv(report.table, folder / "audit.csv")
    (folder / "audit.md").write_text(readable(report.table) + "\n")
    arrays = {"before": report.users_before} | ({} if report.users_after is None else {"after": report.users_after})
    labels = {f"{ATTRIBUTE_PREFIX}{name}": report.attributes[name].to_numpy(dtype=str) for name in report.attributes}
    np.savez_compressed(folder / EMBEDDINGS_FILE, clients=np.array(report.client_ids), **arrays, **labels)
    if report.users_after is not None:
        plot_embeddings(report.users_before, report.users_after, report.attributes, folder / "embeddings.png")
    if not report.table.empty:  # empty when no attribute had two classes with enough clients to attack
        plot_tradeoff(report.table, folder / "tradeoff.png")
