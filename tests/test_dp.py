"""Differential privacy (issue 28): client-level clipping and noise as an update transform, the
accounting against dp-accounting itself, calibration, resume, and the combinations refused.
(Record-level DP-SGD inside the block step: tests/test_dp_local.py.)"""

import dataclasses
import json
import os
import subprocess
import sys

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_train import SMALL, final_params, read_jsonl, small_config, stopped_after_two_checkpoints

from jaxblock.fed import algorithms, blocks, data, exchange, loop, privacy, transforms, validate
from jaxblock.run import experiment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPLACE_ONE = dp_accounting.NeighboringRelation.REPLACE_ONE
ADD_OR_REMOVE = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE


def _direct(event, delta):
    """dp-accounting's own answer, with nothing of jaxblock's in between."""
    acct = dp_accounting.rdp.RdpAccountant(neighboring_relation=REPLACE_ONE)
    acct.compose(event)
    return acct.get_epsilon(delta)


def test_record_level_epsilon_is_dp_accountings_for_each_clients_own_steps():
    """Half the clients take part each round, so clients differ in steps and in examples."""
    fed = algorithms.configure(algorithm="fedbcd", rounds=6, num_clients=4, local_steps=3, participation=0.5)
    algo, sizes, z = algorithms.REGISTRY["fedbcd"], [40, 25, 60, 33], 1.3
    dp = privacy.DPConfig(level="record", noise_multiplier=z, delta=1e-5)
    spent = privacy.budget(dp, fed, algo, z, 5, sizes, batch_size=4)
    taken = [sum(c in algo.participants(fed, t) for t in range(5)) for c in range(4)]
    assert spent["steps_per_client"] == [3 * k for k in taken] and len(set(taken)) > 1
    for c in range(4):  # z / 2: noise std zC against the replace-one sensitivity 2C of a clipped sum
        step = dp_accounting.SampledWithoutReplacementDpEvent(sizes[c], 4, dp_accounting.GaussianDpEvent(z / 2))
        direct = _direct(dp_accounting.SelfComposedDpEvent(step, 3 * taken[c]), 1e-5)
        assert spent["epsilon_per_client"][c] == pytest.approx(direct, rel=1e-12)
    assert spent["epsilon"] == max(spent["epsilon_per_client"]) and spent["examples_per_client"] == sizes


