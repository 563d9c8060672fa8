"""scripts/reproduce.py: the paper's tables as resumable cells, reports and verdicts."""

import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest
from test_train import ROOT, small_config

from jaxblock.fed import algorithms, privacy, schedule
from jaxblock.run import compare, paper, runtime
from jaxblock.run.config import load_config


@pytest.fixture(scope="module")
def reproduce():
    """scripts/reproduce.py as a module."""
    spec = importlib.util.spec_from_file_location("reproduce", os.path.join(ROOT, "scripts", "reproduce.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "better, worse, metric, n_eval, expected",
    [
        ([0.90, 0.88, 0.92], [0.80, 0.82, 0.78], "exact_match", 200, "holds"),  # 10 points, se ~1.6
        ([0.80, 0.82, 0.78], [0.90, 0.88, 0.92], "exact_match", 200, "does not hold"),
        ([0.85, 0.70, 0.95], [0.80, 0.90, 0.75], "exact_match", 200, "within noise"),  # seeds disagree
        ([0.86], [0.84], "exact_match", 200, "within noise"),  # one seed: binomial se ~3.6 points
        ([0.95], [0.50], "exact_match", 200, "holds"),
        ([30.0, 30.5], [54.0, 55.0], "wall_s", None, "holds"),  # lower wall time is better
        ([54.0], [30.0], "wall_s", None, "does not hold"),  # modelled time: one seed has no noise
    ],
)
def test_verdicts_on_hand_made_numbers(better, worse, metric, n_eval, expected):
    assert paper.verdict(better, worse, metric, n_eval)["verdict"] == expected


def test_verdict_standard_error_by_hand():
    v = paper.verdict([0.9, 0.7], [0.5], "exact_match", 100)  # var of the mean 0.02 / 2, binomial 0.25 / 100
    assert v["diff"] == pytest.approx(0.3) and v["se"] == pytest.approx((0.01 + 0.0025) ** 0.5)


def test_ranks_share_ties_and_cells_are_named_by_their_overrides(monkeypatch):
    assert paper.ranks({"a": 0.5, "b": 0.9, "c": 0.5}, higher_is_better=True) == {"a": 2, "b": 1, "c": 2}
    assert paper.ranks({"a": 3.0, "b": 1.0}, higher_is_better=False) == {"a": 2, "b": 1}
    tiny = os.path.join(ROOT, "configs", "tiny.py")
    base = load_config(tiny).to_dict()
    name = lambda *o: paper.cell_name(load_config(tiny, list(o)).to_dict(), base)  # noqa: E731
    assert name("seed=1", "staleness=2") == name("staleness=2", "seed=1") == "seed=1_staleness=2-" + name(
        "seed=1", "staleness=2").split("-")[-1] != name("seed=1", "staleness=3")  # fmt: skip
    # The same settings spelled differently are one cell (T1's ParaBlock is T5's one-round staleness).
    assert name("algorithm=parablock", "seed=2") == name("staleness=1", "seed=2") == name("seed=2")
    assert paper.resolve(("rounds={rounds_x_clients}",), 50, 10) == ("rounds=500",)
    # A clone elsewhere names its cells as this one does: bundled paths are hashed relative to the checkout.
    moved = lambda d: json.loads(json.dumps(d).replace(ROOT, "/elsewhere/clone"))  # noqa: E731
    here = load_config(tiny, ["seed=2"]).to_dict()
    mine = paper.cell_name(here, base)
    assert paper.cell_name(moved(here), moved(base)) != mine  # other files, seen from this checkout
    monkeypatch.setattr(paper, "_CHECKOUT", "/elsewhere/clone")
    assert paper.cell_name(moved(here), moved(base)) == mine
    for table in paper.TABLES.values():  # every claim names two of its table's rows
        labels = {r.label for r in table.rows}
        assert all({c.better, c.worse} <= labels for c in table.claims), table.name


def test_reproduce_t5_writes_reports_and_a_second_run_reruns_nothing(tmp_path):
    """Two cells of 2 rounds, run at once; the second invocation only reads them."""
    workdir = tmp_path / "paper"
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "reproduce.py"), "--config", os.path.join(ROOT, "configs/tiny.py"),
           "--config.rounds=2", "--config.local_steps=2", "--config.eval.num_examples=8", "--table", "T5", "--seeds",
           "1", "--workdir", str(workdir), "--jobs", "2", "--archive", str(tmp_path / "kept")]  # fmt: skip
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "HF_HUB_OFFLINE": "1"}
    first = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    assert first.stdout.count("train.py") == 2 and "skip" not in first.stdout
    report = json.loads((workdir / "report.json").read_text())["tables"]["T5"]
    assert [r["label"] for r in report["rows"]] == ["one-round staleness", "two-round staleness"]
    assert all(len(r["seeds"]) == 1 and 0 <= r["exact_match"]["mean"] <= 1 for r in report["rows"])
    assert report["claims"][0]["verdict"] in ("holds", "does not hold", "within noise")
    md = (workdir / "report.md").read_text()
    assert "## T5: Staleness (Table 5)" in md and "55.88" in md and "two rounds of staleness" in md
    assert (workdir / "T5_runtime.png").exists()
    cells = sorted((workdir / "cells").iterdir())
    times = [json.loads((c / "cell_time.json").read_text()) for c in cells]  # both cells ran, two at a time
    assert all(t["train.py"] > 0 and t["eval.py"] > 0 for t in times) and "distinct cells" in md
    assert not any((c / "cell_time.attempt.json").exists() for c in cells)  # finished: no attempt under way
    mtimes = {p: p.stat().st_mtime_ns for c in cells for p in c.rglob("*") if p.is_file()}

    second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    assert second.stdout.count("skip") == 2 and "train.py" not in second.stdout
    assert {p: p.stat().st_mtime_ns for c in cells for p in c.rglob("*") if p.is_file()} == mtimes
    assert json.loads((workdir / "report.json").read_text())["tables"]["T5"]["rows"] == report["rows"]
    # The archive alone (a few small files per cell, committable) gives the same report elsewhere.
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == [c.name for c in cells]
    elsewhere = tmp_path / "elsewhere"
    third = subprocess.run([*cmd[:-6], "--workdir", str(elsewhere), "--report-only", "--archive", str(tmp_path / "kept")], cwd=ROOT,
                           env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert third.returncode == 0 and "2 finished cells restored" in third.stdout, third.stderr[-2000:]
    rows = json.loads((elsewhere / "report.json").read_text())["tables"]["T5"]["rows"]
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("seeds", "commands")} for r in rs]  # noqa: E731
    assert strip(rows) == strip(report["rows"])


