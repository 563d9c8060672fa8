"""The simulator's modelled timeline counts every exchange: ParaBlock's final flush has its rows, as a
deployed client's timeline does, and summary.json, compare.modeled and bench_runs count them."""

import os

import pytest
from test_train import read_jsonl, small_config

from jaxblock.fed import wire
from jaxblock.run import compare, experiment, runtime, timeline
from jaxblock.run.config import model_config

LINK = ("comm.bandwidth_mbps=1",)  # 1 MB/s: a one-layer block (~0.15 MB) takes ~0.15 s each way


def _sent(workdir: str) -> tuple[list[dict], int]:
    """(metrics.jsonl, the bytes its rounds say every client uploaded, summed over rounds and clients)."""
    metrics = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    return metrics, sum(sum(m["bytes_up"]) for m in metrics)


def test_parablock_counts_the_flush_upload_in_summary_timeline_and_compare(tmp_path):
    workdir = str(tmp_path / "pb")
    summary = experiment.train(small_config("rounds=3", *LINK), workdir, progress=False)
    metrics, sent = _sent(workdir)
    n = summary["num_clients"]
    assert summary["per_client_bytes_up"] * n == sent > 0  # round 2's upload (the flush's) included
    assert summary["per_client_bytes_down"] * n == n * sum(m["bytes_down"] for m in metrics)
    rows = read_jsonl(os.path.join(workdir, "timeline.jsonl"))
    flush = [r for r in rows if r["round"] == "flush"]
    assert [r["client"] for r in flush] == list(range(n)) and rows[-n:] == flush
    last = metrics[-1]
    for r in flush:  # as a deployed client's flush row: its last upload, the final aggregate, no compute
        assert r["bytes_up"] == last["bytes_up"][last["clients"].index(r["client"])] > 0
        assert r["bytes_down"] == last["bytes_down"] and r["block"] == last["block"] and r["compute_s"] == 0.0
        link = wire.link_for(r["client"], 1, None)
        assert r["comm_s"] == pytest.approx(link.seconds(r["bytes_up"]) + link.seconds(r["bytes_down"]))
        assert r["exposed_wait_s"] == r["comm_s"] > 0.1  # nothing computes in the flush: all of it waits
    # The modelled wall time has the flush on its critical path, and the replay of metrics.jsonl agrees.
    rounds_only = timeline.slowest_per_round([r for r in rows if r["round"] != "flush"])
    assert summary["modeled_wall_s"] == pytest.approx(sum(rounds_only) + max(r["exposed_wait_s"] for r in flush))
    replayed = compare.modeled(workdir)
    assert replayed["modeled_wall_s"] == pytest.approx(summary["modeled_wall_s"], rel=1e-9)
    assert replayed["mb_up"] * compare.MB == pytest.approx(summary["per_client_bytes_up"])
    assert replayed["wall_compute_s"] + replayed["wall_exposed_s"] == pytest.approx(replayed["modeled_wall_s"])
    # Resuming the finished run writes the flush rows again, never twice.
    experiment.train(small_config("rounds=3", *LINK), workdir, progress=False)
    assert read_jsonl(os.path.join(workdir, "timeline.jsonl")) == rows


def test_fedbcd_has_no_flush_row_and_counts_every_upload(tmp_path):
    workdir = str(tmp_path / "bcd")
    summary = experiment.train(small_config("rounds=3", "algorithm=fedbcd", *LINK), workdir, progress=False)
    _, sent = _sent(workdir)
    rows = read_jsonl(os.path.join(workdir, "timeline.jsonl"))
    assert [r["round"] for r in rows] == [t for t in range(3) for _ in range(summary["num_clients"])]
    assert summary["per_client_bytes_up"] * summary["num_clients"] == sent > 0
    assert compare.modeled(workdir)["modeled_wall_s"] == pytest.approx(summary["modeled_wall_s"], rel=1e-9)


def test_flush_rows_of_metrics_written_before_bytes_were_logged():
    """Staleness 2, metrics in the old form (params_up, no bytes): the flush holds the last two rounds'
    exchanges; round T-2's is covered by round T-1's compute, round T-1's by nothing."""
    config = small_config("rounds=3", "staleness=2")
    fed, part = runtime.fed_config(config), runtime.make_partition(config, model_config(config))
    n = [part.blocks[b].params for b in (0, 1, 0)]
    history = [{"round": t, "block": b, "clients": [0, 1, 2], "params_up": [n[t]] * 3, "params_down": n[t],
                "client_compute_s": {str(c): 0.1 for c in range(3)}} for t, b in enumerate((0, 1, 0))]  # fmt: skip
    links = [wire.link_for(c, 1, None) for c in range(3)]
    flush = timeline.flush_timeline(fed, part, links, history)
    one = [links[0].seconds(4 * v) * 2 for v in n]  # an exchange: up and down, float32 values
    assert [r["bytes_up"] for r in flush] == [4 * (n[1] + n[2])] * 3
    assert flush[0]["comm_s"] == pytest.approx(one[1] + one[2])
    assert flush[0]["exposed_wait_s"] == pytest.approx(one[1] - 0.1 + one[2])
    rows = timeline.replay(fed, part, links, history)
    assert sum(r["bytes_up"] for r in rows) == 3 * 4 * sum(n)  # every round's upload, once
    fed_bcd = runtime.fed_config(small_config("rounds=3", "algorithm=fedbcd"))
    assert timeline.flush_timeline(fed_bcd, part, links, history) == []
