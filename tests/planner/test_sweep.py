"""ap.sweep: the best plan per GPU count, held to a search at each count."""

import json

import pytest
import torch

import autoplan as ap
from autoplan.errors import InvalidInputError
from autoplan.planner.sweep import gpu_counts, parse_tokens


@pytest.fixture(scope="module")
def profile():
    with torch.device("meta"):
        model = ap.models.gpt(layers=4, hidden=512, heads=8, vocab=4096, seq_len=512)
    return ap.profile_model(model)


def test_gpu_counts_are_powers_of_two_and_whole_nodes():
    """Oracle: the definition written out by hand."""
    assert gpu_counts(low=8, high=1024, gpus_per_node=8) == [8, 16, 32, 64, 128, 256, 512, 1024]
    assert gpu_counts(low=3, high=10, gpus_per_node=8) == [4, 8]
    # 6-GPU nodes: 6, 12, 24, 48 are 1, 2, 4, 8 nodes; the powers of two 2..32 come too
    assert gpu_counts(low=2, high=48, gpus_per_node=6) == [2, 4, 6, 8, 12, 16, 24, 32, 48]
    with pytest.raises(InvalidInputError, match="LOW-HIGH"):
        gpu_counts(low=9, high=8, gpus_per_node=8)
    with pytest.raises(InvalidInputError, match="no power of two"):
        gpu_counts(low=9, high=15, gpus_per_node=8)


@pytest.mark.parametrize("text, tokens", [("1T", 1e12), ("300B", 3e11), ("2.5e12", 2.5e12), ("500m", 5e8),
                                          ("7", 7.0)])
def test_parse_tokens(text, tokens):
    assert parse_tokens(text) == tokens


@pytest.mark.parametrize("text", ["", "T", "1X", "-5B", "1e40", "nan"])
def test_parse_tokens_refuses(text):
    with pytest.raises(InvalidInputError, match="--tokens"):
        parse_tokens(text)


def test_sweep_best_plans_equal_per_count_searches(profile):
    """Oracle: ap.search at each GPU count with the same batch; the derived columns from their estimates."""
    cluster = ap.Cluster.preset("dgx-h100")
    result = ap.sweep(profile, cluster, gpus=(2, 16), global_batch_size=32, tokens=1e9, gpu_hour_price=2.0)
    assert [row.gpus for row in result.rows] == [2, 4, 8, 16]
    for row in result.rows:
        alone = ap.search(profile, cluster.with_gpus(row.gpus), global_batch_size=32, top_k=1)
        assert row.plan == alone.best
        assert row.estimate.step_time_s == alone.best_estimate.step_time_s
        tokens_per_s = 32 * 512 / alone.best_estimate.step_time_s
        assert row.tokens_per_s_per_gpu() == pytest.approx(tokens_per_s / row.gpus)
        assert row.gpu_hours(1e9) == pytest.approx(1e9 / tokens_per_s * row.gpus / 3600)
        assert result.cost(row) == pytest.approx(2.0 * row.gpu_hours(1e9))


def test_sweep_row_says_why_nothing_fits(profile):
    """A GPU count without a fitting plan is a row with the search's reason, not an error."""
    small = ap.Cluster.preset("dgx-h100").model_copy(update={"memory_bytes": 2**20, "memory_reserve_bytes": 0})
    result = ap.sweep(profile, small, gpus=[1, 2], global_batch_size=8)
    for row in result.rows:
        assert row.plan is None and row.estimate is None
        assert "no plan fits" in row.reason and row.time_to_train_s(1e12) is None
        with pytest.raises(ap.InfeasiblePlanError, match="no plan fits"):
            ap.search(profile, small.with_gpus(row.gpus), global_batch_size=8)


def test_cli_sweep_table_json_and_plot(run_cli, tmp_path):
    out, plot = tmp_path / "sweep.json", tmp_path / "sweep.png"
    code, stdout, err = run_cli(["search", "gpt-tiny", "--gpus", "1-4", "--global-batch", "8", "--tokens", "1B",
                                 "--gpu-hour-price", "3", "--out", str(out)])
    assert code == 0, err
    assert "best plan per GPU count" in stdout and "GPU-hours" in stdout and "cost" in stdout
    saved = json.loads(out.read_text())
    assert [row["gpus"] for row in saved["rows"]] == [1, 2, 4] and saved["tokens"] == 1e9
    assert plot.read_bytes()[:4] == b"\x89PNG"   # written beside --out
    for row in saved["rows"]:
        assert row["cost"] == pytest.approx(3 * row["gpu_hours"])
        assert row["time_to_train_s"] == pytest.approx(1e9 / row["estimate"]["tokens_per_s"])


@pytest.mark.parametrize("argv, message", [
    (["--gpus", "8-4"], "LOW must not exceed HIGH"),
    (["--gpus", "4-x"], "expected a number of GPUs or a range"),
    (["--gpus", "1-4", "--tokens", "lots"], "--tokens takes a number of tokens"),
    (["--gpus", "1-4", "--gpu-hour-price", "-1"], "--gpu-hour-price must be"),
    (["--gpus", "1-4", "--verify"], "--verify takes one GPU count"),
])
def test_cli_sweep_bad_input_is_one_line(run_cli, argv, message):
    code, stdout, err = run_cli(["search", "gpt-tiny", *argv])
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
