"""CREPA under torch.distributed: two gloo ranks on the CPU, started with spawn.

DDP (CREPA inside the wrapped forward, and the drop-in's projector registered on the model) and
FSDP2 give the gradients of one process on the whole batch; the schedule agrees across ranks while
the alignment score is per shard; a FeatureCache filled by two ranks at once stays whole. Spawning
costs seconds, so each spawned run makes many checks and the tests below read its results.
"""
import datetime
import os
import queue
import socket
import time
import traceback
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from crepa_kernels import CrepaConfig, CrepaLoss
from crepa_kernels.integrations.simpletuner import CrepaRegularizer
from crepa_kernels.teacher.cache import FeatureCache, precompute_features

WORLD = 2
RUN_TIMEOUT_S = 150  # a hang (a rank stuck in a collective) fails the test instead of blocking CI
PG_TIMEOUT = datetime.timedelta(seconds=60)

# One global batch per step, split in two shards. Teacher tokens (4) differ from the DiT's (6) so
# token resampling is on the gradient path; the teacher has its own fixed features.
B, T, N, D_IN, D_H = 4, 3, 6, 5, 8
T_F, N_F, D_E = 3, 4, 7
# linear schedule: warmup to step 2, decay over 10 steps, cut off from step 4 -> 0.25, 0.5, 0.4375, 0, 0
STEPS = (1, 2, 3, 4, 5)
WEIGHTS = (0.25, 0.5, 0.4375, 0.0, 0.0)
LIVE = tuple(i for i, w in enumerate(WEIGHTS) if w > 0)
LR = 0.5
SEED = 100  # rank r builds its model with SEED + r; DDP / FSDP make every rank start from rank 0's
TOL = 1e-6


# ------------------------------------------------------------------------------ spawn helper
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, port, fn, args, results):
    try:
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(port)
        torch.set_num_threads(1)
        dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=PG_TIMEOUT)
        try:
            fn(rank, *args)
        finally:
            dist.destroy_process_group()
        results.put((rank, None))
    except BaseException:
        results.put((rank, traceback.format_exc()))


