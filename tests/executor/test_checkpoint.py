"""Checkpoints (executor.checkpoint): a run saved after 2 steps and resumed in fresh processes' state
(fresh model, apply, optimizer) trains on exactly as the uninterrupted run, on 2 gloo ranks for each
parallelism the state is laid out differently in; bad checkpoints are refused in one line and left as
they are; only complete checkpoints count, and only the last K are kept."""

import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from torch.distributed.checkpoint import FileSystemReader

from autoplan.errors import InvalidInputError
from autoplan.executor import apply
from autoplan.executor.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from autoplan.executor.train import make_optimizer, train_step
from autoplan.models.configs import named_config
from autoplan.schema import Plan
from dist_worker import build, free_port

MODEL, GBS, MBS, LR = "gpt-tiny", 8, 2, 1e-2
STEPS, SAVED_AFTER = 4, 2  # train 2 steps, save, resume for 2 more
TOL = 1e-5
PLANS = {
    "dp2 zero0": Plan(dp=2, zero_stage=0, global_batch_size=GBS, micro_batch_size=MBS),
    "dp2 zero1": Plan(dp=2, zero_stage=1, global_batch_size=GBS, micro_batch_size=MBS),  # executor.zero_one
    "dp2 zero3": Plan(dp=2, zero_stage=3, global_batch_size=GBS, micro_batch_size=MBS),
    "tp2": Plan(tp=2, global_batch_size=GBS, micro_batch_size=MBS),
    "pp2 1f1b": Plan(pp=2, schedule="1f1b", global_batch_size=GBS, micro_batch_size=MBS),
}


def _fresh(plan: Plan, init_seed: int = 0):
    """A new model (weights from `init_seed`), parallelised for `plan`, and train()'s optimizer."""
    model = build(MODEL)
    model.init_weights(seed=init_seed)
    par = apply(model, plan)
    return par, make_optimizer(par, lr=LR)


def _train(par, optimizer, start: int, stop: int) -> list[float]:
    """Steps start..stop-1 as executor.train.train runs them; the loss of each."""
    config = named_config(MODEL)
    return [train_step(par, optimizer, step, seq_len=config["seq_len"], vocab=config["vocab"],
                       device=torch.device("cpu")) for step in range(start, stop)]


def _resumed(plan: Plan, directory: Path) -> tuple[list[float], list[float], Path]:
    """(uninterrupted losses, saved-then-resumed losses, the checkpoint) of `plan`."""
    par, optimizer = _fresh(plan)
    reference = _train(par, optimizer, 0, STEPS)
    par, optimizer = _fresh(plan)
    before = _train(par, optimizer, 0, SAVED_AFTER)
    path = save_checkpoint(directory, par=par, optimizer=optimizer, step=SAVED_AFTER - 1, model_name=MODEL)
    par, optimizer = _fresh(plan, init_seed=1)  # other weights: the load must overwrite all of them
    start = load_checkpoint(latest_checkpoint(directory), par=par, optimizer=optimizer, model_name=MODEL)
    assert start == SAVED_AFTER
    return reference, before + _train(par, optimizer, start, STEPS), path


def _refusals(checkpoints: dict[str, Path], scratch: Path) -> dict[str, str]:
    """The one-line errors of loading a checkpoint under another plan and a truncated checkpoint."""
    messages = {}
    par, optimizer = _fresh(PLANS["dp2 zero3"])
    with pytest.raises(InvalidInputError) as err:
        load_checkpoint(checkpoints["dp2 zero0"], par=par, optimizer=optimizer, model_name=MODEL)
    messages["other plan"] = str(err.value)
    # the digests are checked in shares: of .metadata, __0_0.distcp, __1_0.distcp, rank 1 hashes __0_0.distcp
    # alone, so a byte changed there (size kept) is found by rank 1 only and must stop rank 0 too
    broken = scratch / "broken" / checkpoints["dp2 zero3"].name
    if dist.get_rank() == 0:
        shutil.copytree(checkpoints["dp2 zero3"], broken)
        shard = broken / "__0_0.distcp"
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
    dist.barrier()
    before = _listing(broken)
    with pytest.raises(InvalidInputError) as err:
        load_checkpoint(broken, par=par, optimizer=optimizer, model_name=MODEL)
    messages["changed"] = str(err.value)
    assert _listing(broken) == before  # left on disk as it was
    return messages


