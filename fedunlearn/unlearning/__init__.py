"""Client unlearning methods behind one small interface: `method(server, round, forgotten) -> shared`.

`server` is the round loop seen through `context.UnlearningServer` (its `active` list already
excludes the forgotten clients); the method returns the new shared parameters, running any
calibration as real rounds through the server's client pool, so it works on every engine. Each
method is one module here plus one line in `registry.METHODS`."""