def run_ranks(fn, *args, timeout=RUN_TIMEOUT_S):
    """Run ``fn(rank, *args)`` in WORLD spawned processes joined in one gloo group; fail on error or hang."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_entry, args=(r, port, fn, args, results), daemon=True) for r in range(WORLD)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    reported, errors = set(), {}
    try:
        while len(reported) < WORLD:
            try:
                rank, err = results.get(timeout=1.0)
            except queue.Empty:
                if time.monotonic() > deadline:
                    break
                silent = [r for r, p in enumerate(procs) if r not in reported and p.exitcode is not None]
                if silent:
                    try:  # its report may have landed just now
                        rank, err = results.get(timeout=2.0)
                    except queue.Empty:
                        errors.update({r: f"exited with code {procs[r].exitcode} without reporting" for r in silent})
                        break
                else:
                    continue
            reported.add(rank)
            if err is not None:
                errors[rank] = err
                # the other rank may now wait in a collective until the group times out: don't wait for it
                deadline = min(deadline, time.monotonic() + 10)
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        pytest.fail("\n".join(f"rank {r}:\n{e}" for r, e in sorted(errors.items())))
    if len(reported) < WORLD:
        pytest.fail(f"ranks {sorted(set(range(WORLD)) - reported)} did not finish within {timeout} s")


# ------------------------------------------------------------------------------ models and data
def _config(**extra):
    return CrepaConfig.from_dict({
        "crepa_enabled": True, "crepa_block_index": 0, "crepa_lambda": 0.5, "crepa_scheduler": "linear",
        "crepa_warmup_steps": 2, "crepa_decay_steps": 10, "crepa_cutoff_step": 4, "crepa_backend": "torch",
        **extra,
    })


def _dropin_config():
    # backbone mode: the teacher is a (here fixed) deeper block, so no VAE or encoder is needed
    return _config(crepa_feature_source="backbone", crepa_teacher_block_index=1)


def _data():
    g = torch.Generator().manual_seed(1234)
    return {
        "x": torch.randn(len(STEPS), B, T, N, D_IN, generator=g),
        "encoder_feats": torch.randn(B, T_F, N_F, D_E, generator=g),
        "backbone_feats": torch.randn(B, T_F, N_F, D_H, generator=g),
    }


def _shard(t, rank):
    if rank is None:
        return t
    per = t.shape[0] // WORLD
    return t[rank * per:(rank + 1) * per]


class Joint(nn.Module):
    """A DiT stand-in and CrepaLoss in one module, so one DDP / FSDP wrapper reduces both."""

    def __init__(self, config):
        super().__init__()
        self.dit = nn.Linear(D_IN, D_H)
        self.crepa = CrepaLoss(config, D_H, D_E, max_train_steps=10)

    def forward(self, x, feats, step):
        hidden = self.dit(x)  # (b, T, N, D_h)
        main = hidden.pow(2).mean()  # stands in for the diffusion loss (also a mean over the batch)
        crepa, logs = self.crepa(hidden, feats, step=step)
        return (main if crepa is None else main + crepa), logs


class StandIn(nn.Module):
    def __init__(self):
        super().__init__()
        self.dit = nn.Linear(D_IN, D_H)

    def forward(self, x):
        return self.dit(x)


def _build_joint(seed):
    torch.manual_seed(seed)
    return Joint(_config())


def _build_dropin(seed):
    torch.manual_seed(seed)
    model = StandIn()
    crepa = CrepaRegularizer(_dropin_config(), "cpu", D_H, max_train_steps=10)
    crepa.attach_to_model(model)  # model.crepa_projector: DDP sees the projector's parameters
    return model, crepa


def _joint_step(call):
    def step_fn(x, data, rank, step):
        return call(x, _shard(data["encoder_feats"], rank), step)
    return step_fn


def _dropin_step(call, crepa):
    def step_fn(x, data, rank, step):
        hidden = call(x)
        term, logs = crepa.compute_loss(hidden, None, frame_features=_shard(data["backbone_feats"], rank), step=step)
        if rank is not None:
            # Under torch.distributed a weight-0 step still returns a (zero) term attached to the
            # projector, so DDP gets a gradient for it on every rank and stays in step.
            assert term is not None and term.requires_grad
            if logs["crepa_cutoff"]:
                assert float(term) == 0.0
        return hidden.pow(2).mean() + (0.0 if term is None else term), logs
    return step_fn


def _grad(p):
    if p.grad is None:
        return None
    g = p.grad
    return (g.full_tensor() if hasattr(g, "full_tensor") else g).detach().clone()


def _value(p):
    return (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()


def _train(named, params, step_fn, rank, all_reduce_score=False):
    """SGD over STEPS; the gradients, logs and final parameters as plain tensors and floats."""
    data = _data()
    opt = torch.optim.SGD(params, lr=LR)
    out = {"grads": [], "logs": [], "score_global": []}
    for i, step in enumerate(STEPS):
        opt.zero_grad(set_to_none=True)
        loss, logs = step_fn(_shard(data["x"][i], rank), data, rank, step)
        loss.backward()
        out["grads"].append({n: _grad(p) for n, p in named})
        out["logs"].append({k: float(v) for k, v in logs.items()})
        score = logs.get("crepa_alignment_score")
        if all_reduce_score and score is not None:
            # the per-shard score made global the way a user would log it
            s = torch.as_tensor(score, dtype=torch.float32).clone()
            dist.all_reduce(s)
            out["score_global"].append(float(s) / dist.get_world_size())
        opt.step()
    out["params"] = {n: _value(p) for n, p in named}
    return out


def _reference():
    """One process, the whole batch: what every rank's gradients must equal."""
    joint = _build_joint(SEED)
    model, crepa = _build_dropin(SEED)
    return {
        "joint": _train(list(joint.named_parameters()), joint.parameters(), _joint_step(joint), None),
        "dropin": _train(list(model.named_parameters()), model.parameters(), _dropin_step(model, crepa), None),
    }