def test_client_level_epsilon_composes_each_clients_own_rounds_without_amplification():
    """Who takes part is public (the plans), so a round is a plain Gaussian merge for its clients: a
    client's epsilon composes the rounds it took part in. Distributed noise without secure
    aggregation: an upload holds only its share z / sqrt(M); the sum alone would spend the central figure."""
    fed = algorithms.configure(algorithm="fedbcd", rounds=8, num_clients=20, participation=0.25)
    algo = algorithms.REGISTRY["fedbcd"]
    dp = privacy.DPConfig(level="client", noise_multiplier=0.9)
    spent = privacy.budget(dp, fed, algo, 0.9, 7, [1] * 20, 1)
    taken = spent["rounds_per_client"]
    assert taken == [sum(c in algo.participants(fed, t) for t in range(7)) for c in range(20)] and len(set(taken)) > 1
    for c in range(20):  # a client never sampled has spent nothing (dp-accounting refuses a count of 0)
        plain = dp_accounting.GaussianDpEvent(0.45)
        direct = _direct(dp_accounting.SelfComposedDpEvent(plain, taken[c]), 1e-5) if taken[c] else 0.0
        assert spent["epsilon_per_client"][c] == pytest.approx(direct, rel=1e-12)
    assert spent["epsilon"] == max(spent["epsilon_per_client"])
    shared = privacy.budget(dataclasses.replace(dp, noise="distributed"), fed, algo, 0.9, 7, [1] * 20, 1)
    worst = dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(0.45 / np.sqrt(5)), max(taken))
    assert shared["epsilon"] == pytest.approx(_direct(worst, 1e-5), rel=1e-12)
    assert shared["epsilon_if_only_the_sum_is_seen"] == spent["epsilon"] < shared["epsilon"]


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_distributed_noise_counts_only_the_shares_of_the_uploads_in_each_sum(accountant):
    """With distributed noise a round's sum carries one share per upload it holds: a round that lost
    two of its 5 uploads (dropouts) has noise multiplier z sqrt(3/5), and the sum's epsilon composes
    each round at its own noise (dp-accounting's own composition of the same events); a round that
    released nothing spends nothing; every round in full is the central figure."""
    fed = algorithms.configure(algorithm="fedbcd", rounds=6, num_clients=5)
    algo = algorithms.REGISTRY["fedbcd"]
    dp = privacy.DPConfig(level="client", noise_multiplier=2.0, noise="distributed", accountant=accountant)
    full = privacy.budget(dp, fed, algo, 2.0, 6, [1] * 5, 1)
    assert full == privacy.budget(dp, fed, algo, 2.0, 6, [1] * 5, 1, {t: 5 for t in range(6)})
    short = privacy.budget(dp, fed, algo, 2.0, 6, [1] * 5, 1, {1: 3, 4: 0})
    z = lambda m: m if accountant == "pld" else m / 2  # noqa: E731 - rounds_event's replace-one convention
    gauss = dp_accounting.GaussianDpEvent
    events = [dp_accounting.SelfComposedDpEvent(gauss(z(2.0)), 4), gauss(z(2.0 * np.sqrt(3 / 5)))]
    if accountant == "rdp":
        direct = _direct(dp_accounting.ComposedDpEvent(events), 1e-5)
    else:
        direct = privacy.epsilon(dp_accounting.ComposedDpEvent(events), 1e-5, "pld")
    assert short["epsilon_if_only_the_sum_is_seen"] == pytest.approx(direct, rel=1e-9)
    dropped = privacy.budget(dp, fed, algo, 2.0, 6, [1] * 5, 1, {1: 3})["epsilon_if_only_the_sum_is_seen"]
    assert full["epsilon_if_only_the_sum_is_seen"] < dropped < short["epsilon"]
    assert short["rounds_short_of_noise"] == [1, 4] and full["rounds_short_of_noise"] == []
    assert short["epsilon"] == full["epsilon"]  # an upload's own share does not change with the others'


def test_record_level_poisson_epsilon_is_dp_accountings_under_add_remove():
    """Poisson sampling: each step is PoissonSampledDpEvent(B / n_i, GaussianDpEvent(z)) under
    add/remove (one record more or fewer moves the clipped sum by C: z, not z / 2), for both accountants."""
    with pytest.raises(ValueError, match=r"^dp.sampling='bogus': choose one of without_replacement, poisson$"):
        privacy.DPConfig(level="record", noise_multiplier=1.0, sampling="bogus")
    fed = algorithms.configure(algorithm="fedbcd", rounds=6, num_clients=4, local_steps=3, participation=0.5)
    algo, sizes, z = algorithms.REGISTRY["fedbcd"], [40, 25, 60, 33], 1.3
    for name in ("rdp", "pld"):
        dp = privacy.DPConfig(level="record", noise_multiplier=z, sampling="poisson", accountant=name)
        spent = privacy.budget(dp, fed, algo, z, 5, sizes, batch_size=4)
        assert spent["sampling"] == "poisson" and spent["accountant"] == name
        for c in range(4):
            step = dp_accounting.PoissonSampledDpEvent(4 / sizes[c], dp_accounting.GaussianDpEvent(z))
            event = dp_accounting.SelfComposedDpEvent(step, spent["steps_per_client"][c])
            acct = (dp_accounting.rdp.RdpAccountant(neighboring_relation=ADD_OR_REMOVE)
                    if name == "rdp" else dp_accounting.pld.PLDAccountant(ADD_OR_REMOVE, privacy.PLD_DISCRETIZATION))  # fmt: skip
            assert spent["epsilon_per_client"][c] == pytest.approx(acct.compose(event).get_epsilon(1e-5), rel=1e-12)


