"""Every post-training defence and every attacker, by name: the one place each is named; config,
the privacy stage and the Flower glue read it. Free of the project's other modules (the
configuration validates against it)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DefenceEntry:
    loop: str  # "attrcloak": AttrCloak's bi-level loop; "regularised": D2D-R's / U2U-R's distance loop
    variant: str  # the loss that loop runs: AttrCloak "dd" (keeps the data) / "df"; "kernel" / "gaussian"


DEFENCES: dict[str, DefenceEntry] = {
    "attrcloak-dd": DefenceEntry("attrcloak", "dd"),
    "attrcloak-df": DefenceEntry("attrcloak", "df"),
    "d2d-r": DefenceEntry("regularised", "kernel"),  # a kernel distance on random Fourier features
    "u2u-r": DefenceEntry("regularised", "gaussian"),  # a distance between per-class Gaussians
}

# attacker name -> "module:function" building its classifier from a seed
ATTACKERS: dict[str, str] = {
    "xgboost": "fedunlearn.privacy.attacks:xgboost_classifier",
    "mlp": "fedunlearn.privacy.attacks:mlp_classifier",
}