# ------------------------------------------------------------------------------ the spawned run
def _distributed_worker(rank, workdir):
    res = {}

    # (a) CrepaLoss inside the forward of the wrapped module, DDP at its defaults: the weight-0 steps
    # (warmup start, cutoff) return a zero term attached to the projector, so none goes unused.
    joint = _build_joint(SEED + rank)
    ddp = DDP(joint)
    res["joint_init"] = {n: p.detach().clone() for n, p in joint.named_parameters()}
    res["joint"] = _train(list(joint.named_parameters()), ddp.parameters(), _joint_step(ddp), rank,
                          all_reduce_score=True)

    # (b) the drop-in: projector registered on the model as crepa_projector, used after the forward.
    # Here find_unused_parameters must stay False (True fails on parameters used outside forward).
    model, crepa = _build_dropin(SEED + rank)
    ddp = DDP(model)
    res["dropin"] = _train(list(model.named_parameters()), ddp.parameters(), _dropin_step(ddp, crepa), rank)

    # (c) FSDP2: the same joint module, sharded; the projector stays in the root unit
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        res["fsdp"] = None
    else:
        joint = _build_joint(SEED)  # FSDP2 does not broadcast: every rank starts from the same weights
        fully_shard(joint.dit)
        fully_shard(joint)
        res["fsdp"] = _train(list(joint.named_parameters()), joint.parameters(), _joint_step(joint), rank)

    # (d) a similarity threshold between the two shards' scores: does every rank get the same weight?
    probe = _build_joint(SEED)
    data = _data()
    feats = _shard(data["encoder_feats"], rank)
    with torch.no_grad():
        hidden = probe.dit(_shard(data["x"][0], rank))
        probe = probe.crepa
        _, logs = probe(hidden, feats, step=STEPS[0])
        scores = [torch.zeros(()) for _ in range(WORLD)]
        dist.all_gather(scores, logs["crepa_alignment_score"].reshape(()).float())
        threshold = float(sum(scores)) / WORLD  # = the global batch's score
        gated = CrepaLoss(_config(crepa_similarity_threshold=threshold), D_H, D_E, max_train_steps=10)
        gated.projector.load_state_dict(probe.projector.state_dict())
        _, logs = gated(hidden, feats, step=STEPS[0])
    res["threshold"] = {"scores": [float(s) for s in scores], "weight": float(logs["crepa_weight"])}

    # (d2) a validation call on rank 0 alone, in eval mode, with that threshold: it makes no collective
    # (a training-mode call all-reduces the score and would wait for rank 1 forever), and it leaves the
    # schedule as it was
    gated.eval()
    before = gated.scheduler.state_dict()
    if rank == 0:
        with torch.no_grad():
            gated(hidden, feats, step=STEPS[0])
    dist.barrier()
    res["eval_rank0"] = gated.scheduler.state_dict() == before

    # (d3) shards of unequal size (1 video and 3): the score fed to the EMA is the global batch's, not
    # the mean of the two shards' scores
    joint = _build_joint(SEED)
    part = slice(0, 1) if rank == 0 else slice(1, B)
    with torch.no_grad():
        hidden_all = joint.dit(data["x"][0])
        _, logs = joint.crepa(hidden_all, data["encoder_feats"], step=STEPS[0])  # one process, whole batch
        uneven = CrepaLoss(_config(crepa_similarity_threshold=10.0, crepa_similarity_ema_decay=0.0,
                                   crepa_threshold_mode="recoverable"), D_H, D_E, max_train_steps=10)
        uneven.projector.load_state_dict(joint.crepa.projector.state_dict())
        _, shard_logs = uneven(hidden_all[part], data["encoder_feats"][part], step=STEPS[0])
    res["uneven"] = {"ema": float(uneven.scheduler.similarity_ema), "whole": float(logs["crepa_alignment_score"]),
                     "shard": float(shard_logs["crepa_alignment_score"])}

    # (d4) crepa_check_finite with a NaN in rank 1's hidden states only: every rank raises, naming the
    # input, so that no rank goes on to a collective the other will never join
    checked = CrepaLoss(_config(crepa_check_finite=True), D_H, D_E, max_train_steps=10)
    h = hidden_all[part].clone()
    if rank == 1:
        h[0, 0, 0, 0] = float("nan")
    try:
        checked(h, data["encoder_feats"][part], step=STEPS[0])
        res["finite"] = None
    except ValueError as e:
        res["finite"] = str(e)
    dist.barrier()

    # (e) the drop-in with crepa_lambda 0: it computes and logs nothing, as the trainer, but the projector
    # it registered on the DDP-wrapped model still needs a (zero) gradient on every rank, every step.
    torch.manual_seed(SEED)
    model = StandIn()
    crepa = CrepaRegularizer(_config(crepa_feature_source="backbone", crepa_teacher_block_index=1,
                                     crepa_lambda=0.0), "cpu", D_H, max_train_steps=10)
    crepa.attach_to_model(model)
    ddp = DDP(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=LR)
    res["lambda0"] = []
    for i in range(3):
        opt.zero_grad(set_to_none=True)
        hidden = ddp(_shard(data["x"][i], rank))
        term, logs = crepa.compute_loss(hidden, None, frame_features=feats, step=i)
        (hidden.pow(2).mean() + term).backward()
        opt.step()
        res["lambda0"].append((float(term), term.requires_grad, logs,
                               float(model.crepa_projector[1].weight.grad.abs().max())))

    torch.save(res, os.path.join(workdir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("ddp"))
    run_ranks(_distributed_worker, workdir)
    ranks = [torch.load(os.path.join(workdir, f"rank{r}.pt")) for r in range(WORLD)]
    return ranks, _reference()


def _assert_close(got, want, what):
    # a parameter with no gradient (the projector on a cut-off step) counts as a zero gradient
    if got is None and want is None:
        return
    got = torch.zeros_like(want) if got is None else got
    want = torch.zeros_like(got) if want is None else want
    err = (got - want).abs().max().item()
    assert err <= TOL, f"{what}: max abs difference {err:.3g} > {TOL}"


def _assert_matches_reference(run, ref, where):
    # Why a shard's gradient equals the whole batch's: the loss is a mean over the batch,
    # L = (1/B) sum_b l_b, where l_b (the diffusion stand-in and -w * per_video[b]) depends only on
    # sample b: LayerNorm, the projector, frame/token alignment and the neighbour sum all act within
    # one video. Rank r holds B/W samples and computes L_r = (W/B) sum_{b in shard r} l_b. DDP sums
    # the ranks' gradients and divides by W: (1/W) sum_r grad L_r = (1/B) sum_b grad l_b = grad L.
    # This needs equal shards and the same weight w on every rank (the schedule depends on the step
    # only; with a similarity threshold, CrepaLoss averages the score over ranks before the EMA).
    for i in range(len(STEPS)):
        for name, want in ref["grads"][i].items():
            _assert_close(run["grads"][i][name], want, f"{where}, step {STEPS[i]}, grad of {name}")
    for name, want in ref["params"].items():
        _assert_close(run["params"][name], want, f"{where}, parameter {name} after {len(STEPS)} steps")


# ------------------------------------------------------------------------------ tests
def test_reference_gradients_are_not_trivial(runs):
    _, ref = runs
    for kind, proj in (("joint", "crepa.projector"), ("dropin", "crepa_projector")):
        for i in range(len(STEPS)):
            grads = ref[kind]["grads"][i]
            proj_norm = sum(g.abs().sum().item() for n, g in grads.items() if n.startswith(proj) and g is not None)
            assert (proj_norm > 1e-4) == (i in LIVE), (kind, STEPS[i], proj_norm)
            assert grads[next(n for n in grads if n.startswith("dit."))].abs().sum() > 1e-4


def test_ddp_broadcasts_rank0_weights(runs):
    ranks, _ = runs
    ref = _build_joint(SEED)
    for r, res in enumerate(ranks):
        for name, p in ref.named_parameters():
            assert torch.equal(res["joint_init"][name], p.detach()), (r, name)


@pytest.mark.parametrize("kind", ["joint", "dropin"])
def test_ddp_gradients_equal_one_process_on_the_whole_batch(runs, kind):
    ranks, ref = runs
    for r, res in enumerate(ranks):
        _assert_matches_reference(res[kind], ref[kind], f"DDP {kind}, rank {r}")


def test_fsdp2_gradients_equal_one_process_on_the_whole_batch(runs):
    ranks, ref = runs
    if ranks[0]["fsdp"] is None:
        pytest.skip("torch.distributed.fsdp.fully_shard is not available")
    for r, res in enumerate(ranks):
        _assert_matches_reference(res["fsdp"], ref["joint"], f"FSDP2, rank {r}")


@pytest.mark.parametrize("kind", ["joint", "dropin"])
def test_ranks_log_the_same_weight_and_their_own_score(runs, kind):
    ranks, ref = runs
    ref_logs = ref[kind]["logs"]
    for i, step in enumerate(STEPS):
        logs = [res[kind]["logs"][i] for res in ranks]
        # the schedule is a function of the step: every rank weights the term alike
        assert [lg["crepa_weight"] for lg in logs] == [pytest.approx(WEIGHTS[i], abs=1e-12)] * WORLD
        assert [bool(lg["crepa_cutoff"]) for lg in logs] == [i not in LIVE] * WORLD
        if i not in LIVE:
            continue
        # the score and the loss are means over the rank's shard: they differ between ranks, and
        # their average over the (equal) shards is the whole batch's value
        s = [lg["crepa_alignment_score"] for lg in logs]
        assert abs(s[0] - s[1]) > 1e-3, (step, s)
        assert sum(s) / WORLD == pytest.approx(ref_logs[i]["crepa_alignment_score"], abs=TOL)
        loss = [lg["crepa_loss"] for lg in logs]
        assert sum(loss) / WORLD == pytest.approx(ref_logs[i]["crepa_loss"], abs=TOL)
        if kind == "joint":
            for r, res in enumerate(ranks):  # all-reduce (sum / world size) gives the global number
                assert res[kind]["score_global"][LIVE.index(i)] == pytest.approx(
                    ref_logs[i]["crepa_alignment_score"], abs=TOL), (r, step)


def test_similarity_threshold_gives_every_rank_the_same_weight(runs):
    ranks, _ = runs
    scores = ranks[0]["threshold"]["scores"]
    assert abs(scores[0] - scores[1]) > 1e-3  # the threshold lies strictly between the shards' scores
    weights = [res["threshold"]["weight"] for res in ranks]
    assert weights[0] == weights[1], weights


# ------------------------------------------------------------------------------ feature cache
OWN, SHARED, REPEATS, ITEMS = 12, 6, 4, 10


def test_the_threshold_ema_follows_the_global_batch_when_shards_differ_in_size(runs):
    ranks, _ = runs
    got = [r["uneven"] for r in ranks]
    whole = got[0]["whole"]
    # the two shards' plain mean is another number: the case tells the two readings apart
    assert abs((got[0]["shard"] + got[1]["shard"]) / 2 - whole) > 1e-3
    assert [g["ema"] for g in got] == [pytest.approx(whole, abs=TOL)] * WORLD


def test_check_finite_raises_on_every_rank_when_one_rank_sees_nan(runs):
    ranks, _ = runs
    assert [r["finite"] for r in ranks] == ["hidden_states holds NaN or Inf values on 1 of 2 ranks "
                                            "(crepa_check_finite=True)"] * WORLD


def test_an_eval_call_on_one_rank_alone_does_not_wait_for_the_others(runs):
    ranks, _ = runs
    assert [r["eval_rank0"] for r in ranks] == [True] * WORLD  # reached the barrier, schedule untouched


def test_dropin_with_lambda_zero_keeps_ddp_in_step(runs):
    ranks, _ = runs
    for r in ranks:
        # three steps ran (DDP raises on the second when a registered parameter got no gradient)
        assert r["lambda0"] == [(0.0, True, None, 0.0)] * 3


def _entry_value(writer, index, grid):
    # grid[0] * grid[1] tokens of 128 values (16 to 105 KiB), constant per (writer, index): a torn or mixed
    # entry cannot pass for a whole one
    return torch.full((grid[0] * grid[1], 128), float(1000 * writer + index))


def _cache_worker(rank, directory, outdir):
    warnings.simplefilter("error")  # an unreadable or mismatched entry warns in get(): make it fail
    cache = FeatureCache(directory)
    seen_mid_write = 0
    dist.barrier()  # both ranks start writing together
    for i in range(max(OWN, SHARED * REPEATS)):
        if i < OWN:
            cache.put(f"rank{rank}-{i}", _entry_value(rank, i, (rank + 1, i + 1)), grid=(rank + 1, i + 1))
        if i < SHARED * REPEATS:
            j = i % SHARED
            cache.put(f"shared-{j}", _entry_value(rank, 100 + j, (rank + 1, 100 + j)), grid=(rank + 1, 100 + j))
            # read the other shared keys while the other rank may be replacing them
            for k in range(SHARED):
                got = cache.get(f"shared-{k}")
                if got is not None:
                    writer = got.grid[0] - 1
                    assert writer in range(WORLD) and got.grid[1] == 100 + k, got.grid
                    assert torch.equal(got.features, _entry_value(writer, 100 + k, got.grid)), (k, writer)
                    seen_mid_write += 1
    dist.barrier()  # all writes done: both ranks must now read the same, whole entries
    final = {}
    for key in sorted(cache.keys()):
        got = cache.get(key)
        final[key] = (got.grid, got.features.clone())
    dist.barrier()  # the precompute below must not add keys while the other rank lists them

    # precompute with the dataset sharded over the ranks, then a pass over everything finds it all
    def compute(item):
        return torch.full((8, 4), float(item)), (2, 4)

    def key_fn(item):
        return f"item-{item}"

    mine = precompute_features(list(range(ITEMS))[rank::WORLD], compute, cache, key_fn, progress=False)
    dist.barrier()
    again = precompute_features(list(range(ITEMS)), compute, cache, key_fn, progress=False)
    torch.save({"final": final, "seen_mid_write": seen_mid_write, "mine": tuple(mine), "again": tuple(again)},
               os.path.join(outdir, f"rank{rank}.pt"))


def test_feature_cache_shared_by_concurrent_ranks(tmp_path):
    directory, outdir = tmp_path / "cache", tmp_path / "out"
    outdir.mkdir()
    run_ranks(_cache_worker, str(directory), str(outdir))
    ranks = [torch.load(outdir / f"rank{r}.pt") for r in range(WORLD)]

    own = {f"rank{r}-{i}" for r in range(WORLD) for i in range(OWN)}
    shared = {f"shared-{j}" for j in range(SHARED)}
    items = {f"item-{i}" for i in range(ITEMS)}
    cache = FeatureCache(directory)
    assert set(cache.keys()) == own | shared | items
    temps = [os.path.join(r, n) for r, _, files in os.walk(directory) for n in files if n.endswith(".tmp")]
    assert temps == []

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for key in sorted(own):
            r, i = (int(v) for v in key[len("rank"):].split("-"))
            got = cache.get(key)
            assert got.grid == (r + 1, i + 1) and torch.equal(got.features, _entry_value(r, i, (r + 1, i + 1))), key
        for key in sorted(shared):
            j = int(key.split("-")[1])
            got = cache.get(key)
            writer = got.grid[0] - 1  # the last writer wins, whole
            assert writer in range(WORLD) and got.grid[1] == 100 + j, (key, got.grid)
            assert torch.equal(got.features, _entry_value(writer, 100 + j, got.grid)), key
        for key in sorted(items):
            got = cache.get(key)
            assert got.grid == (2, 4) and torch.equal(got.features, torch.full((8, 4), float(key.split("-")[1])))

    for res in ranks:
        assert res["seen_mid_write"] > 0  # the concurrent reads did find entries
        assert set(res["final"]) == own | shared  # as read by each rank after the writes
        for key, (grid, feats) in res["final"].items():
            disk = cache.get(key)
            assert grid == disk.grid and torch.equal(feats, disk.features), key
        assert res["mine"] == (ITEMS // WORLD, 0)  # its shard, computed once
        assert res["again"] == (0, ITEMS)  # everything present: nothing recomputed