@pytest.mark.parametrize("level", ["client", "record"])
def test_pld_epsilon_is_dp_accountings_pld_of_the_same_events(level):
    """PLD: client level composes GaussianDpEvent(z) under replace-one (dp-accounting's PLD moves a
    replaced term from -C to +C itself, where its RDP takes z / 2 against the whole 2C); record level
    Poisson steps under add/remove. The figures match a direct PLDAccountant, its default grid (1e-4)
    to 1e-3, and stay below RDP's (the tighter accountant: a sensitivity read twice over would be ~3x)."""
    fed = algorithms.configure(algorithm="fedbcd", rounds=8, num_clients=8, local_steps=3, participation=0.5)
    algo, sizes, z = algorithms.REGISTRY["fedbcd"], list(range(30, 38)), 1.2
    sampling = "poisson" if level == "record" else "without_replacement"
    pld = privacy.DPConfig(level=level, noise_multiplier=z, accountant="pld", sampling=sampling)
    spent = privacy.budget(pld, fed, algo, z, 7, sizes, 4)
    rdp = privacy.budget(dataclasses.replace(pld, accountant="rdp"), fed, algo, z, 7, sizes, 4)
    worst = int(np.argmax(spent["epsilon_per_client"]))
    for c in range(8):
        if level == "client":
            k = spent["rounds_per_client"][c]
            event, relation = dp_accounting.GaussianDpEvent(z), REPLACE_ONE
            same_pair = dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(z / 2), k)
        else:
            k = spent["steps_per_client"][c]
            event = dp_accounting.PoissonSampledDpEvent(4 / sizes[c], dp_accounting.GaussianDpEvent(z))
            relation, same_pair = ADD_OR_REMOVE, dp_accounting.SelfComposedDpEvent(event, k)
        if not k:
            assert spent["epsilon_per_client"][c] == 0.0
            continue
        direct = dp_accounting.pld.PLDAccountant(relation, privacy.PLD_DISCRETIZATION)
        direct.compose(dp_accounting.SelfComposedDpEvent(event, k))
        assert spent["epsilon_per_client"][c] == pytest.approx(direct.get_epsilon(1e-5), rel=1e-12)
        if c == worst:  # the default grid, and the same pair of distributions stated as add/remove
            fine = dp_accounting.pld.PLDAccountant(ADD_OR_REMOVE).compose(same_pair).get_epsilon(1e-5)
            assert spent["epsilon_per_client"][c] == pytest.approx(fine, rel=1e-3)
        assert spent["epsilon_per_client"][c] < rdp["epsilon_per_client"][c]
    assert spent["epsilon"] == max(spent["epsilon_per_client"]) > 0.8 * rdp["epsilon"]


@pytest.mark.parametrize(
    "level, sampling, accountant",
    [("record", "without_replacement", "rdp"), ("client", "without_replacement", "rdp"),
     ("record", "poisson", "rdp"), ("record", "poisson", "pld"), ("client", "without_replacement", "pld")],
)  # fmt: skip
def test_calibration_meets_the_target_within_1_percent_from_below(level, sampling, accountant):
    # record level: every client alike (one calibration); client level: 3 of 10 sampled a round
    participation = 1.0 if level == "record" else 0.3
    fed = algorithms.configure(
        algorithm="parablock", rounds=10, num_clients=10, local_steps=5, participation=participation
    )
    dp = privacy.DPConfig(level=level, target_epsilon=4.0, delta=1e-5, sampling=sampling, accountant=accountant)
    algo, sizes = algorithms.REGISTRY["parablock"], [200] * 10
    z = privacy.noise_multiplier(dp, fed, algo, sizes, 8)
    spent = privacy.budget(dp, fed, algo, z, fed.rounds, sizes, 8)["epsilon"]
    assert 0.99 * 4.0 <= spent <= 4.0, (z, spent)


def test_calibration_skips_a_client_that_never_takes_part():
    """100 clients, 10 a round, 3 rounds: most never train, and spend nothing whatever z."""
    fed = algorithms.configure(algorithm="fedbcd", rounds=3, num_clients=100, participation=0.1)
    algo = algorithms.REGISTRY["fedbcd"]
    dp = privacy.DPConfig(level="client", target_epsilon=8.0)
    z = privacy.noise_multiplier(dp, fed, algo, [1] * 100, 1)
    spent = privacy.budget(dp, fed, algo, z, fed.rounds, [1] * 100, 1)
    assert 0 in spent["rounds_per_client"] and 0.99 * 8 <= spent["epsilon"] <= 8


