"""The ServerApp: jaxblock's server loop (`experiment.serve`, as `scripts/server.py`) in a thread, and
Flower's Grid used as the control plane: every SuperNode is sent the run once ("be your client of
this run", `client_app`) and sent it again when its client stops before the run is over.

A client stops before the end when its SuperNode is killed with its ClientApp (Flower starts the
ClientApp as the SuperNode's child, which exits with it). The SuperLink reports that only once the
node has missed two heartbeats (about a minute); the message the node had taken is gone with it, and
the restarted SuperNode is let in only after that minute. So the ServerApp watches the client itself:
the ClientApp writes which client it is in the store (`settings.node_key`), jaxblock's client beats
its lease there every second (`net/lease.py`), and a lease of that process that stops beating (or goes
away) while the message is unanswered and the client has not said it finished means the process is
gone. The node is then sent the run again once it is back online, and its client rejoins from its
checkpoint, as `scripts/client.py` rerun does; jaxblock's server waits for it (`comm.timeout_s`) as
for any client process that restarts. A client refused for good (an id not in the run, a config that
is not the server's, a finished run) is not sent the run again.
"""

from __future__ import annotations

import os
import sys
import threading
import time

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid, ServerApp

from jaxblock.flower import settings

app = ServerApp()

POLL_S = 1.0  # how often the Grid and the clients' leases are looked at
STALE_S = 20.0  # a lease that has not beaten for this long belongs to a dead process (it beats every 1 s)
RETRY_S = (2.0, 60.0)  # the wait before a node is sent the run again: doubling from the first to the second
GRACE_S = 120.0  # after the server's last round: how long the clients' replies are waited for
MESSAGE_TTL_S = 30 * 24 * 3600.0  # a client's message lives as long as the run (Flower's default is 12 h)


@app.main()
def main(grid: Grid, context: Context) -> None:
    try:
        run = settings.from_run_config(context.run_config)
        run = settings.for_run(run, grid.run.run_id)
        config = settings.load(run)
    except ValueError as e:  # the user's run-config or config file: one line, before anything starts
        _say(f"error: {e}")
        raise
    summary = serve(grid, run, config)
    _say(f"done: {summary['rounds']} rounds of {summary['algorithm']} in {summary['wall_s']:.1f}s; the final model "
         f"is the last checkpoint in {os.path.abspath(os.path.join(run.workdir, 'server'))}")  # fmt: skip


def serve(grid: Grid, run: settings.FlowerRun, config, poll_s: float = POLL_S) -> dict:
    """Runs jaxblock's server for `run` while `Dispatcher` keeps every SuperNode running its client;
    returns the server's summary. The server's failure is raised (RuntimeError, with its reason)."""
    from jaxblock.run import experiment

    outcome: dict = {}

    def server() -> None:
        try:
            outcome["summary"] = experiment.serve(config, os.path.join(run.workdir, "server"), run.store_url)
        except BaseException as e:  # re-raised in the ServerApp's thread below
            outcome["error"] = e

    thread = threading.Thread(target=server, name="jaxblock-server", daemon=True)
    thread.start()
    dispatcher = Dispatcher(grid, run)
    while thread.is_alive():
        dispatcher.step()
        thread.join(poll_s)
    dispatcher.finish(GRACE_S if "summary" in outcome else 0.0)
    if "error" in outcome:
        raise RuntimeError(f"the jaxblock server failed: {outcome['error']}") from outcome["error"]
    return outcome["summary"]


