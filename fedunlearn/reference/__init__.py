"""Non-federated references: centralized training and the popularity ranking."""
