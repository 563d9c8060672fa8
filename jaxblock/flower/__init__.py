"""Run on Flower: jaxblock's server and clients as a Flower App (`flwr run`), in Flower's simulation
engine or on a SuperLink with SuperNodes (docs/flower.md).

Flower is the control plane, the TensorStore store the data plane (BUILD_NOTES.md "Run on Flower"
says why, with the measurements): the ServerApp runs jaxblock's server loop (`experiment.serve`) and
sends every SuperNode one message, "be client i of this run"; its ClientApp runs jaxblock's client
(`experiment.client`) for the whole run, and replies when the run is over. Blocks and aggregates
travel through the store exactly as in `scripts/server.py` / `scripts/client.py`, so ParaBlock's
overlap, signatures, validation, restarts and every algorithm are those of jaxblock's deployment,
and a round-based algorithm's final model is bitwise the simulator's.

`APP_DIR` is the Flower App's directory (its pyproject.toml): `flwr run $(python -m jaxblock.flower)`.
"""

import os

APP_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "app")