class Dispatcher:
    """Keeps one unanswered "run" message at every SuperNode of the grid until the run is over."""

    def __init__(self, grid: Grid, run: settings.FlowerRun):
        from jaxblock.net import lease, transport

        self.grid, self.run, self.store = grid, run, transport.Store(run.store_url)
        self.lease_key = lease.lease_key
        self.out: dict[str, int] = {}  # unanswered message id -> node
        self.done: set[int] = set()  # nodes whose client finished the run, or was refused for good
        self.retry: dict[int, tuple[float, float]] = {}  # node -> (when to send again, the wait after that)
        self.beats: dict[int, tuple[object, float]] = {}  # node -> (its client's last lease, when it changed)
        self.failing = ""  # the Grid's or the store's last failure, said once

    def step(self) -> None:
        """One look at the Grid and the store; a failure of either (a SuperLink restart, a store hiccup)
        is said and the next step tries again: the server's own thread goes on meanwhile."""
        try:
            self._step(time.monotonic())
            self.failing = ""
        except Exception as e:  # noqa: BLE001 - the run is the server's; the control plane retries
            if str(e) != self.failing:
                _say(f"the control plane failed ({type(e).__name__}: {e}); trying again")
            self.failing = str(e)

    def _step(self, now: float) -> None:
        busy = set(self.out.values())
        for node in self.grid.get_node_ids():  # online nodes only
            if node not in busy and node not in self.done and self.retry.get(node, (0.0, 0.0))[0] <= now:
                self._send(node)
        if self.out:
            for reply in self.grid.pull_messages(list(self.out)):
                self._answered(reply)
        for mid, node in list(self.out.items()):
            if self._client_died(node, now):
                del self.out[mid]
                self._later(node, f"SuperNode {node}: its client stopped without a reply (its process is gone)")

    def finish(self, grace_s: float) -> None:
        """After the server's last round: the replies still due, for up to `grace_s` (each client ends
        once it has the final aggregate); then the ClientApps' notes are taken out of the store."""
        deadline = time.monotonic() + grace_s
        while self.out and time.monotonic() < deadline:
            try:
                replies = list(self.grid.pull_messages(list(self.out)))
            except Exception as e:  # noqa: BLE001 - as in step
                _say(f"the control plane failed ({type(e).__name__}: {e})")
                break
            for reply in replies:
                node = self.out.pop(reply.metadata.reply_to_message_id, None)
                if node is not None:
                    _say(self._outcome(node, reply))
            time.sleep(0.2)
        if self.out:
            _say(f"{len(self.out)} SuperNode(s) did not reply: {sorted(self.out.values())}")
        for key in self.store.keys("flower/"):  # keys() gives them without the prefix
            self.store.delete("flower/" + key)

    def _send(self, node: int) -> None:
        self.store.delete(settings.node_key(node))  # first: its ClientApp writes it anew, watched from then on
        self.beats.pop(node, None)
        content = RecordDict({settings.RECORD: ConfigRecord(self.run.record())})
        message = Message(content, dst_node_id=node, message_type=settings.MESSAGE_TYPE, group_id=self.run.workdir,
                          ttl=MESSAGE_TTL_S)  # fmt: skip
        for mid in self.grid.push_messages([message]):
            if mid:
                self.out[mid] = node

    def _answered(self, reply: Message) -> None:
        node = self.out.pop(reply.metadata.reply_to_message_id, None)
        if node is None:
            return
        why = self._outcome(node, reply)
        if reply.has_error():  # gone offline: sent again once it is back among the grid's (online) nodes
            self._later(node, why, first=reply.error.code == ErrorCode.NODE_UNAVAILABLE)
            return
        status = reply.content[settings.RECORD]["status"]
        if status == "taken":  # another live process is this client (an old one not yet gone): later
            self._later(node, why)
            return
        self.done.add(node)  # finished, or refused for good: never sent again
        self.retry.pop(node, None)
        _say(why)

    @staticmethod
    def _outcome(node: int, reply: Message) -> str:
        if reply.has_error():
            return f"SuperNode {node}: {reply.error.reason.strip().splitlines()[0]}"
        record = reply.content[settings.RECORD]
        if record["status"] == "done":
            return f"SuperNode {node}: client {record['client']} done ({record['seconds']:.1f}s)"
        return f"SuperNode {node}: {record['status']}: {record['reason']}"

    def _later(self, node: int, why: str, first: bool = False) -> None:
        wait = RETRY_S[0] if first else self.retry.get(node, (0.0, RETRY_S[0]))[1]
        self.retry[node] = (time.monotonic() + wait, min(2 * wait, RETRY_S[1]))
        _say(f"{why}; sending it the run again in {wait:.0f}s")

    def _client_died(self, node: int, now: float) -> bool:
        """The client this node's ClientApp runs had a lease, and it has not beaten for STALE_S (or is
        gone) while the client has not said it finished."""
        mine = self.store.get_json(settings.node_key(node))
        if mine is None or mine.get("finished"):  # not started yet, or done and replying
            return False
        held = self.store.get_json(self.lease_key(mine["client"]))
        ours = (
            held is not None and held.get("pid") == mine["pid"] and held.get("where", "").startswith(mine["host"] + ":")
        )
        if node not in self.beats:  # the clock starts at its own lease's first beat
            if ours:
                self.beats[node] = (held, now)
            return False
        last, since = self.beats[node]
        held = held if ours else None
        if held != last:
            self.beats[node] = (held, now)
            return False
        return now - since > STALE_S


def _say(text: str) -> None:
    print(f"jaxblock on Flower: {text}", file=sys.stderr, flush=True)
