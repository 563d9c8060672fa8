"""Secure aggregation through the store: `fed.secagg`'s four steps as signed messages.

Round r's messages live under `round/<r>/secagg/` (deleted with the round):

    keys/<u>     client u: its two X25519 public keys                   (a) advertise
    u1           server: who advertised (U1)                            (a) collect
    shares/<u>   client u: its Shamir shares, each sealed to a neighbour (b) share
    u2           server: who shared (U2)                                (b) relay
    (the masked upload is round r's delta of u, as any upload)          (c) upload
    ask          server: per survivor, which share of which peer        (c) request
    answers/<v>  client v: the shares asked of it                       (d) answer

With `comm.keys`, every message is signed by its party (Ed25519) and checked by its readers: a
client reads its neighbours' keys and shares as they wrote them and checks their signatures, so
the server relays (it decides U1 and U2) but cannot substitute a key. Without keys nothing is
authenticated (an honest-but-curious server; README's trust model says so).

The client runs steps (a)-(b) in a thread of its own as soon as it reads round r's plan, beside
its compute; (c) masks in its upload thread (ParaBlock: beside the next round's compute); (d)
answers after its upload. The server runs (a)-(b) right after publishing the plan, and (c)-(d)
when it merges round r: `ServerSide.unmask` is the `unmasker` of the SecureAggregation transform,
which otherwise runs the protocol in memory (the simulator).

Dropouts: a party silent `comm.timeout_s` after the first of its peers' messages of a step is left
out of that step (the core recovers what it left behind). A client restarted mid-round has lost
its round secrets: it sits out the rounds it had already advertised keys for (their uploads are
never sent unmasked), and the server unmasks without it. A restarted server rebuilds each round's
state from what it published (U1, U2, the ask), never re-asking differently.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import time

import numpy as np

from jaxblock.fed import secagg
from jaxblock.net import signing
from jaxblock.net.protocol import CommConfig
from jaxblock.net.transport import Store

log = logging.getLogger(__name__)


def key(r: int, what: str) -> str:
    return f"round/{r}/secagg/{what}"


def parties_of(plan: dict) -> list[int]:
    """The round's protocol parties: its planned clients that joined the run (both sides agree)."""
    joined = set(plan.get("joined", plan["clients"]))
    return [c for c in plan["clients"] if c in joined]


class _Party:
    def __init__(self, store: Store, keys: signing.Keys | None, transform: secagg.SecureAggregation, comm: CommConfig):
        self.store, self.keys, self.transform, self.comm = store, keys, transform, comm

    def put(self, what: str, r: int, doc: dict) -> None:
        doc = {**doc, "round": r}
        self.store.put_json(key(r, what), self.keys.seal(doc) if self.keys else doc)

    def read(self, what: str, r: int, signer: str, kind: str):
        """The message at `what`, if `signer` wrote it for round r (with keys); None if absent or not."""
        doc = self.store.get_json(key(r, what))
        return None if doc is None else self.checked(doc, r, signer, kind)

    def checked(self, doc, r: int, signer: str, kind: str):
        if self.keys is not None:
            try:
                self.keys.check(doc, signer, {"kind": kind, "round": r})
            except signing.BadSignature as e:
                log.warning("round %d: %s at %s is not %s's (%s): ignored", r, kind, signer, signer, e)
                return None
        return doc if isinstance(doc, dict) and doc.get("kind") == kind and doc.get("round") == r else None

    def gather(self, r: int, clients, what: str, kind: str, parse) -> dict[int, object]:
        """{client: parse(doc)} of `what/<client>` as they arrive: all of them, or those there
        `timeout_s` after the first, or none after 2 x `timeout_s` (garbage counts as silence)."""
        got, waiting, first, poll = {}, set(clients), None, 0.001
        give_up = time.perf_counter() + 2 * self.comm.timeout_s
        while waiting and (first is not None or time.perf_counter() < give_up):
            for c in sorted(waiting):
                doc = self.read(f"{what}/{c}", r, signing.client_name(c), kind)
                if doc is None:
                    continue
                waiting.discard(c)
                try:
                    got[c] = parse(doc)
                except (KeyError, TypeError, ValueError) as e:
                    log.warning("round %d: client %d's %s is garbage (%s): left out", r, c, kind, e)
                first = first or time.perf_counter()
            if waiting and first is not None and time.perf_counter() > first + self.comm.timeout_s:
                break
            time.sleep(poll)
            poll = min(poll * 1.5, 0.02)
        return got


