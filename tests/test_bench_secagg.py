"""A smoke run of scripts/bench_secagg.py at toy sizes (about a second): every section's figures are
there and positive, the projection counts a Llama 3.2-3B 2-layer block's values right, and the
model's secure rounds are never shorter than the plain ones."""

import importlib.util
import json
import os

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "bench_secagg.py")


def _bench():
    spec = importlib.util.spec_from_file_location("bench_secagg", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_secagg_reports_every_section(capsys):
    bench = _bench()
    # scripts/blocks.py --config configs/llama3_2_3b.py lists 201,338,880 params per 2-layer block
    assert bench.llama_block_params(**bench.LLAMA_3B) == 201_338_880
    argv = ["--repeats", "1", "--block-params", "3000", "--clients", "3", "--prg-values", "20000",
            "--growth-n", "4,6", "--growth-values", "500", "--json"]  # fmt: skip
    out = bench.main(argv)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == json.loads(json.dumps(out))

    pc = out["per_client"]
    for key in ("keygen + agreement", "share_keys", "quantize", "mask (PRG)", "answer", "total"):
        assert pc["client_s"][key] > 0, key
    for key in ("relay", "sum", "unmask_round", "unmask_round, 1 dropout"):
        assert pc["server_s"][key] > 0, key
    assert pc["bytes"]["public keys"] == 64 and pc["bytes"]["masked payload"] == 4 * 3000
    assert pc["bytes"]["encrypted shares"] == 2 * (12 + 2 * 70 + 16)  # two neighbours, nonce + 2 shares + tag
    assert all(v > 0 for v in out["rates"].values())
    assert out["projection"]["payload bytes"] == 4 * 201_338_880 and out["projection"]["client mask s"] > 0
    assert [(r["clients"], r["neighbors"]) for r in out["growth"]] == [(4, 0), (4, 4), (6, 0), (6, 5)]
    assert all(r["client_s"] > 0 and r["server_s"] > 0 for r in out["growth"])
    assert [r["link_mbps"] for r in out["model"]] == [10.0, 100.0]
    for r in out["model"]:
        assert r["fedbcd_secure_s"] > r["fedbcd_s"] > 0 and r["parablock_secure_s"] >= r["parablock_s"] > 0
        assert 0 < r["fedbcd_exposed_pct"] < 100 and 0 <= r["parablock_exposed_pct"] < 100