def test_a_run_modelled_without_training():
    """compare.modeled_run (the paper's Figure 2): compute from the schedule, communication exposed
    by FedBCD and hidden by ParaBlock, FedCyBGD's turns one after another."""
    config = small_config("rounds=4", "blocks.layers_per_block=1")  # 3 clients, 2 blocks
    round_s = [1.0, 0.5]
    fed = runtime.fed_config(config)
    blocks_trained = [schedule.choose_block(fed, t, 2) for t in range(4)]
    pb = compare.modeled_run(config, "parablock", 1.0, round_s)  # 1 MB/s: a block takes ~0.1-0.2 s
    bcd = compare.modeled_run(config, "fedbcd", 1.0, round_s)
    assert pb["compute_s"] == bcd["compute_s"] == sum(round_s[b] for b in blocks_trained)
    assert bcd["exposed_s"] > 0 and pb["exposed_s"] < bcd["exposed_s"]
    cyc = compare.modeled_run(config, "fedcybgd", 1.0, round_s)  # 4 rounds x 3 clients = 12 turns
    assert cyc["compute_s"] == sum(round_s[(t % 3) % 2] for t in range(12)) and cyc["exposed_s"] > 0


def test_report_only_trains_nothing_and_marks_rows_not_run(tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "reproduce.py"), "--config", os.path.join(ROOT, "configs/tiny.py"),
           "--table", "T5", "--seeds", "1", "--workdir", str(tmp_path), "--report-only"]  # fmt: skip
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "train.py" not in done.stdout and not (tmp_path / "cells").exists()
    report = json.loads((tmp_path / "report.json").read_text())["tables"]["T5"]
    assert [r["missing"] for r in report["rows"]] == ["not run yet", "not run yet"]
    assert report["claims"][0]["verdict"] == "missing rows"