def _keys_of(doc) -> tuple[bytes, bytes]:
    return bytes.fromhex(doc["c_pk"]), bytes.fromhex(doc["s_pk"])


class ServerSide(_Party):
    """The server's steps; one instance for a run (its rounds' states by round)."""

    def __init__(self, store, keys, transform, comm: CommConfig):
        super().__init__(store, keys, transform, comm)
        self.rounds: dict[int, secagg.ServerRound] = {}

    def agree(self, r: int, parties: list[int]) -> None:
        """(a)-(b): collects the keys and the shares of round r's parties and publishes U1 and U2
        (a restarted server reads back the ones it had published). A round that cannot gather t
        parties is left to its merge, which then finds too few uploads."""
        setup = self.transform.setup(r, parties)
        try:
            u1 = self.read("u1", r, "server", "secagg_u1")
            if u1 is None:
                advertised = self.gather(r, parties, "keys", "secagg_keys", _keys_of)
                server = secagg.collect_keys(setup, advertised)
                self.put("u1", r, {"kind": "secagg_u1", "clients": sorted(server.keys)})
            else:
                advertised = self.gather(r, u1["clients"], "keys", "secagg_keys", _keys_of)
                server = secagg.collect_keys(setup, advertised)
            u2 = self.read("u2", r, "server", "secagg_u2")
            if u2 is None:
                boxes = self.gather(r, sorted(server.keys), "shares", "secagg_shares", lambda d: d["boxes"])
                outboxes = {u: {int(v): bytes.fromhex(s) for v, s in box.items()} for u, box in boxes.items()}
                server, _ = secagg.relay(server, outboxes)
                self.put("u2", r, {"kind": "secagg_u2", "clients": list(server.shared)})
            else:
                server = dataclasses.replace(server, shared=tuple(u2["clients"]))
        except secagg.CannotUnmask as e:
            log.warning("%s", e)
            return
        self.rounds[r] = server

    def unmask(self, r: int, masked: dict[int, np.ndarray]) -> tuple[np.ndarray, list[int]]:
        """(c)-(d): asks the survivors for their shares and unmasks the sum of their inputs:
        (the sum of the survivors' quantized inputs mod 2^bits, the survivors)."""
        server = self.rounds.get(r)
        if server is None:
            raise secagg.CannotUnmask(f"round {r} cannot be unmasked: its key agreement gathered fewer than t parties")
        masked = {c: q for c, q in masked.items() if c in server.shared}  # a masked input needs shared keys
        ask = self.read("ask", r, "server", "secagg_ask")
        if ask is None:
            asks = secagg.requests(server, masked)
            wire = {str(v): [[p, kind] for p, kind in items] for v, items in asks.items()}
            self.put("ask", r, {"kind": "secagg_ask", "survivors": sorted(masked), "requests": wire})
        else:  # a restarted server asks nothing new: the survivors are those it asked
            masked = {c: masked[c] for c in ask["survivors"] if c in masked}
            asks = {int(v): [(p, kind) for p, kind in items] for v, items in ask["requests"].items()}
        answers = self.gather(r, sorted(asks), "answers", "secagg_answers", _answers_of)
        total = secagg.unmask_round(server, masked, answers)
        self.rounds.pop(r, None)
        return total, sorted(masked)


def _answers_of(doc) -> list[tuple[int, str, bytes]]:
    return [(int(p), str(kind), bytes.fromhex(share)) for p, kind, share in doc["shares"]]


