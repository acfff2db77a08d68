"""Client pools: the in-process runner, the batched engine, and the `auto` choice between them."""