def _uploads(m, size, scale):
    rng = np.random.default_rng(0)
    return [{"w": (scale * rng.standard_normal(size)).astype(np.float32)} for _ in range(m)]


def test_the_servers_noise_has_the_std_of_the_formula_z_c_over_m():
    """C tiny: the clipped mean is negligible beside N(0, (zC)^2) / M; weights are 1/M of the sampled
    clients even when fewer arrive."""
    z, c, m = 2.0, 1e-3, 5
    dp = privacy.ClientDP(clip_norm=c, noise_multiplier=z, clients_per_round=m, seed=3)
    fed = algorithms.configure(algorithm="fedbcd", num_clients=m)
    algo = algorithms.make(fed)
    clipped = [dp.encode({}, i, 0, u)[0] for i, u in enumerate(_uploads(4, 40_000, 1.0))]  # 4 of 5 arrived
    assert all(validate.norm(u) <= c * (1 + 1e-6) for u in clipped)
    down = transforms.aggregate((dp,), algo, clipped, np.full(4, 0.25), [0, 1, 2, 3], round_=7)
    signal = sum(np.asarray(u["w"]) for u in clipped) / m
    assert np.std(np.asarray(down["w"]) - signal) == pytest.approx(z * c / m, rel=0.05)
    again = transforms.aggregate((dp,), algo, clipped, np.full(4, 0.25), [0, 1, 2, 3], round_=7)
    other = transforms.aggregate((dp,), algo, clipped, np.full(4, 0.25), [0, 1, 2, 3], round_=8)
    np.testing.assert_array_equal(down["w"], again["w"])  # a function of (secret, round): a resume redraws it
    over = [{"w": u["w"] * np.float32(1.009)} for u in clipped]  # a bfloat16 wire can round a hair over C
    np.testing.assert_allclose(transforms.aggregate((dp,), algo, over, np.full(4, 0.25), [0, 1, 2, 3], 7)["w"],
                               down["w"], atol=1e-9)  # fmt: skip
    assert not np.array_equal(down["w"], other["w"])


def test_distributed_noise_adds_up_to_the_central_std_and_each_draw_is_new():
    z, c, m = 1.5, 1e-3, 4
    dp = privacy.ClientDP(clip_norm=c, noise_multiplier=z, noise="distributed", clients_per_round=m, seed=3)
    (u,) = _uploads(1, 40_000, 1.0)
    first, state = dp.encode({}, 2, 0, u)
    second, state = dp.encode(state, 2, 0, u)
    clipped = privacy.clip(u, c)
    for sent in (first, second):
        assert np.std(np.asarray(sent["w"]) - np.asarray(clipped["w"])) == pytest.approx(z * c / np.sqrt(m), rel=0.05)
    assert list(state) == ["c2"] and int(state["c2"]) == 2 and not np.array_equal(first["w"], second["w"])


def test_noise_keys_use_every_bit_of_the_secret():
    """jax.random.key(seed) keeps 32 bits without x64: seeds 2^40 apart would draw the same noise."""
    tree = {"w": np.zeros(1000, np.float32)}
    a, b = (privacy.gaussian_like(tree, privacy.key_of(seed, 3), 1.0)["w"] for seed in (7, 7 + 2**40))
    assert not np.array_equal(a, b)
    sent = [
        privacy.ClientDP(1.0, 1.0, "distributed", 4, seed).encode({}, 0, 0, tree)[0]["w"] for seed in (7, 7 + 2**40)
    ]
    assert not np.array_equal(*sent)


def test_with_central_dp_the_server_rejects_an_upload_that_was_not_clipped():
    policy = privacy.policy(validate.Policy(), privacy.DPConfig(level="client", noise_multiplier=1.0, clip_norm=2.0))
    ok, big = {"w": np.full(4, 0.999, np.float32)}, {"w": np.full(4, 1.5, np.float32)}  # norms 1.998 and 3
    bad = validate.screen({0: ok, 1: big}, policy)
    assert list(bad) == [1] and bad[1].startswith("norm: 3 > ")
    distributed = privacy.DPConfig(level="client", noise="distributed", noise_multiplier=1.0)
    assert privacy.policy(validate.Policy(), distributed) == validate.Policy()  # noise makes norms exceed C


