"""The federated core: pure functions and frozen settings, no store, no files, no threads.

Round t (`loop.run_round`): the algorithm picks the participants and block b_t (`schedule`); each
participant trains b_t from its lean model, the server's plus eta times its own pending deltas,
each weighted by `Algorithm.own_weight` (1; ParaBlock's `self_weight`) (`lean.client_params`, then
`Algorithm.client_model`), for K local steps (`local`: gradients and
optimizer state for the block only); what it uploads is `Algorithm.upload`, wrapped by the update
transforms (`transforms`); the uploads due at the end of round t (ParaBlock: round t - s's) go
through the trainer's exchange (`exchange`: in memory, or a store from `net/`) to the one server
side (transforms' reduce, `validate.screen`, `Algorithm.reduce`), and every model folds the result
in with `Algorithm.apply`. After round T-1 a flush drains what is in flight.

Each method is a module of `algorithms/` with its own `Options`; `algorithms.configure(**flat)`
builds the run's `FedConfig` from the flat keys users type. Imports `model/` only.
"""
