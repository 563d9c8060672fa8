"""One process per client id: a lock in the client's workdir and a lease in the store.

Two processes with the same `--client-id` would train as the same client, collide in its
checkpoints and upload twice; the second must be refused at once and the first go on undisturbed.
- On one machine and workdir: an exclusive `flock` on `<workdir>/client_<i>/.lock`. The kernel
  drops it when the holder dies (kill -9 included), so a rerun after a crash takes it at once.
- Anywhere else (another workdir, another machine): `lease/<i>` in the store, holding who holds it
  and a beat counter that a thread of the holder advances every `BEAT_S`. A claimant that finds a
  lease of another place reads it again after 2.5 beats: if the counter moved, the holder is alive
  and the claim is refused; if not, the holder is gone and the lease is taken over. No clocks are
  compared, so the machines' clocks need not agree. A lease written from this very workdir belongs
  to a process that held the lock above and is gone (we hold the lock now): it is taken over at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import threading
import time

from jaxblock.net.transport import Store

BEAT_S = 1.0


class ClientTaken(ValueError):
    """Another live process is this client."""


def lease_key(client: int) -> str:
    return f"lease/{client}"


class Lease:
    """Held for the life of a client process: `Lease(store, client, workdir)`, then `release()`."""

    def __init__(self, store: Store, client: int, workdir: str):
        self.store, self.client = store, client
        self.where = f"{socket.gethostname()}:{os.path.realpath(workdir)}"
        self._lock_file = _lock(os.path.join(workdir, f"client_{client}"), client)
        try:
            _claim(store, client, self.where)
        except BaseException:
            self._lock_file.close()
            raise
        self.beat, self._stop = 0, threading.Event()
        self._write()
        self._thread = threading.Thread(target=self._beat, name=f"lease-{client}", daemon=True)
        self._thread.start()

    def _write(self) -> None:
        self.store.put_json(lease_key(self.client), {"where": self.where, "pid": os.getpid(), "beat": self.beat})

    def _beat(self) -> None:
        while not self._stop.wait(BEAT_S):
            self.beat += 1
            with contextlib.suppress(Exception):  # a missed beat only makes a claimant wait; the run goes on
                self._write()

    def release(self) -> None:
        self._stop.set()
        self._thread.join()
        held = self.store.get_json(lease_key(self.client))
        if held is not None and held.get("where") == self.where:
            self.store.delete(lease_key(self.client))
        self._lock_file.close()


def _lock(directory: str, client: int):
    os.makedirs(directory, exist_ok=True)
    f = open(os.path.join(directory, ".lock"), "a+")  # noqa: SIM115 - held open for the process's life
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise ClientTaken(
            f"--client-id {client} is already running in this workdir ({directory}/.lock is held)"
        ) from None
    return f


def _claim(store: Store, client: int, where: str) -> None:
    held = store.get_json(lease_key(client))
    if held is None or held.get("where") == where:
        return
    time.sleep(2.5 * BEAT_S)
    again = store.get_json(lease_key(client))
    if again is not None and again.get("where") == held.get("where") and again.get("beat") != held.get("beat"):
        raise ClientTaken(f"--client-id {client} is already running at {held.get('where')} (pid {held.get('pid')})")