@pytest.mark.parametrize("level", ["record", "client", "distributed", "poisson_pld", "adaptive"])
def test_a_stopped_dp_run_resumes_with_the_same_noise_model_and_epsilon(tmp_path, monkeypatch, level):
    """The stopped run draws a random secret (dp_secret, mode 0600) and reads it back on resume: it
    ends where an uninterrupted run with that seed ends, bit for bit, having spent the same epsilon.
    poisson_pld: record level with Poisson sampling (its draws keyed by the same secret), PLD accounting.
    adaptive: client level with adaptive clipping (the server's C_t checkpointed, the count's noise keyed
    by the secret): the same clip norms round by round."""
    noise = {
        "distributed": ["dp.level=client", "dp.noise=distributed"],
        "poisson_pld": ["dp.level=record", "dp.sampling=poisson", "dp.accountant=pld"],
        "adaptive": ["dp.level=client", "dp.adaptive_quantile=0.5", "dp.count_noise=1.0"],
    }.get(level, [f"dp.level={level}"])
    extra = [*noise, "dp.noise_multiplier=1.1", "dp.clip_norm=0.5", "rounds=4"]
    stopped = str(tmp_path / "stopped")
    stopped_after_two_checkpoints(monkeypatch, small_config(*extra), stopped)
    secret = os.path.join(stopped, "dp_secret")
    assert oct(os.stat(secret).st_mode & 0o777) == "0o600"
    resumed = experiment.train(small_config(*extra), stopped, progress=False)
    with open(secret) as f:
        seed = int(f.read())
    straight = experiment.train(
        small_config(*extra, f"dp.noise_seed={seed}"), str(tmp_path / "straight"), progress=False
    )
    jax.tree.map(np.testing.assert_array_equal, final_params(stopped)[1], final_params(str(tmp_path / "straight"))[1])
    assert resumed["dp"]["epsilon"] == straight["dp"]["epsilon"] > 0
    eps = [m["epsilon"] for m in read_jsonl(os.path.join(stopped, "metrics.jsonl"))]
    assert eps == [m["epsilon"] for m in read_jsonl(str(tmp_path / "straight" / "metrics.jsonl"))]
    assert eps == sorted(eps) and eps[-1] == resumed["dp"]["epsilon"]
    clips = [m.get("clip_norm") for m in read_jsonl(os.path.join(stopped, "metrics.jsonl"))]
    assert clips == [m.get("clip_norm") for m in read_jsonl(str(tmp_path / "straight" / "metrics.jsonl"))]
    if level == "adaptive":  # ParaBlock: round 0's count moves the C of round 2 (and after the resume, 3)
        assert clips[:2] == [0.5, 0.5] and len(set(clips)) == 3, clips
        assert resumed["dp"]["noise_multiplier_update"] == privacy.update_multiplier(1.1, 1.0)
    assert "noise_seed" not in json.dumps(resumed) and str(seed) not in json.dumps(resumed)  # the secret stays put
    poisson = level == "poisson_pld"
    assert resumed["dp"]["sampling"] == ("poisson" if poisson else "without_replacement")
    assert resumed["dp"]["accountant"] == ("pld" if poisson else "rdp")