def _worker(rank: int, world: int, port: int, root: str, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results, checkpoints = {}, {}
        for name, plan in PLANS.items():
            reference, resumed, checkpoints[name] = _resumed(plan, Path(root) / name.replace(" ", "_"))
            results[name] = (reference, resumed)
        results["refusals"] = _refusals(checkpoints, Path(root))
        out.put((rank, results))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Each rank's results of `_worker`, run by 2 gloo processes."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    root = tmp_path_factory.mktemp("checkpoints")
    mp.start_processes(_worker, args=(2, free_port(), str(root), out), nprocs=2, join=True, start_method="spawn")
    return {**dict(out.get(timeout=10) for _ in range(2)), "root": root}


@pytest.mark.parametrize("name", list(PLANS))
def test_resumed_run_matches_uninterrupted_run(name, two_ranks):
    """Oracle: the uninterrupted 4-step run of the same plan, model, seed and data, on the same ranks."""
    for rank in (0, 1):
        reference, resumed = two_ranks[rank][name]
        assert resumed == pytest.approx(reference, rel=TOL)
        assert reference[-1] < reference[0]  # it trains, so a lost optimizer state would show


def test_pipeline_checkpoint_has_the_unsplit_models_keys(two_ranks):
    """Oracle: the dp2 checkpoint of the whole model; pp2's two chunks save under the same global names
    (`model.layers.3.attention.wq.weight`, `optimizer.state.embed....exp_avg`), no chunk index."""
    def keys(name):
        path = latest_checkpoint(two_ranks["root"] / name.replace(" ", "_"))
        return set(FileSystemReader(path).read_metadata().state_dict_metadata)
    assert keys("pp2 1f1b") == keys("dp2 zero0")
    assert "model.layers.3.attention.wq.weight" in keys("pp2 1f1b")


def test_other_plan_is_refused_naming_the_plan(two_ranks):
    """Oracle: the two plans differ in zero_stage only, so the message names that field's two values."""
    for rank in (0, 1):
        message = two_ranks[rank]["refusals"]["other plan"]
        assert "was written for plan zero_stage=0; this run has plan zero_stage=3" in message
        assert "\n" not in message


def test_changed_shard_is_refused_on_every_rank(two_ranks):
    """Oracle: one byte of __0_0.distcp flipped, its size kept: only rank 1 hashes that file (the manifest
    is checked in shares), both ranks refuse it before torch reads anything."""
    for rank in (0, 1):
        assert "__0_0.distcp does not match its SHA-256" in two_ranks[rank]["refusals"]["changed"]


# ---- one process (plan gpus = 1, no process group) ----

SINGLE = Plan(global_batch_size=GBS, micro_batch_size=MBS)


def _listing(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def saved(tmp_path):
    """A single-process checkpoint of step 1 in tmp_path/run."""
    par, optimizer = _fresh(SINGLE)
    _train(par, optimizer, 0, 2)
    return save_checkpoint(tmp_path / "run", par=par, optimizer=optimizer, step=1, model_name=MODEL)


def test_single_process_resume(tmp_path):
    """Oracle: the uninterrupted single-process run (no process group: DCP's no-dist path)."""
    reference, resumed, path = _resumed(SINGLE, tmp_path)
    assert resumed == pytest.approx(reference, rel=TOL)
    assert path == tmp_path / "step_1" and not (tmp_path / "step_1.tmp").exists()


def test_only_the_last_k_are_kept_and_nothing_else_deleted(tmp_path):
    """Oracle: after saves of steps 1..4 with keep=2, steps 3 and 4 remain, and every other entry."""
    par, optimizer = _fresh(SINGLE)
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "step_9.tmp").mkdir()
    (tmp_path / "step_0").mkdir()  # no meta.json: not a checkpoint of ours
    for step in range(1, 5):
        save_checkpoint(tmp_path, par=par, optimizer=optimizer, step=step, model_name=MODEL, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "step_0", "step_3", "step_4", "step_9.tmp"]


def test_a_pruning_cut_short_leaves_no_half_checkpoint(tmp_path):
    """Oracle: a pruning renames step_<N> to step_<N>.pruned before deleting it, so a kill during the deletion
    (seen under load: a step_<N> without its meta.json, refused by the resume) leaves no broken step_<N>; the
    leftover is neither a checkpoint nor a stray, and the next save removes it."""
    from autoplan.executor.checkpoint import latest_checkpoint, stray_entries

    par, optimizer = _fresh(SINGLE)
    save_checkpoint(tmp_path, par=par, optimizer=optimizer, step=1, model_name=MODEL, keep=2)
    (tmp_path / "step_0.pruned").mkdir()  # what a kill in the middle of pruning step_0 leaves
    (tmp_path / "step_0.pruned" / "shard").write_text("half deleted")
    assert latest_checkpoint(tmp_path) == tmp_path / "step_1" and stray_entries(tmp_path) == []
    save_checkpoint(tmp_path, par=par, optimizer=optimizer, step=2, model_name=MODEL, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_1", "step_2"]


def test_a_checkpoint_is_never_overwritten(saved):
    """Oracle: the contract: a second save of step 1 is refused on the spot and step_1 keeps its bytes."""
    before = _listing(saved.parent)
    par, optimizer = _fresh(SINGLE, init_seed=1)
    with pytest.raises(InvalidInputError, match="exists already; autoplan does not overwrite a checkpoint"):
        save_checkpoint(saved.parent, par=par, optimizer=optimizer, step=1, model_name=MODEL)
    assert _listing(saved.parent) == before


def test_latest_ignores_tmp_and_refuses_incomplete(tmp_path, saved):
    """Oracle: step_5.tmp (even with a meta.json) is a save in progress, never read; step_1 is the newest
    complete one; a step_7 without meta.json was not published by autoplan: refused, by name, and kept."""
    run = saved.parent
    shutil.copytree(saved, run / "step_5.tmp")
    assert latest_checkpoint(run) == saved
    (run / "step_7").mkdir()
    with pytest.raises(InvalidInputError, match=r"step_7 has no meta.json: not complete"):
        latest_checkpoint(run)
    assert (run / "step_7").is_dir() and latest_checkpoint(tmp_path / "absent") is None


def test_model_and_rank_mismatch_named(saved):
    """Oracle: meta.json says gpt-tiny on 1 rank; a run of another model is refused naming both."""
    par, optimizer = _fresh(SINGLE)
    with pytest.raises(InvalidInputError, match=r"written for model gpt-tiny; this run has model llama-x$"):
        load_checkpoint(saved, par=par, optimizer=optimizer, model_name="llama-x")


@pytest.mark.parametrize("damage", ["no meta.json", "meta.json not JSON", "truncated .metadata",
                                    "truncated shard", "missing shard"])
def test_corrupt_checkpoint_refused_and_left_untouched(damage, saved):
    """Oracle: each damage makes the checkpoint unreadable; the error is InvalidInputError and the files
    are byte-for-byte what they were before the load."""
    shard = next(saved.glob("*.distcp"))
    if damage == "no meta.json":
        (saved / "meta.json").unlink()
    elif damage == "meta.json not JSON":
        (saved / "meta.json").write_text("{\"step\": 1,")
    elif damage == "truncated .metadata":
        (saved / ".metadata").write_bytes((saved / ".metadata").read_bytes()[:20])
    elif damage == "truncated shard":
        shard.write_bytes(shard.read_bytes()[:100])
    else:
        shard.unlink()
    before = _listing(saved.parent)
    par, optimizer = _fresh(SINGLE)
    with pytest.raises(InvalidInputError, match=str(saved)):
        load_checkpoint(saved, par=par, optimizer=optimizer, model_name=MODEL)
    assert _listing(saved.parent) == before
