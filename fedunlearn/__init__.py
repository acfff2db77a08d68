"""fedunlearn: federated recommendation with client unlearning, on Flower."""

__version__ = "0.1.0"
