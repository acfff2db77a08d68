"""The federated layer: value types, the client step, aggregation, upload protection, the
federation, history, schedule and the round loop. It knows no unlearning method, engine or Flower."""