@pytest.mark.parametrize(
    "extra, line",
    [
        (["algorithm=fedbuff", "dp.level=client", "dp.noise_multiplier=1"], "an asynchronous buffer merges"),
        (["compression=topk", "dp.level=client", "dp.noise_multiplier=1"], "top-k picks coordinates from un-noised"),
        (["staleness=[1,2,1]", "dp.level=client", "dp.noise_multiplier=1"], "with per-client staleness"),
        (["dp.level=record", "dp.noise_multiplier=1", "dp.accountant=pld"], "PLD accountant has no event for sampling"),
        (["dp.level=client", "dp.noise_multiplier=1", "dp.sampling=poisson"], "so sampling gives no amplification"),
        (["dp.level=record", "dp.noise_multiplier=1", "dp.target_epsilon=2"], "not both"),
        (["schedule=gradient", "dp.level=record", "dp.noise_multiplier=1"], "un-noised gradient norms"),
        (["algorithm=flora", "dp.level=client", "dp.noise_multiplier=1"], "its upload is a trained adapter"),
        (["comm.max_norm_ratio=3", "dp.level=client", "dp.noise_multiplier=1"], "the median of the other"),
        (["dp.level=record", "dp.noise_multiplier=1", "dp.adaptive_quantile=0.5"], "no per-client clip norm to adapt"),
        (["dp.level=client", "dp.noise=distributed", "dp.noise_multiplier=1", "dp.adaptive_quantile=0.5"],
         "bits would need their own noise shares"),
        (["secagg.on=True", "dp.level=client", "dp.noise_multiplier=1", "dp.adaptive_quantile=0.5"],
         "would need a secure sum of their own"),
        (["dp.level=client", "dp.noise_multiplier=1", "dp.adaptive_quantile=0.5"], "must exceed z / 2 = 0.5"),
    ],
    ids=["fedbuff", "topk", "per_client_staleness", "pld_without_replacement", "client_poisson", "z_and_target",
         "gradient", "flora", "norm_ratio", "adaptive_record", "adaptive_distributed", "adaptive_secagg",
         "adaptive_count_noise"],
)  # fmt: skip
def test_a_combination_whose_guarantee_would_not_hold_is_refused_before_anything_is_written(tmp_path, extra, line):
    """experiment.setup, where every run (train.py, server, client, the Flower apps) is built, refuses
    it with one line and writes nothing (the CLI's exit 2 path: the test below)."""
    workdir = tmp_path / "run"
    with pytest.raises(ValueError) as e:
        experiment.setup(small_config(*extra), str(workdir))
    assert line in str(e.value) and "\n" not in str(e.value)
    assert not workdir.exists()