def test_failing_cells_do_not_stop_the_sweep_and_the_report_names_their_error(tmp_path):
    """Both T5 cells fail at setup (no partition gives 10 clients 5000 examples each); both are tried,
    the report is still written with each row's error, and the exit code says so."""
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "reproduce.py"), "--config", os.path.join(ROOT, "configs/tiny.py"),
           "--config.data.min_client_size=5000", "--table", "T5", "--seeds", "1", "--workdir", str(tmp_path / "paper"),
           "--archive", str(tmp_path / "kept")]  # fmt: skip
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "error: 2 cells failed; the first: cell " in done.stderr, done.stderr[-2000:]
    assert done.stdout.count(": train.py\n") == 2 and done.stdout.count("error: cell ") == 2
    rows = json.loads((tmp_path / "paper" / "report.json").read_text())["tables"]["T5"]["rows"]
    why = "failed: train.py exited 2: error: 4000 examples cannot give 10 clients 5000 each"
    assert [r["missing"] for r in rows] == [why, why]
    assert f"missing: {why}" in (tmp_path / "paper" / "report.md").read_text()
    for cell in (tmp_path / "paper" / "cells").iterdir():
        assert (cell / "cell_error.txt").read_text().strip() == why.removeprefix("failed: ")
        assert not (cell / "eval.json").exists()
    assert not (tmp_path / "kept").exists()  # nothing archived: a failed cell is not a finished one


def test_a_failed_seed_beside_finished_ones_is_named_and_errors_keep_the_table_whole(tmp_path, reproduce):
    report = {"table": "T9", "title": "made up", "link": "100", "claims": [], "rows": [
        {"label": "A", "paper": {}, "missing": "", "commands": [], "seeds": [{"cell_s": 60.0}],
         "exact_match": {"mean": 0.5, "sd": 0.0}, "failed": [{"seed": 1, "workdir": "w", "error": "eval.py exited 1: x"}]},
        {"label": "B", "paper": {}, "missing": "failed: train.py exited 1: TypeError: int | None", "seeds": [],
         "commands": [], "failed": []}]}  # fmt: skip
    md = reproduce.markdown(report)
    assert "Failed, not in the row above: A, seed 1: eval.py exited 1: x" in md
    assert "| B | missing: failed: train.py exited 1: TypeError: int \\| None | | | | - | - |" in md
    # A cell that failed here but finished elsewhere: restoring it clears the stale error.
    cell, kept = tmp_path / "cells" / "c", tmp_path / "kept" / "c"
    cell.mkdir(parents=True), kept.mkdir(parents=True)
    (cell / reproduce.FAILED).write_text("train.py exited 1: boom\n")
    assert reproduce.cell_error(str(cell)) == "train.py exited 1: boom"
    (kept / "eval.json").write_text("{}")
    assert reproduce.unarchive(str(cell), str(tmp_path / "kept")) and reproduce.cell_error(str(cell)) == ""


def test_a_resumed_cell_counts_the_time_its_killed_attempts_spent(tmp_path, reproduce):
    """A sweep killed in a cell's train.py: the next attempt carries that run's time, up to the last
    file it wrote; killed in eval.py, the finished train.py's seconds too."""
    assert reproduce.carried_seconds(str(tmp_path)) == {}  # a first attempt
    now = time.time()
    attempt, written = tmp_path / reproduce.ATTEMPT, tmp_path / "checkpoints" / "7" / "state"
    written.parent.mkdir(parents=True)
    for path, at in ((attempt, now - 100), (written, now - 40)):
        path.write_text(json.dumps({"script": "train.py", "started": now - 100, "seconds": {}}))
        os.utime(path, (at, at))
    assert reproduce.carried_seconds(str(tmp_path)) == pytest.approx({"train.py": 60.0}, abs=1e-3)
    attempt.write_text(json.dumps({"script": "eval.py", "started": now - 30, "seconds": {"train.py": 75.0}}))
    os.utime(attempt, (now - 30, now - 30))
    os.utime(written, (now - 10, now - 10))
    assert reproduce.carried_seconds(str(tmp_path)) == pytest.approx({"train.py": 75.0, "eval.py": 20.0}, abs=1e-3)


