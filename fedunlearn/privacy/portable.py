"""Attackers as data: the only form in which a client accepts an attacker from the server.

The local audit and a client's own decision to defend run the attacker the server trained. It used
to travel pickled, so any server could run code on every client (a pickle that reads the user part
and sends it back). It now travels as arrays and a JSON description in an `.npz` read with
`allow_pickle=False`; the client rebuilds the classifier through the library's documented fitted
attributes (scikit-learn's MLP and scaler) or model format (XGBoost's UBJSON), so nothing the
server sends is executed, and the rebuilt attacker answers exactly as the server's.
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np

from fedunlearn.privacy.attacks import Attacker

_MLP = ("mean_", "scale_", "var_")  # StandardScaler's fitted attributes that transform reads
_LOGISTIC = ("coef_", "intercept_", "classes_")  # LogisticRegression's, that predict_proba reads


def attacker_to_bytes(attacker: Attacker) -> bytes:
    """The attacker as data: the registered MLP and XGBoost ones, or a logistic regression; another
    kind of classifier cannot travel (ValueError naming it)."""
    meta: dict[str, Any] = {"name": attacker.name, "attribute": attacker.attribute}
    arrays: dict[str, np.ndarray] = {"classes": np.asarray(attacker.classes).astype(str)}
    if attacker.prior is not None:
        arrays["prior"] = np.asarray(attacker.prior, dtype=np.float64)
    classifier = attacker.classifier
    if _is_xgboost(classifier):
        meta["kind"] = "xgboost"
        arrays["model"] = np.frombuffer(bytes(classifier.get_booster().save_raw(raw_format="ubj")), dtype=np.uint8)
    elif _is_scaled_mlp(classifier):
        scaler, mlp = classifier[0], classifier[-1]
        meta |= {"kind": "mlp", "layers": len(mlp.coefs_), "hidden": list(mlp.hidden_layer_sizes),
                 "activation": mlp.activation, "out_activation": mlp.out_activation_,
                 "outputs": int(mlp.n_outputs_), "features": int(mlp.n_features_in_)}  # fmt: skip
        arrays |= {f"scaler.{key}": getattr(scaler, key) for key in _MLP}
        arrays |= {f"coef.{i}": coef for i, coef in enumerate(mlp.coefs_)}
        arrays |= {f"intercept.{i}": intercept for i, intercept in enumerate(mlp.intercepts_)}
    elif type(classifier).__name__ == "LogisticRegression":  # a linear attacker (the defences' tests use one)
        meta["kind"] = "logistic"
        arrays |= {f"logistic.{key}": getattr(classifier, key) for key in _LOGISTIC}
    else:
        raise ValueError(f"attacker {attacker.name!r} ({type(classifier).__name__}) cannot be sent to clients as data: "
                         "only MLP, XGBoost and logistic-regression attackers can")  # fmt: skip
    arrays["meta"] = np.array(json.dumps(meta))
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # no object arrays: loaded with allow_pickle=False
    return buffer.getvalue()


def attacker_from_bytes(blob: bytes) -> Attacker:
    """The attacker rebuilt from data (ValueError for anything else: a pickle, a wrong layout)."""
    with np.load(io.BytesIO(blob), allow_pickle=False) as stored:
        arrays = {key: stored[key] for key in stored.files}
    meta = json.loads(str(arrays["meta"]))
    if meta.get("kind") == "xgboost":
        from xgboost import XGBClassifier

        classifier: Any = XGBClassifier()
        classifier.load_model(bytearray(arrays["model"].tobytes()))
    elif meta.get("kind") == "mlp":
        classifier = _rebuilt_mlp(meta, arrays)
    elif meta.get("kind") == "logistic":
        from sklearn.linear_model import LogisticRegression

        classifier = LogisticRegression()
        for key in _LOGISTIC:
            setattr(classifier, key, arrays[f"logistic.{key}"])
        classifier.n_features_in_ = classifier.coef_.shape[1]
    else:
        raise ValueError(f"an attacker of unknown kind {meta.get('kind')!r}")
    prior = arrays.get("prior")
    shares = prior is None or (prior.shape == arrays["classes"].shape and np.all(np.isfinite(prior))
                               and np.all(prior > 0) and abs(prior.sum() - 1) < 1e-6)  # fmt: skip
    if not shares:
        raise ValueError(
            f"an attacker whose class shares {prior.tolist()} do not fit its {len(arrays['classes'])} classes"
        )
    return Attacker(str(meta["name"]), str(meta["attribute"]), arrays["classes"], classifier, prior)


def _rebuilt_mlp(meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> Any:
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler()
    for key in _MLP:
        setattr(scaler, key, arrays[f"scaler.{key}"])
    scaler.n_features_in_ = meta["features"]
    mlp = MLPClassifier(hidden_layer_sizes=tuple(meta["hidden"]), activation=meta["activation"])
    mlp.coefs_ = [arrays[f"coef.{i}"] for i in range(meta["layers"])]
    mlp.intercepts_ = [arrays[f"intercept.{i}"] for i in range(meta["layers"])]
    mlp.n_layers_, mlp.n_outputs_ = meta["layers"] + 1, meta["outputs"]
    mlp.out_activation_, mlp.n_features_in_ = meta["out_activation"], meta["features"]
    mlp.classes_ = np.arange(len(arrays["classes"]))  # trained on the encoded classes (attacks.train_attacker)
    return make_pipeline(scaler, mlp)


def _is_xgboost(classifier: Any) -> bool:
    return type(classifier).__name__ == "XGBClassifier" and type(classifier).__module__.startswith("xgboost")


def _is_scaled_mlp(classifier: Any) -> bool:
    steps = getattr(classifier, "steps", None)
    names = [type(step).__name__ for _, step in steps] if steps else []
    return names == ["StandardScaler", "MLPClassifier"]
