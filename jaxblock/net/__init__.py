"""The deployment: a server process and client processes exchanging through a TensorStore store.

`transport.Store` holds zarr3 arrays and JSON markers (a COMMIT after every array: a reader never
sees half an update); `protocol` says what each party writes where and why cleanup is safe; the
server loop (`server.serve`) plans rounds, collects uploads through every check (`receive`:
signature, manifest, shapes, digests; then `fed.exchange.server_side`, the simulator's own server
side) and publishes what it sends down; a client (`client.run_client`) trains on its main thread
while host threads upload, download and clean up, so ParaBlock's exchange overlaps its compute.
Both call the algorithm's hooks, so every round-based algorithm runs here as in the simulator,
bit for bit. `exchange.ThroughStore` is the same exchange in one process. Imports `fed/` and
`model/`, never `run/`.
"""