def test_dp_tables_cover_every_method_and_budget_with_each_seeds_own_noise(reproduce):
    """DP1/DP2 (not in the paper): each method at each epsilon, one C per table, `dp.noise_seed` the
    cell's seed; the no-DP row is the plain run (DP1's is T1's cell); every cell passes the DP checks."""
    tiny = os.path.join(ROOT, "configs", "tiny.py")
    config = load_config(tiny)
    for name, level, epsilons in (("DP1", "record", [0.0, 8.0, 2.0]), ("DP2", "client", [0.0, 8.0])):
        runs = reproduce.cells(paper.TABLES[name], config, tiny, [], [0, 1, 2], "w")
        assert len(runs) == 4 * len(epsilons) and all(len(seeds) == 3 for seeds in runs.values())
        assert len({w for seeds in runs.values() for _, _, w in seeds}) == 12 * len(epsilons)  # distinct cells
        seen = set()
        for label, seeds in runs.items():
            for seed, overrides, _ in seeds:
                c = load_config(tiny, overrides)
                dp = privacy.from_config(c.dp)
                assert dp.level == (level if "inf" not in label else "none"), label
                assert dp.target_epsilon == epsilons[0 if "inf" in label else 1 + ("eps=2" in label)]
                if dp.on:
                    assert dp.noise_seed == seed and dp.delta == 1e-5 and dp.clip_norm > 0
                    privacy.check(dp, runtime.fed_config(c), algorithms.REGISTRY[c.algorithm])
                assert (c.num_clients, c.participation) == ((10, 1.0) if name == "DP1" else (100, 0.1))
                seen.add((c.algorithm, dp.target_epsilon, dp.clip_norm if dp.on else None))
        clips = {clip for *_, clip in seen if clip is not None}
        assert len(seen) == 4 * len(epsilons) and len(clips) == 1, seen  # four methods, one C
    t1 = reproduce.cells(paper.TABLES["T1"], config, tiny, [], [1], "w")["ParaBlock"]
    assert reproduce.cells(paper.TABLES["DP1"], config, tiny, [], [1], "w")["ParaBlock, eps=inf"] == t1
    report = {"table": "DP9", "title": "made up", "link": "100", "ours": True, "claims": [], "rows": [
        {"label": "A, eps=8", "paper": {}, "missing": "", "commands": [], "seeds": [{"cell_s": 60.0}],
         "exact_match": {"mean": 0.5, "sd": 0.1}, "noise_multiplier": {"mean": 1.43, "sd": 0.0},
         "epsilon": {"mean": 8.0, "sd": 0.0}, "cell_s": {"mean": 60.0, "sd": 0.0}}]}  # fmt: skip
    assert "| A, eps=8 | 1 | 50.0% ± 10.0% | - | - | 1.430 | 8.00 | 60 |" in reproduce.markdown(report)