def test_a_refused_combination_is_one_line_exit_2_from_train_py(tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "train.py"), "--config", os.path.join(ROOT, "configs/tiny.py")]
    extra = ["algorithm=fedbuff", "dp.level=client", "dp.noise_multiplier=1"]
    cmd += [f"--config.{o}" for o in [*SMALL, *extra]] + ["--workdir", str(tmp_path / "run")]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert proc.returncode == 2, proc.stderr[-1500:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "an asynchronous buffer merges" in lines[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("level", ["record", "client"])
def test_every_synchronous_method_trains_at_both_levels(tmp_path, level):
    """One round each (FedCyBGD: two turns): the run spends a positive epsilon; for a block method and
    a LoRA method, its noise moves the model away from the same run with the same clipping and a
    negligible z (the noise path is one, `Algorithm.private_reduce`). Record level: the methods
    whose trained leaves differ (a layer block, FLoRA's fresh adapters, a rota's own block); FLoRA
    is refused at client level (test below)."""
    # Client level: one of each upload kind (a block delta, the full model, a LoRA adapter, a rota's
    # turn; FedBCD and FFA-LoRA share ParaBlock's and FedIT's paths). Record level: the methods whose
    # trained leaves differ (per-example gradients compile per method: ~8 s a run here).
    methods = ["parablock", "fedavg_full", "fedit", "fedcybgd"]
    if level == "record":
        methods = ["parablock", "flora", "fedcybgd"]
    for algorithm in methods:
        common = [f"algorithm={algorithm}", "rounds=2" if algorithm == "fedcybgd" else "rounds=1", "lora.rank=2"]
        dp = [f"dp.level={level}", "dp.clip_norm=0.1", "dp.noise_seed=1"]
        private = experiment.train(small_config(*common, *dp, "dp.noise_multiplier=1"), str(tmp_path / algorithm),
                                   progress=False)  # fmt: skip
        assert private["dp"]["epsilon"] > 0 and np.isfinite(private["final_train_loss"]), algorithm
        if algorithm == "parablock" or (level == "client" and algorithm == "fedit"):  # one noise path for all
            quiet = str(tmp_path / f"{algorithm}_quiet")
            experiment.train(small_config(*common, *dp, "dp.noise_multiplier=1e-9"), quiet, progress=False)
            a, b = final_params(str(tmp_path / algorithm))[1], final_params(quiet)[1]
            same = [np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)]
            assert not all(same), algorithm


# ----------------------------------------------------------------------------- adaptive clipping


def test_adaptive_clip_norm_falls_geometrically_to_the_median_of_the_update_norms():
    """A toy run (FedBCD: Algorithm 1 with no lag) whose five clients' updates have norms 0.5, 0.8, 1,
    1.25 and 2 every round (a linear loss, one SGD step of rate 1: the update is the client's vector).
    From C_0 = 10, gamma = 0.5, eta = 0.2: while every update is unclipped, b_bar ~ 1 and C shrinks by
    exp(-0.1) a round (b_bar clamped at 1; its noise, std sigma_b / M = 0.05, can slow it a little);
    then it stays at the median, 1."""
    norms = [0.5, 0.8, 1.0, 1.25, 2.0]
    m = len(norms)
    u = np.random.default_rng(0).standard_normal(64).astype(np.float32)
    u /= np.linalg.norm(u)
    params = {"w": np.zeros(64, np.float32)}
    clients = [{"v": np.tile(n * u, (4, 1)).astype(np.float32)} for n in norms]
    part = blocks.partition(params, [("w", "weights")])
    dp = privacy.ClientDP(clip_norm=10.0, noise_multiplier=0.1, clients_per_round=m, seed=1, adaptive_quantile=0.5,
                          adaptive_lr=0.2, count_noise=m / 20)  # fmt: skip
    fed = algorithms.configure(algorithm="fedbcd", rounds=60, num_clients=m, local_steps=1)
    fed = dataclasses.replace(fed, transforms=(dp,))
    _, history = loop.run(fed, params, lambda p, b: -jnp.sum(p["w"] * b["v"]), data.make_batches_fn(clients, 1),
                          part, optax.sgd(1.0))  # fmt: skip
    c = np.array([h["clip_norm"] for h in history])
    assert c[0] == 10.0
    above = np.flatnonzero(c[:-1] > 2.0)  # every update unclipped
    assert len(above) >= 15
    ratios = c[above + 1] / c[above]
    assert np.all(ratios >= np.exp(-0.1) - 1e-12) and np.all(ratios <= np.exp(-0.2 * 0.35)), ratios
    assert np.all(np.abs(c[-20:] - 1.0) < 0.1), c[-20:]  # at the median


def test_adaptive_clipping_noise_is_z_delta_times_the_rounds_clip_norm_and_the_count_is_reported():
    """The round's C_t comes from the announcement (not dp.clip_norm): uploads are clipped to it, one
    clipped to C_0 is rejected by the round's norm bound, the bits are stripped before validation and
    the sum, the update's noise is z_delta C_t / M (z_delta = (z^-2 - (2 sigma_b)^-2)^(-1/2) = 1.81 z
    here, told apart from z C_t / M), and b_bar is (count of merged bits + sigma_b N) / M, N from the
    server's secret and the round."""
    z, sigma_b, m, c_t, n = 1.0, 0.6, 5, 2e-3, 40_000
    dp = privacy.ClientDP(clip_norm=1.0, noise_multiplier=z, clients_per_round=m, seed=3, adaptive_quantile=0.5,
                          count_noise=sigma_b)  # fmt: skip
    fed = dataclasses.replace(algorithms.configure(algorithm="fedbcd", num_clients=m), transforms=(dp,))
    algo = algorithms.make(fed)
    announced, server = transforms.announce(fed.transforms, {"clip_norm": c_t}, 7)
    assert announced == {"clip_norm": c_t} and transforms.announced(server, 7) == announced
    chain = transforms.for_round(fed.transforms, announced)
    ups = [*_uploads(3, n, 1.0), {"w": np.full(n, 1e-3 / np.sqrt(n), np.float32)}]  # the last: norm 1e-3 < C_t
    sent = {i: transforms.encode(chain, {}, i, 0, u)[0] for i, u in enumerate(ups)}
    assert [float(sent[i][privacy.UNCLIPPED]) for i in range(4)] == [0.0, 0.0, 0.0, 1.0]
    assert all(validate.norm({"w": sent[i]["w"]}) <= c_t * (1 + 1e-6) for i in range(4))
    cheat = transforms.encode(fed.transforms, {}, 4, 0, {"w": np.full(n, 0.5 / np.sqrt(n), np.float32)})[0]  # C_0
    assert float(cheat[privacy.UNCLIPPED]) == 1.0
    like = {"w": jax.ShapeDtypeStruct((n,), jnp.float32)}
    side = exchange.server_side(algo, 7, like, lambda kept, bad: np.full(len(kept), 0.25), validate.Policy(),
                                announced=announced)  # fmt: skip
    result = side({**sent, 4: cheat})
    assert result.merged == [0, 1, 2, 3] and result.rejected[4].startswith("norm: ")
    signal = sum(np.asarray(sent[i]["w"]) for i in range(4)) / m
    z_delta = privacy.update_multiplier(z, sigma_b)
    assert z_delta == pytest.approx((1 - 1 / 1.44) ** -0.5) and z_delta > 1.8 * z
    assert np.std(np.asarray(result.down["w"]) - signal) == pytest.approx(z_delta * c_t / m, rel=0.05)
    noise = np.random.default_rng([3, 7, privacy.COUNT_STREAM]).standard_normal()
    assert result.report == {"unclipped": min(1.0, max(0.0, (1 + sigma_b * noise) / m))}
    after = transforms.observe(fed.transforms, server, 7, result.report)
    assert after["clip_norm"] == c_t * np.exp(-0.2 * (result.report["unclipped"] - 0.5))
    with pytest.raises(ValueError, match="is not a positive number"):
        transforms.for_round(fed.transforms, {"clip_norm": -1.0})


def test_adaptive_clipping_spends_exactly_the_epsilon_of_z():
    """The budget is the non-adaptive one for the same z (given or calibrated), and dp-accounting agrees
    that the round's pair, the sum with z_delta / 2 (replace-one: sensitivity 2C) composed with the
    count with sigma_b (sensitivity 1), is one Gaussian of z / 2 (Theorem 1 of Andrew et al.)."""
    fed = algorithms.configure(algorithm="parablock", rounds=10, num_clients=20, participation=0.5)
    algo = algorithms.REGISTRY["parablock"]
    for given in ({"noise_multiplier": 0.9}, {"target_epsilon": 4.0}):
        fixed = privacy.DPConfig(level="client", **given)
        adaptive = dataclasses.replace(fixed, adaptive_quantile=0.5, count_noise=5.0)
        z = privacy.noise_multiplier(adaptive, fed, algo, [1] * 20, 1)
        assert z == privacy.noise_multiplier(fixed, fed, algo, [1] * 20, 1)
        a, b = (privacy.budget(d, fed, algo, z, fed.rounds, [1] * 20, 1) for d in (adaptive, fixed))
        assert a["epsilon_per_client"] == b["epsilon_per_client"] and a["epsilon"] == b["epsilon"] > 0
        assert a["noise_multiplier"] == z and a["count_noise"] == 5.0 and a["adaptive_quantile"] == 0.5
        assert a["noise_multiplier_update"] == privacy.update_multiplier(z, 5.0) > z
    z_delta, rounds = privacy.update_multiplier(0.9, 2.0), 10
    pair = dp_accounting.ComposedDpEvent(
        [dp_accounting.GaussianDpEvent(z_delta / 2), dp_accounting.GaussianDpEvent(2.0)]
    )
    together = _direct(dp_accounting.SelfComposedDpEvent(pair, rounds), 1e-5)
    alone = _direct(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(0.45), rounds), 1e-5)
    assert together == pytest.approx(alone, rel=1e-9)
    assert privacy.count_noise(privacy.DPConfig(level="client", noise_multiplier=1.0), 100) == 5.0  # M / 20
