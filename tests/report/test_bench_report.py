"""The benchmark report on synthetic results: metrics, a failed plan reported as such, plots written."""

import pytest

from autoplan.report.bench import accuracy, report_markdown, verdicts
from autoplan.report.plots import write_plots
from autoplan.schema import Cluster, Plan

import autoplan as ap


def _row(labels, plan, predicted_s, measured_s, status="ok", memory=(100 * 2**20, 90 * 2**20)):
    row = {"labels": labels, "plan": plan.model_dump(mode="json"), "status": status,
           "predicted_step_time_s": predicted_s, "predicted_tokens_per_s": 8 * 64 / predicted_s,
           "predicted_memory_bytes": memory[0], "memory_limit_bytes": 2**30,
           "predicted_time_breakdown": {"compute": predicted_s * 0.8, "dp_comm_exposed": predicted_s * 0.2},
           "predicted_memory_breakdown": {"params": memory[0]}}
    if status == "ok":
        row.update(measured_step_time_s=measured_s, measured_tokens_per_s=8 * 64 / measured_s,
                   measured_memory_bytes=memory[1])
    else:
        row.update(measured_step_time_s=None, measured_memory_bytes=None, error="out of memory on rank 1")
    return row


@pytest.fixture
def results():
    gbs = dict(global_batch_size=8, micro_batch_size=2)
    plans = [
        _row(["#1"], Plan(dp=2, **gbs), 0.010, 0.011),              # picked; measured second fastest
        _row(["#2", "ZeRO-3/FSDP"], Plan(dp=2, zero_stage=3, **gbs), 0.012, 0.010),
        _row(["pure DP"], Plan(pp=2, schedule="1f1b", **gbs), 0.020, 0.025),
        _row(["Megatron TP+PP"], Plan(tp=2, **gbs), 0.030, None, status="out of memory"),
    ]
    return {"model": "gpt-tiny", "gpus": 2, "cluster": "test", "command": "autoplan bench ...", "date": "2026-11-23",
            "global_batch_size": 8, "seq_len": 64, "steps": 6, "plans": plans, "accuracy": accuracy(plans)}


def test_accuracy_of_synthetic_results(results):
    """Oracle, by hand over the 3 plans that ran: step-time errors 1/11, 2/10, 5/25 -> MAPE 0.1636; memory
    10/90 each -> 0.1111; predicted order (10, 12, 20) against measured (11, 10, 25): ranks (1,2,3) vs
    (2,1,3), rho = 1 - 6*2/(3*8) = 0.5; regret: picked 1/11 of the best's 1/10 throughput -> 10/11."""
    acc = results["accuracy"]
    assert acc["plans"] == 4 and acc["measured"] == 3 and acc["failed"] == 1
    assert acc["step_time_mape"] == pytest.approx((1 / 11 + 2 / 10 + 5 / 25) / 3)
    assert acc["memory_mape"] == pytest.approx(1 / 9)
    assert acc["spearman"] == pytest.approx(0.5)
    assert acc["regret"] == pytest.approx(10 / 11)
    assert acc["best_measured"] == "#2, ZeRO-3/FSDP"
    v = verdicts(acc)
    assert v["step_time_mape"].startswith("missed by 0.01") and v["spearman"] == "missed by 0.400"
    assert v["regret"].startswith("missed by")


def test_report_completes_with_a_failed_plan_and_writes_plots(results, tmp_path):
    """Oracle: the report lists all 4 plans, the failed one with its status; the four plots exist as PNGs."""
    profile = ap.profile_model("gpt-tiny")
    cluster = Cluster.preset("dgx-h100", gpus=2)
    figures = write_plots(results, tmp_path, profile=profile, cluster=cluster)
    text = report_markdown(results, figures)
    assert "out of memory: out of memory on rank 1" in text
    assert text.count("| dp=") == 4
    assert set(figures.values()) == {"step_time.png", "time_breakdown.png", "memory.png", "pipeline.png"}
    for name in figures.values():
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_picked_plan_that_failed_counts_as_full_regret(results):
    """Oracle: if the search's pick cannot run, nothing of its promise was kept: regret 0."""
    plans = results["plans"]
    plans[0] = _row(["#1"], Plan(dp=2, global_batch_size=8, micro_batch_size=2), 0.010, None, status="error")
    assert accuracy(plans)["regret"] == 0.0


def test_a_sample_spreads_over_the_whole_ranking():
    """Oracle: definition of --sample: the top plans, then `sample` more taken evenly from the rest of the
    ranking, each plan once (the search is asked for all of its ranking, within its own bound)."""
    import autoplan as ap
    from autoplan.report.bench import candidates

    profile = ap.profile_model("gpt-tiny")
    cluster = ap.Cluster.preset("dgx-h100", gpus=2)
    chosen = candidates(profile, cluster, global_batch_size=8, top_k=2, sample=3)
    plans = [c.plan for c in chosen]
    assert len(plans) == len({p.model_dump_json() for p in plans})
    top = ap.search(profile, cluster, global_batch_size=8, top_k=2).ranked
    assert [p.model_dump() for p, _ in top][:2] == [p.model_dump() for p in plans[:2]]
    assert len(plans) >= 2 + 3
