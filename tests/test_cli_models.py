"""The CLI with Hugging Face configs as MODEL, and --fix: every pinned value honoured or refused in one line."""

import json
from pathlib import Path

import pytest

CONFIGS = Path(__file__).parent / "hf_configs"


def test_search_takes_a_hugging_face_config(run_cli):
    pytest.importorskip("transformers")
    code, out, err = run_cli(["search", str(CONFIGS / "llama.json"), "--gpus", "4", "--global-batch", "8", "--json"])
    assert code == 0, err
    assert json.loads(out)["ranked"]


def test_a_config_without_model_type_is_one_line(tmp_path, run_cli):
    pytest.importorskip("transformers")
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"hidden_size": 64}))
    code, _, err = run_cli(["search", str(path), "--gpus", "2"])
    assert code == 2 and "model_type" in err and len(err.strip().splitlines()) == 1


def test_fix_sequence_parallel_false_is_honoured(run_cli):
    code, out, err = run_cli(["search", "gpt-tiny", "--gpus", "4", "--fix", "tp=2", "--fix", "sequence_parallel=false",
                              "--json", "--top", "3"])
    assert code == 0, err
    plans = [row["plan"] for row in json.loads(out)["ranked"]]
    assert plans and all(plan["tp"] == 2 and plan["sequence_parallel"] is False for plan in plans)


def test_fix_etp_is_honoured_and_shown(run_cli):
    """--fix etp=2 on moe-tiny (4 experts of width 128) on 4 GPUs: every ranked plan splits its experts' width
    over 2 ranks, and the table gains an etp column (it has none when no plan has etp > 1)."""
    code, out, err = run_cli(["search", "moe-tiny", "--gpus", "4", "--global-batch", "8", "--fix", "etp=2",
                              "--json", "--top", "3"])
    assert code == 0, err
    plans = [row["plan"] for row in json.loads(out)["ranked"]]
    assert plans and all(plan["etp"] == 2 for plan in plans)
    code, out, err = run_cli(["search", "moe-tiny", "--gpus", "4", "--global-batch", "8", "--fix", "etp=2", "--top", "3"])
    assert code == 0 and " etp " in out
    code, out, _ = run_cli(["search", "moe-tiny", "--gpus", "4", "--global-batch", "8", "--fix", "etp=1", "--top", "3"])
    assert code == 0 and " etp " not in out


@pytest.mark.parametrize("pair", ["global_batch_size=8", "sequence_parallel=maybe", "layers_per_stage=2"])
def test_a_pin_the_search_cannot_honour_is_refused(pair, run_cli):
    code, _, err = run_cli(["search", "gpt-tiny", "--gpus", "4", "--fix", pair])
    assert code == 2 and len(err.strip().splitlines()) == 1


def test_profile_notes_are_printed(run_cli):
    pytest.importorskip("transformers")
    code, _, err = run_cli(["search", str(CONFIGS / "gpt2.json"), "--gpus", "2", "--global-batch", "4", "--json"])
    assert code == 0 and "note:" in err and "tied" in err