class ClientSide(_Party):
    """A client's steps, in a thread of its own; its round states by round."""

    def __init__(self, store, keys, transform, comm: CommConfig, client: int):
        super().__init__(store, keys, transform, comm)
        self.me = client
        pool = concurrent.futures.ThreadPoolExecutor  # key agreement and answers never wait on each other
        self.agreer = pool(1, thread_name_prefix=f"secagg-keys-{client}")
        self.answerer = pool(1, thread_name_prefix=f"secagg-answers-{client}")
        self.agreed: dict[int, concurrent.futures.Future] = {}  # round -> (state, inbox) or None
        self.states: dict[int, secagg.ClientRound] = {}  # round -> its state after masking
        self.tasks: list[concurrent.futures.Future] = []

    def wait_server(self, r: int, what: str, kind: str) -> dict:
        doc = self.store.wait_json(key(r, what), self.comm.server_wait_s, f"round {r}: no secure-aggregation {what}")
        doc = self.checked(doc, r, "server", kind)
        if doc is None:
            raise RuntimeError(f"round {r}: the secure-aggregation {what} in the store is not the server's")
        return doc

    def start(self, r: int, parties: list[int]) -> None:
        """(a)-(b) of round r beside the compute. A client that had advertised keys for round r
        before a restart lost their secrets: it sits the round out (`masked` then says so)."""
        if self.me not in parties:
            return
        self.agreed[r] = self.agreer.submit(self._agree, r, parties)

    def _agree(self, r: int, parties: list[int]):
        if self.store.get_json(key(r, f"keys/{self.me}")) is not None:
            return None  # advertised before a restart: those secrets are gone
        state, (c_pk, s_pk) = secagg.client_keys(self.transform.setup(r, parties), self.me)
        advert = {"kind": "secagg_keys", "client": self.me, "c_pk": c_pk.hex(), "s_pk": s_pk.hex()}
        self.put(f"keys/{self.me}", r, advert)
        u1 = self.wait_server(r, "u1", "secagg_u1")
        if self.me not in u1["clients"]:
            return None
        peers = {}
        for v in sorted(set(u1["clients"]) & set(state.neighbors)):
            doc = self.read(f"keys/{v}", r, signing.client_name(v), "secagg_keys")
            if doc is None:
                raise RuntimeError(f"round {r}: client {v}'s secure-aggregation keys are missing or not its own")
            peers[v] = _keys_of(doc)
        state, outbox = secagg.share_keys(state, peers)
        boxes = {str(v): sealed.hex() for v, sealed in outbox.items()}
        self.put(f"shares/{self.me}", r, {"kind": "secagg_shares", "client": self.me, "boxes": boxes})
        u2 = self.wait_server(r, "u2", "secagg_u2")
        if self.me not in u2["clients"]:
            return None
        inbox = {}
        for u in sorted(set(u2["clients"]) & set(state.peer_keys)):
            doc = self.read(f"shares/{u}", r, signing.client_name(u), "secagg_shares")
            if doc is None or str(self.me) not in doc.get("boxes", {}):
                raise RuntimeError(f"round {r}: client {u}'s shares for client {self.me} are missing or not its own")
            inbox[u] = bytes.fromhex(doc["boxes"][str(self.me)])
        return state, inbox

    def masked(self, r: int, upload: dict) -> dict | None:
        """(c) In the upload thread: round r's quantized upload plus its masks, or None if this
        client sits the round out (it then sends nothing: an unmasked upload never leaves it)."""
        agreed = self.agreed.pop(r).result() if r in self.agreed else None
        if agreed is None:
            log.warning("client %d sits out round %d's secure aggregation (its keys were lost in a restart, or "
                        "the server left it out of the key agreement)", self.me, r)  # fmt: skip
            return None
        state, inbox = agreed
        self.states[r], masked = secagg.masked_input(state, np.asarray(upload["q"]), inbox)
        return {"q": masked}

    def answer_later(self, r: int) -> None:
        self.tasks.append(self.answerer.submit(self._answer, r))

    def _answer(self, r: int) -> None:
        """(d) Reveals the shares the server asks of it; a request for both kinds of one peer (or any
        other the core refuses) is logged and answered with nothing."""
        ask = self.wait_server(r, "ask", "secagg_ask")
        request = ask["requests"].get(str(self.me))
        if request is None:
            return
        try:
            state, shares = secagg.answer(self.states.pop(r), [(int(p), str(kind)) for p, kind in request])
        except secagg.Refused as e:
            log.warning("round %d: refused the server's request: %s", r, e)
            return
        wire = [[p, kind, share.hex()] for p, kind, share in shares]
        self.put(f"answers/{self.me}", r, {"kind": "secagg_answers", "client": self.me, "shares": wire})

    def close(self) -> None:
        for task in self.tasks:
            try:
                task.result(timeout=self.comm.server_wait_s)
            except (TimeoutError, RuntimeError) as e:  # TransportTimeout too: a server that stopped asking
                log.warning("%s", e)
        for pool in (self.agreer, self.answerer):
            pool.shutdown(wait=False, cancel_futures=True)
