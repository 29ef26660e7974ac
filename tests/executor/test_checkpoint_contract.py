"""The checkpoint folder as a contract (executor.checkpoint_files), in one process: a checkpoint is used
only when every file is there and matches meta.json; anything else is refused in one line and left as it
was (never read, overwritten or pruned); nothing in a checkpoint runs code; one run per folder."""

import hashlib
import io
import json
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from autoplan.errors import InvalidInputError
from autoplan.executor import apply
from autoplan.executor.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from autoplan.executor.checkpoint_files import LOCK_FILE, FolderLock, SafeLoadPlanner
from autoplan.executor.train import make_optimizer, train
from autoplan.models.configs import named_config
from autoplan.schema import Plan
from dist_worker import build

MODEL, LR = "gpt-tiny", 1e-2
PLAN = Plan(global_batch_size=4, micro_batch_size=2)


def _fresh():
    model = build(MODEL)
    model.init_weights(seed=0)
    par = apply(model, PLAN)
    return par, make_optimizer(par, lr=LR)


def _train(directory: Path, steps: int, *, log=None, every: int = 1, seed: int = 0, lr: float = LR) -> list[dict]:
    par, _ = _fresh()
    config = named_config(MODEL)
    return train(par, steps=steps, seq_len=config["seq_len"], vocab=config["vocab"], device=torch.device("cpu"),
                 lr=lr, seed=seed, log=log, checkpoint_dir=str(directory), checkpoint_every=every,
                 keep_checkpoints=2, model_name=MODEL)


