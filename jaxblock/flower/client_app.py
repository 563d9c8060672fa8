"""The ClientApp: one message from the ServerApp makes this SuperNode jaxblock's client i for the whole
run (`experiment.client`, as `scripts/client.py`), its blocks and aggregates going through the run's
store. It replies once the run is over: "done" with its figures, "taken" (another live process is
this client: asked again later) or "refused" with the reason (a client id not in the run, a config
that is not the server's, a finished run: for good). A SuperNode restarted
mid-run is sent the run again and its client rejoins from its checkpoint, as `scripts/client.py` does.
"""

from __future__ import annotations

import os
import socket
import time

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from jaxblock.flower import settings

app = ClientApp()


@app.train()
def run_client(msg: Message, context: Context) -> Message:
    from jaxblock.net import lease, transport
    from jaxblock.run import experiment

    start = time.perf_counter()
    run = settings.from_record(msg.content[settings.RECORD])
    reply = {"node": str(context.node_id)}
    try:
        config = settings.load(run, settings.client_overrides(context.node_config))
        client = settings.client_id(context.node_config, config.num_clients)
        reply["client"] = client
        # Which client this node's message runs: the ServerApp watches its lease and sends the run
        # again if the process dies (a SuperNode killed with its ClientApp)
        store = transport.Store(run.store)
        note = {"client": client, "pid": os.getpid(), "host": socket.gethostname()}
        store.put_json(settings.node_key(context.node_id), note)
        experiment.client(config, client, settings.client_workdir(run, context.node_config), run.store)
        store.put_json(settings.node_key(context.node_id), {**note, "finished": True})
        reply["status"] = "done"
    except lease.ClientTaken as e:  # another live process is this client: the ServerApp tries again later
        reply.update(status="taken", reason=str(e))
    except ValueError as e:  # the user's settings, a client id not in the run, a finished run: for good
        reply.update(status="refused", reason=str(e))
    reply["seconds"] = time.perf_counter() - start
    return Message(RecordDict({settings.RECORD: ConfigRecord(reply)}), reply_to=msg)
