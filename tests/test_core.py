"""The core is one piece: a transform plugged in from outside changes no loop and no exchange, and no
module outside `fed/algorithms/` decides anything by an algorithm's name."""

import ast
import dataclasses
import pathlib

import jax
import numpy as np
import optax
import pytest
from test_federated import RULES, toy_clients, toy_loss, toy_params

from jaxblock.fed import algorithms, blocks, data, loop, transforms
from jaxblock.net import comm, transport
from jaxblock.net import exchange as net_exchange

ROOT = pathlib.Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Doubled(transforms.Transform):
    """A toy transform: the client sends 2x its update, the server halves it (exact in floating point)."""

    key = "doubled"  # it keeps client state too: how many uploads each client has doubled

    def encode(self, state, client, block, tree):
        count = state.get(f"c{client}", 0) + 1
        return jax.tree.map(lambda x: x * 2, tree), {**state, f"c{client}": count}

    def decode(self, tree, like):
        return jax.tree.map(lambda x: x / 2, tree)


def _run(fed, exchange=None):
    params = toy_params()
    batches_fn = data.make_batches_fn(toy_clients(fed.num_clients), 8)
    part = blocks.partition(params, RULES)
    kw = {} if exchange is None else {"exchange": exchange}
    return loop.run(fed, params, toy_loss, batches_fn, part, optax.sgd(0.05), **kw)


def _equal(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


@pytest.mark.parametrize("algorithm", ["parablock", "fedbcd"])
def test_a_toy_transform_plugged_in_from_a_test_gives_the_untransformed_result(algorithm):
    """Scale-by-2 up, divide-by-2 down, alone and under top-k at ratio 1: the final model equals the
    plain run's bitwise, in memory and through a store; the uploads were doubled and its state kept."""
    fed = algorithms.configure(algorithm=algorithm, rounds=4, num_clients=3, local_steps=2, seed=3)
    plain, _ = _run(fed)
    doubled_fed = dataclasses.replace(fed, transforms=(Doubled(),))
    doubled, history = _run(doubled_fed)
    _equal(doubled["params"], plain["params"])
    assert doubled["extra"]["doubled"] == {f"c{c}": fed.rounds for c in range(3)}  # its client state, kept
    assert history[0]["bytes_up"] == _run(fed)[1][0]["bytes_up"]  # the same payload on the wire
    through, _ = _run(doubled_fed, net_exchange.ThroughStore(transport.Store("memory://")))
    _equal(through["params"], plain["params"])
    chained, _ = _run(dataclasses.replace(fed, transforms=(Doubled(), transforms.TopK(1.0))))
    _equal(chained["params"], plain["params"])


def test_a_toy_transform_runs_in_the_threaded_deployment_unchanged():
    """The same transform through the deployment's server and client loops (threads of one process):
    the server's final model equals the plain simulator's bitwise."""
    fed = algorithms.configure(algorithm="parablock", rounds=3, num_clients=2, local_steps=2, seed=1)
    plain, _ = _run(fed)
    params = toy_params()
    part = blocks.partition(params, RULES)
    doubled_fed = dataclasses.replace(fed, transforms=(Doubled(),))
    trainer = loop.make_trainer(doubled_fed, toy_loss, data.make_batches_fn(toy_clients(2), 8), part, optax.sgd(0.05))
    server, replicas = comm.run_in_threads(
        doubled_fed, params, part, trainer.local_train, trainer.batches_fn, transport.Store("memory://"),
        comm.CommConfig(timeout_s=60),
    )  # fmt: skip
    _equal(server, plain["params"])
    for replica in replicas.values():
        _equal(replica, plain["params"])


def _names_compared(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, name) of every comparison with an algorithm's name: x == 'fedbuff', x in ('a', 'b'), ..."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Compare):
            continue
        for side in [node.left, *node.comparators]:
            consts = side.elts if isinstance(side, (ast.Tuple, ast.List, ast.Set)) else [side]
            found += [
                (node.lineno, c.value) for c in consts if isinstance(c, ast.Constant) and c.value in algorithms.NAMES
            ]
    return found


def test_no_algorithm_name_is_compared_outside_the_algorithms():
    where = [ROOT / "jaxblock"]
    allowed = ROOT / "jaxblock" / "fed" / "algorithms"
    bad = []
    for path in sorted(p for d in where for p in d.rglob("*.py")):
        if allowed in path.parents:
            continue
        bad += [
            f"{path.relative_to(ROOT)}:{line} compares {name!r}"
            for line, name in _names_compared(ast.parse(path.read_text()))
        ]
    assert not bad, "decide by a hook or an attribute of the algorithm, not its name:\n" + "\n".join(bad)


def test_the_name_check_can_fail():
    assert _names_compared(ast.parse("if algorithm == 'fedcybgd': pass")) == [(1, "fedcybgd")]
    assert _names_compared(ast.parse("x = a in ('parablock', 'other')")) == [(1, "parablock")]