def test_the_secure_aggregation_table_runs_each_method_plain_secure_and_with_distributed_dp(reproduce):
    """SA1 (not in the paper): ParaBlock and FedIT plain (T1's cells), with secure aggregation alone
    and with distributed client-level DP at epsilon 8; every cell passes the startup checks."""
    from jaxblock.fed import secagg

    tiny = os.path.join(ROOT, "configs", "tiny.py")
    config = load_config(tiny)
    runs = reproduce.cells(paper.TABLES["SA1"], config, tiny, [], [0, 1, 2], "w")
    assert len(runs) == 6 and len({w for seeds in runs.values() for _, _, w in seeds}) == 18
    for label, seeds in runs.items():
        for seed, overrides, _ in seeds:
            c = load_config(tiny, overrides)
            dp, fed = privacy.from_config(c.dp), runtime.fed_config(c)
            assert c.secagg.on == ("secagg" in label) and dp.on == ("DP" in label), label
            if c.secagg.on:
                secagg.check(fed, algorithms.REGISTRY[c.algorithm])
                assert dp.noise_seed == seed
            if dp.on:
                assert (dp.level, dp.noise, dp.target_epsilon) == ("client", "distributed", 8.0)
                privacy.check(dp, fed, algorithms.REGISTRY[c.algorithm])
    t1 = reproduce.cells(paper.TABLES["T1"], config, tiny, [], [1], "w")["ParaBlock"]
    assert reproduce.cells(paper.TABLES["SA1"], config, tiny, [], [1], "w")["ParaBlock, plain"] == t1


def test_a_finished_cell_written_before_a_config_key_existed_is_found_again(reproduce, tmp_path):
    """A key added to the code since a cell ran changes cell_name's hash; a finished cell whose config
    lacks only keys now at the config file's default is the same run and is used, not run again. A
    cell that differs, or lacks a key the new run sets away from its default, is not."""
    tiny = os.path.join(ROOT, "configs", "tiny.py")
    config = load_config(tiny, ["rounds=10"])
    row = next(r for r in paper.TABLES["DP1"].rows if r.label == "FedBCD, eps=8")
    overrides = ["rounds=10", *paper.resolve(row.overrides, 10, config.num_clients, 1), "seed=1"]
    new = load_config(tiny, overrides).to_dict()
    root = tmp_path / "cells"
    slug = paper.cell_name(new, config.to_dict()).rsplit("-", 1)[0]

    def earlier(name: str, edit) -> None:
        old = json.loads(json.dumps(new, default=str))
        edit(old)
        (root / name).mkdir(parents=True)
        (root / name / "config.json").write_text(json.dumps(old))
        (root / name / "eval.json").write_text("{}")

    def find() -> str:
        return os.path.basename(reproduce.cells(paper.TABLES["DP1"], config, tiny, ["rounds=10"], [1], str(tmp_path))[
            "FedBCD, eps=8"][0][2])  # fmt: skip

    fresh = paper.cell_name(new, config.to_dict())
    earlier(f"{slug}-00000001", lambda c: c["dp"].update(delta=1e-6))  # another run
    earlier(f"{slug}-00000002", lambda c: c["dp"].pop("target_epsilon"))  # lacks a key set away from its default
    earlier(f"{slug}-00000003", lambda c: c.update(removed_since=1))  # has a key the code no longer has
    assert find() == fresh
    earlier(f"{slug}-00000004", lambda c: (c["dp"].pop("accountant"), c.pop("tracking")))  # keys added since
    assert find() == f"{slug}-00000004"
    # A key the run sets away from the code's default (here by the user's overrides, as a config file
    # could) is not what a cell without the key ran, whatever the config file says.
    user = ["rounds=10", "self_weight=0.0"]
    away = load_config(tiny, [*user, *overrides[1:]]).to_dict()
    earlier(f"{paper.cell_name(away, load_config(tiny, user).to_dict()).rsplit('-', 1)[0]}-00000005",
            lambda c: c.pop("self_weight"))  # fmt: skip
    assert not paper.same_run(away, json.loads((root / f"{slug}-00000005" / "config.json").read_text()),
                              load_config(tiny, user).to_dict())  # fmt: skip
    (root / fresh).mkdir()  # a cell of today's name comes first, finished or not
    assert find() == fresh
    # An archive (cells' result files kept elsewhere, here from a checkout at /elsewhere) is searched
    # the same way when the sweep has not finished the cell itself.
    kept = tmp_path / "kept" / f"{slug}-00000009"
    kept.mkdir(parents=True)
    moved = json.dumps(new, default=str).replace(f'"{ROOT}{os.sep}', f'"{os.sep}elsewhere{os.sep}')
    assert "/elsewhere/assets/" in moved  # its data and base model paths
    old = json.loads(moved)
    old["dp"].pop("accountant")
    (kept / "config.json").write_text(json.dumps(old))
    (kept / "eval.json").write_text("{}")
    runs = reproduce.cells(paper.TABLES["DP1"], config, tiny, ["rounds=10"], [1], str(tmp_path), str(kept.parent))
    assert os.path.basename(runs["FedBCD, eps=8"][0][2]) == kept.name


