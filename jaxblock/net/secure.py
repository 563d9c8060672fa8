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
authenticated (an honest-but-curious server; docs/deployment.md's trust model says so).

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
    """An advert's two X25519 public keys; ValueError unless each is a usable key (32 bytes, and
    not a low-order point, whose agreement would be all zeros: an advert that would crash or
    weaken every neighbour's key agreement is left out like silence)."""
    pair = bytes.fromhex(doc["c_pk"]), bytes.fromhex(doc["s_pk"])
    probe = secagg.generate_keypair()[0]
    for pk in pair:
        if len(pk) != 32:
            raise ValueError("a public key is not 32 bytes")
        secagg.agree(probe, pk, b"probe")  # ValueError for a low-order point
    return pair


def _boxes_of(doc) -> dict[int, bytes]:
    return {int(v): bytes.fromhex(sealed) for v, sealed in doc["boxes"].items()}


class ServerSide(_Party):
    """The server's steps; one instance for a run (its rounds' states by round)."""

    def __init__(self, store, keys, transform, comm: CommConfig):
        super().__init__(store, keys, transform, comm)
        self.rounds: dict[int, secagg.ServerRound] = {}

    def agree(self, r: int, parties: list[int]) -> None:
        """(a)-(b): collects the keys and the shares of round r's parties and publishes U1 and U2
        (a restarted server reads back the ones it had published). Fewer than t parties: CannotUnmask,
        which stops the run as a missed quorum does (every client waiting on U1 or U2 learns it at
        once from `server/error`)."""
        setup = self.transform.setup(r, parties)
        u1 = self.read("u1", r, "server", "secagg_u1")
        advertised = self.gather(r, parties if u1 is None else u1["clients"], "keys", "secagg_keys", _keys_of)
        server = secagg.collect_keys(setup, advertised)  # CannotUnmask below t: the run stops, one line
        if u1 is None:
            self.put("u1", r, {"kind": "secagg_u1", "clients": sorted(server.keys)})
        u2 = self.read("u2", r, "server", "secagg_u2")
        if u2 is None:
            outboxes = self.gather(r, sorted(server.keys), "shares", "secagg_shares", _boxes_of)
            server, _ = secagg.relay(server, outboxes)
            self.put("u2", r, {"kind": "secagg_u2", "clients": list(server.shared)})
        else:
            server = dataclasses.replace(server, shared=tuple(u2["clients"]))
        self.rounds[r] = server

    def outside(self, r: int, clients: list[int]) -> list[int]:
        """Of `clients`, those outside round r's U2 (they sat out the key agreement): no upload of
        theirs could be unmasked, so the server does not wait for one."""
        server = self.rounds.get(r)
        return [] if server is None else [c for c in clients if c not in server.shared]

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
        """The server's message `what` of round r; one written by anyone else is passed over (it may
        be replaced by the server's), until `server_wait_s`."""
        deadline = time.perf_counter() + self.comm.server_wait_s
        while True:
            left = max(0.0, deadline - time.perf_counter())
            doc = self.store.wait_json(key(r, what), left, f"round {r}: no secure-aggregation {what} from the server")
            doc = self.checked(doc, r, "server", kind)
            if doc is not None:
                return doc
            if time.perf_counter() > deadline:
                raise RuntimeError(f"round {r}: the secure-aggregation {what} in the store is not the server's")
            time.sleep(0.02)

    def start(self, r: int, parties: list[int]) -> None:
        """(a)-(b) of round r beside the compute. A client that had advertised keys for round r
        before a restart lost their secrets: it sits the round out (`masked` then says so)."""
        if self.me not in parties:
            return
        for old in [q for q in self.agreed if q < r - 1]:  # rounds it never uploaded: their secrets go
            self.agreed.pop(old).cancel()
        self.tasks = [task for task in self.tasks if not task.done()]
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
        peers = self._from_peers(r, set(u1["clients"]) & set(state.neighbors), "keys", "secagg_keys", _keys_of)
        state, outbox = secagg.share_keys(state, peers)
        boxes = {str(v): sealed.hex() for v, sealed in outbox.items()}
        self.put(f"shares/{self.me}", r, {"kind": "secagg_shares", "client": self.me, "boxes": boxes})
        u2 = self.wait_server(r, "u2", "secagg_u2")
        if self.me not in u2["clients"]:
            return None
        mine = lambda doc: _boxes_of(doc)[self.me]  # noqa: E731 - the share sealed to it
        inbox = self._from_peers(r, set(u2["clients"]) & set(state.peer_keys), "shares", "secagg_shares", mine)
        return state, inbox

    def _from_peers(self, r: int, peers, what: str, kind: str, parse) -> dict:
        """{peer: parse(its `what` message)}, each signed by that peer (with keys); RuntimeError if one
        the server listed is missing, not its own or unusable (the round is then sat out)."""
        out = {}
        for v in sorted(peers):
            try:
                out[v] = parse(self.read(f"{what}/{v}", r, signing.client_name(v), kind))
            except (KeyError, TypeError, ValueError):
                raise RuntimeError(f"round {r}: client {v}'s secure-aggregation {what} for client {self.me} are "
                                   "missing, not its own or unusable") from None  # fmt: skip
        return out

    def masked(self, r: int, upload: dict) -> dict | None:
        """(c) In the upload thread: round r's quantized upload plus its masks, or None if this
        client sits the round out (it then sends nothing: an unmasked upload never leaves it)."""
        try:
            agreed = self.agreed.pop(r).result() if r in self.agreed else None
        except (RuntimeError, ValueError, concurrent.futures.CancelledError) as e:  # CannotUnmask too
            log.warning("client %d: round %d's key agreement failed (%s)", self.me, r, e)
            agreed = None
        if agreed is None:
            log.warning("client %d sits out round %d's secure aggregation (its keys were lost in a restart, or "
                        "the server left it out of the key agreement)", self.me, r)  # fmt: skip
            return None
        state, inbox = agreed
        try:
            self.states[r], masked = secagg.masked_input(state, np.asarray(upload["q"]), inbox)
        except ValueError as e:  # CannotUnmask (too few shares came), a share that does not open
            log.warning("client %d sits out round %d's secure aggregation: %s", self.me, r, e)
            return None
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

    def close(self, wait: bool = True) -> None:
        """Waits for its answers to be written (`wait`), then stops its threads."""
        for task in self.tasks if wait else ():
            try:
                task.result(timeout=self.comm.server_wait_s)
            except (TimeoutError, RuntimeError) as e:  # TransportTimeout too: a server that stopped asking
                log.warning("%s", e)
        for pool in (self.agreer, self.answerer):
            pool.shutdown(wait=False, cancel_futures=True)


def replay_unmask(
    store: Store,
    transform: secagg.SecureAggregation,
    r: int,
    parties: list[int],
    masked: dict[int, np.ndarray] | None = None,
    keys: signing.Keys | None = None,
) -> tuple[np.ndarray, list[int]]:
    """Round r's unmasking redone from what the store keeps (an auditor's, or chaos.py's, replay):
    (the survivors' sum of quantized inputs mod 2^bits, the survivors), as `ServerSide.unmask` got it.

    The round's state is rebuilt from the server's published steps, never decided anew: U1's keys
    (each U1 client's `keys/<u>`), U2, the ask's survivors, and every survivor's `answers/<v>`.
    `masked`: {client: masked upload} as the server accepted them (e.g. read back with its checks);
    None: the ask's survivors' uploads read from the store unchecked. With `keys` (e.g. the server's)
    every message must be signed by its party. Needs the round kept (`comm.keep_rounds`); a missing
    step: ValueError; too few shares: secagg.CannotUnmask, as the server would have raised.
    """
    from jaxblock.net import transport  # the store's upload layout

    party = _Party(store, keys, transform, CommConfig())
    steps = {what: party.read(what, r, "server", f"secagg_{what}") for what in ("u1", "u2", "ask")}
    missing = [what for what, doc in steps.items() if doc is None]
    if missing:
        raise ValueError(f"round {r}: the store holds no secure-aggregation {', '.join(missing)} of the server's")
    advertised = {}
    for u in steps["u1"]["clients"]:
        doc = party.read(f"keys/{u}", r, signing.client_name(u), "secagg_keys")
        if doc is None:
            raise ValueError(f"round {r}: client {u} is in U1 but its keys are not in the store")
        advertised[u] = _keys_of(doc)
    server = secagg.collect_keys(transform.setup(r, parties), advertised)
    server = dataclasses.replace(server, shared=tuple(steps["u2"]["clients"]))
    survivors = [int(c) for c in steps["ask"]["survivors"]]
    if masked is None:
        masked = {}
        for c in survivors:
            prefix = transport.delta_prefix(r, c)
            manifest = store.get_json(f"{prefix}/COMMIT")
            if manifest is None:
                raise ValueError(f"round {r}: survivor {c}'s masked upload is not in the store")
            masked[c] = np.asarray(store.fetch(prefix, manifest)[0]["q"])
    masked = {c: masked[c] for c in survivors if c in masked}  # as the server: those it asked about
    answers = {}
    for v in survivors:
        doc = party.read(f"answers/{v}", r, signing.client_name(v), "secagg_answers")
        try:
            answers[v] = _answers_of(doc) if doc is not None else None
        except (KeyError, TypeError, ValueError):
            answers[v] = None  # garbage counts as silence, as in `gather`
    answers = {v: a for v, a in answers.items() if a is not None}
    return secagg.unmask_round(server, masked, answers), sorted(masked)