def _listing(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A folder after 3 steps saved every step, keeping 2: step_1 and step_2."""
    root = tmp_path_factory.mktemp("contract") / "run"
    _train(root, 3)
    assert sorted(p.name for p in root.iterdir()) == [LOCK_FILE, "step_1", "step_2"]
    return root


@pytest.fixture
def run(run_dir, tmp_path) -> Path:
    copy = tmp_path / "run"
    subprocess.run(["cp", "-a", str(run_dir), str(copy)], check=True)
    return copy


def _rewrite_meta(checkpoint: Path, **changes) -> None:
    meta = json.loads((checkpoint / "meta.json").read_text())
    (checkpoint / "meta.json").write_text(json.dumps({**meta, **changes}))


@pytest.mark.parametrize("damage, message", [
    ("meta.json missing", "step_2 has no meta.json: not complete"),
    ("step -3", "step_2: meta.json says step -3, not the folder's step"),
    ("step of another folder", "step_2: meta.json says step 5, not the folder's step"),
    ("step a string", "step_2: meta.json says step '2', not the folder's step"),
    ("no manifest", "step_2: meta.json lacks files"),
    ("shard missing", "step_2 lacks __0_0.distcp"),
    ("file added", "step_2 holds extra.bin, which autoplan did not write"),
])
def test_resume_refuses_a_damaged_newest_checkpoint_and_changes_nothing(damage, message, run):
    """Oracle: the contract. Before, a newest checkpoint without meta.json was skipped: the run resumed
    from step_1, overwrote step_2 and pruned step_1; with step -3 it trained steps -2.. and made step_-1."""
    newest = run / "step_2"
    if damage == "meta.json missing":
        (newest / "meta.json").unlink()
    elif damage == "step -3":
        _rewrite_meta(newest, step=-3)
    elif damage == "step of another folder":
        _rewrite_meta(newest, step=5)
    elif damage == "step a string":
        _rewrite_meta(newest, step="2")
    elif damage == "no manifest":
        meta = json.loads((newest / "meta.json").read_text())
        del meta["files"]
        (newest / "meta.json").write_text(json.dumps(meta))
    elif damage == "shard missing":
        (newest / "__0_0.distcp").unlink()
    else:
        (newest / "extra.bin").write_bytes(b"x")
    before = _listing(run)
    with pytest.raises(InvalidInputError, match=message) as err:
        _train(run, 6)
    assert "\n" not in str(err.value)
    assert _listing(run) == before


def test_resume_goes_on_from_the_newest_and_reports_strays(run):
    """Oracle: step_2 is the newest complete checkpoint, so steps 3..4 run; a file of the user's is named
    in a note and kept; pruning then leaves the newest two."""
    (run / "notes.txt").write_text("mine")
    lines = []
    records = _train(run, 5, log=lines.append)
    assert [r["step"] for r in records] == [3, 4]
    assert any("resumed from" in line and "step_2" in line for line in lines)
    assert any(line.startswith("note:") and "notes.txt" in line for line in lines)
    assert sorted(p.name for p in run.iterdir()) == [LOCK_FILE, "notes.txt", "step_3", "step_4"]


@pytest.mark.parametrize("change, message", [
    ({"seed": 1}, "written for seed 0; this run has seed 1"),
    ({"lr": 0.5}, "written for lr 0.01; this run has lr 0.5"),
])
def test_other_seed_or_lr_is_refused(change, message, run):
    before = _listing(run)
    with pytest.raises(InvalidInputError, match=message):
        _train(run, 6, **change)
    assert _listing(run) == before


def _forge_manifest(checkpoint: Path) -> None:
    """meta.json's manifest recomputed for the files as they are now (an attacker who edits both)."""
    meta = json.loads((checkpoint / "meta.json").read_text())
    meta["files"] = {p.name: {"bytes": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
                     for p in checkpoint.iterdir() if p.name != "meta.json"}
    (checkpoint / "meta.json").write_text(json.dumps(meta))


class _Payload:
    """Unpickling this opens (creates) a file: code run by pickle."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_crafted_metadata_runs_no_code(run, tmp_path):
    """Oracle: the payload is live (plain pickle.loads creates its file), yet a resume from a checkpoint whose
    .metadata carries it, with a manifest forged to match, refuses the checkpoint and creates nothing."""
    probe, marker = tmp_path / "probe", tmp_path / "marker"
    pickle.loads(pickle.dumps(_Payload(probe))).close()
    assert probe.exists()
    (run / "step_2" / ".metadata").write_bytes(pickle.dumps({"state_dict_metadata": _Payload(marker)}))
    _forge_manifest(run / "step_2")
    with pytest.raises(InvalidInputError, match=r"\.metadata refused \(UnpicklingError: (io|builtins)\.open is not allowed"):
        _train(run, 6)
    assert not marker.exists()


def test_non_tensor_values_are_read_without_pickle_code(tmp_path):
    """Oracle: DCP's default planner reads non-tensor values with torch.load(weights_only=False), which runs
    the payload; the planner autoplan loads with refuses it and creates nothing."""
    marker = tmp_path / "marker"
    payload = io.BytesIO()
    torch.save(_Payload(marker), payload)
    payload.seek(0)
    with pytest.raises(pickle.UnpicklingError):
        SafeLoadPlanner().load_bytes(None, payload)
    assert not marker.exists()


def test_a_checkpoint_of_autoplan_loads_through_the_safe_readers(run):
    """Oracle: the saved step: load_checkpoint (SafeReader + SafeLoadPlanner) returns step 2 + 1."""
    par, optimizer = _fresh()
    assert load_checkpoint(latest_checkpoint(run), par=par, optimizer=optimizer, model_name=MODEL, lr=LR) == 3


def test_one_run_per_folder_and_a_dead_runs_lock_does_not_block(tmp_path):
    """Oracle: flock semantics: a second lock on a held folder is refused naming the holder; after release,
    or after the holder is SIGKILLed, the folder can be locked again."""
    folder = tmp_path / "run"
    with FolderLock(folder):
        with pytest.raises(InvalidInputError, match=r"is in use by another run \(pid \d+ on .*\); one run per folder"):
            FolderLock(folder)
    FolderLock(folder).release()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from autoplan.executor.checkpoint_files "
                               "import FolderLock; lock = FolderLock(sys.argv[1]); print('held', flush=True); time.sleep(60)",
                               str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(InvalidInputError, match="in use by another run"):
            FolderLock(folder)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    FolderLock(folder).release()


def test_the_lock_is_never_taken_through_a_link(tmp_path):
    """Oracle: the link's target keeps its bytes; the refusal is one line."""
    folder, target = tmp_path / "run", tmp_path / "precious.txt"
    folder.mkdir()
    target.write_text("precious")
    (folder / LOCK_FILE).symlink_to(target)
    with pytest.raises(InvalidInputError, match="is a symbolic link"):
        FolderLock(folder)
    assert target.read_text() == "precious"


def test_training_into_a_busy_folder_is_refused_before_any_step(run):
    before = _listing(run)
    with FolderLock(run):
        with pytest.raises(InvalidInputError, match="in use by another run"):
            _train(run, 6)
    assert _listing(run) == before


def test_unwritable_folder_is_refused_before_any_step(tmp_path):
    """Oracle: /proc accepts no new folders (even for root); the refusal is one line and no step runs."""
    lines = []
    with pytest.raises(InvalidInputError, match=r"checkpoint folder /proc/autoplan-test/run is not writable"):
        _train(Path("/proc/autoplan-test/run"), 2, log=lines.append)
    assert lines == []


def test_a_save_torch_cannot_write_is_one_line(monkeypatch):
    """Oracle: DCP's failure (its CheckpointException is a BaseException, once a raw traceback per rank)
    reaches the caller as InvalidInputError naming the folder; /proc takes no new folders, even for root."""
    from autoplan.executor import checkpoint

    monkeypatch.setattr(checkpoint, "_prepare", lambda *args: None)  # what the writable check would refuse first
    par, optimizer = _fresh()
    with pytest.raises(InvalidInputError, match=r"checkpoint /proc/autoplan-test/step_0.tmp could not be written"):
        save_checkpoint("/proc/autoplan-test", par=par, optimizer=optimizer, step=0, model_name=MODEL)