def test_the_gap_table_changes_one_factor_at_a_time(reproduce):
    """G1 (issue 32, ours): FedBCD and ParaBlock as today (T1's cells), then each factor alone: the LM
    head frozen, 1-layer blocks, the no-repeat schedule, ParaBlock's self_weight (ParaBlock only), the
    local learning rate with rounds x 1/lr, and the best combination (h: no-repeat at 1e-3); every cell
    passes the config checks, `all` leaves it out, and its report has no privacy columns."""
    from jaxblock.run import config as config_lib

    tiny = os.path.join(ROOT, "configs", "tiny.py")
    config = load_config(tiny)
    table = paper.TABLES["G1"]
    runs = reproduce.cells(table, config, tiny, [], [0, 1, 2], "w")
    assert len(runs) == 20 and all(len(seeds) == 3 for seeds in runs.values())
    assert len({w for seeds in runs.values() for _, _, w in seeds}) == 54  # lr 2e-3 is (a)'s cell
    assert "G1" in paper.ORDER and "G1" not in [n for n in paper.ORDER if not paper.TABLES[n].ours]
    lr_rounds = {"1e-3": (1e-3, 2 * config.rounds), "5e-4": (5e-4, 4 * config.rounds)}
    for label, seeds in runs.items():
        for seed, overrides, _ in seeds:
            c = load_config(tiny, overrides)
            config_lib.validate(c)
            fed = runtime.fed_config(c)
            assert fed.algorithm == ("fedbcd" if label.startswith("FedBCD") else "parablock") and c.seed == seed
            assert c.blocks.head_block == ("(b)" not in label), label
            assert c.blocks.layers_per_block == (1 if "(c)" in label else 2), label
            assert fed.schedule == ("random_norepeat" if "no-repeat" in label else "random"), label
            weight = "w" if "self_weight=w" in label else 0.0 if "self_weight=0" in label else 1.0
            assert getattr(fed.options, "self_weight", 1.0) == weight, label
            lr, rounds = next((v for k, v in lr_rounds.items() if k in label), (2e-3, config.rounds))
            assert (c.optimizer.learning_rate, c.rounds) == (lr, rounds), label
    t1 = reproduce.cells(paper.TABLES["T1"], config, tiny, [], [1], "w")
    g1 = reproduce.cells(table, config, tiny, [], [1], "w")
    assert g1["ParaBlock (a) as today"] == t1["ParaBlock"] and g1["FedBCD (a) as today"] == t1["FedBCD"]
    for claim in table.claims:  # each ParaBlock variant is judged against FedBCD
        assert claim.better.startswith("ParaBlock") and claim.metric in ("exact_match", "wall_s")
        if claim.metric == "wall_s":  # "as fast": only for rows that keep the rounds (and so the overlap)
            assert load_config(tiny, runs[claim.better][0][1]).rounds == config.rounds, claim.better
    assert {c.better for c in table.claims} == {r.label for r in table.rows if r.label.startswith("ParaBlock")}
    report = {"table": "G9", "title": "made up", "link": "10", "ours": True, "private": False, "claims": [], "rows": [
        {"label": "A", "paper": {}, "missing": "", "commands": [], "seeds": [{"cell_s": 60.0}],
         "exact_match": {"mean": 0.5, "sd": 0.1}, "cell_s": {"mean": 60.0, "sd": 0.0}},
        {"label": "B", "paper": {}, "missing": "not run yet", "commands": [], "seeds": [], "failed": []}]}  # fmt: skip
    md = reproduce.markdown(report)
    assert "| A | 1 | 50.0% ± 10.0% | - | - | 60 |" in md and "| B | missing: not run yet | | | | |" in md
    assert "epsilon" not in md
