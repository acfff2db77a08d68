"""Settings shared by tests that need a tiny synthetic federation."""

TINY = [
    "data.synthetic_users=10",
    "data.synthetic_items=200",
    "data.synthetic_interactions=10",
    "data.test_negatives=19",
    "model.dim=8",
]
