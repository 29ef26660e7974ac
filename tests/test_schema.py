"""The nouns: Plan validation, check_plan against a model and a cluster, parse_plan, and the cluster presets."""

import json

import pytest
import torch
from pydantic import ValidationError

import autoplan as ap
from autoplan.errors import InvalidInputError, InvalidPlanError
from autoplan.schema import Cluster, Link, ModelProfile, Plan, check_plan, one_line, parse_plan

PRESETS = ["dgx-a100-40gb", "dgx-a100-80gb", "dgx-h100", "dgx-h200", "h100-96gb-500w"]


def plan_error(**kwargs) -> str:
    with pytest.raises(ValidationError) as err:
        Plan(**kwargs)
    return one_line(err.value)


def make_profile(**overrides) -> ModelProfile:
    """A Llama-3-8B-shaped profile with no layers: check_plan reads only the model-level facts."""
    fields = dict(name="test", seq_len=4096, hidden=4096, num_blocks=32, num_heads=32, num_kv_heads=8, layers=[])
    return ModelProfile(**(fields | overrides))


@pytest.fixture(scope="module")
def gpt_profile() -> ModelProfile:
    """A traced 2-block GPT with 32 heads (cheap on meta)."""
    with torch.device("meta"):
        model = ap.models.gpt(layers=2, hidden=256, heads=32, vocab=100, seq_len=64)
    return ap.profile_model(model)


@pytest.fixture(scope="module")
def moe_profile() -> ModelProfile:
    """moe-tiny traced on meta: 4 blocks, 4 heads, 2 kv heads, 4 experts."""
    return ap.profile_model("moe-tiny")


# ----------------------------------------------------------------------------------------- Plan
def test_plan_worked_example():
    """Oracle: arithmetic. dp=4 tp=8 pp=2: 4·8·2·1 = 64 GPUs; gbs 512 / (dp 4 · mbs 2) = 64 micro-batches."""
    plan = Plan(dp=4, tp=8, pp=2, global_batch_size=512, micro_batch_size=2)
    assert plan.gpus == 64 and plan.num_micro_batches == 64
    assert plan.describe() == ("dp=4 tp=8 pp=2 cp=1 ep=1 zero=0 recompute=none sp=off mbs=2 gbs=512 "
                               "schedule=1f1b")
    # sequence parallelism is reported off when tp=1, where it has no effect
    assert "sp=off" in Plan(global_batch_size=1, sequence_parallel=True).describe()
    assert "sp=on" in Plan(tp=2, global_batch_size=1, sequence_parallel=True).describe()


def test_plan_limit_case_one_gpu():
    """Limit case: the defaults are the single-GPU plan, one micro-batch per sequence."""
    plan = Plan(global_batch_size=8)
    assert (plan.gpus, plan.num_micro_batches, plan.stage_recompute(0)) == (1, 8, "none")


def test_plan_global_batch_not_divisible_by_dp():
    """Oracle: 8 sequences cannot be split evenly over dp=3 replicas."""
    assert plan_error(dp=3, global_batch_size=8) == "global_batch_size=8 is not divisible by dp=3"


def test_plan_micro_batch_not_dividing_replica_batch():
    """Oracle: gbs 8 / dp 2 = 4 sequences per replica, which micro-batches of 3 do not divide."""
    message = plan_error(dp=2, global_batch_size=8, micro_batch_size=3)
    assert message == "micro_batch_size=3 does not divide the 4 sequences per data-parallel replica"


def test_plan_virtual_stages_need_an_interleaved_schedule():
    """Oracle: virtual stages exist only in interleaved schedules (Narayanan et al. 2021 Sec. 2.2.2)."""
    assert plan_error(pp=2, virtual_stages=2, global_batch_size=8) == \
        "virtual_stages=2 needs schedule interleaved-1f1b or zero-bubble, not 1f1b"
    assert plan_error(pp=1, virtual_stages=2, schedule="interleaved-1f1b", global_batch_size=8) == \
        "virtual_stages=2 needs pp > 1"
    assert Plan(pp=2, virtual_stages=2, schedule="interleaved-1f1b", global_batch_size=8).virtual_stages == 2


def test_plan_per_stage_lists_must_match_stage_count():
    """Oracle: layers_per_stage has pp·v entries, recompute_per_stage has pp entries."""
    assert "layers_per_stage has 3 entries but pp*virtual_stages = 4" in plan_error(
        pp=2, virtual_stages=2, schedule="interleaved-1f1b", global_batch_size=8, layers_per_stage=[1, 1, 1])
    assert "recompute_per_stage has 1 entries but pp = 2" in plan_error(
        pp=2, global_batch_size=8, recompute_per_stage=["full"])
    plan = Plan(pp=2, global_batch_size=8, recompute_per_stage=["full", "none"])
    assert (plan.stage_recompute(0), plan.stage_recompute(1)) == ("full", "none")


def test_plan_rejects_extra_fields_and_bad_values():
    """Oracle: extra="forbid" (house style) and the field bounds (degrees >= 1, ZeRO stage 0..3)."""
    assert plan_error(global_batch_size=8, bogus=1) == "bogus: Extra inputs are not permitted"
    assert plan_error(global_batch_size=8, tp=0).startswith("tp: Input should be greater than or equal to 1")
    assert plan_error(global_batch_size=8, zero_stage=4).startswith("zero_stage:")
    assert plan_error(global_batch_size=8, schedule="pipedream").startswith("schedule:")


def test_one_line_counts_further_errors():
    """Oracle: pydantic's error list: the first one, and how many more."""
    assert plan_error(global_batch_size=8, tp=0, pp=0) == \
        "tp: Input should be greater than or equal to 1 (and 1 more)"


def test_plans_are_values():
    """Oracle: frozen=True: a plan cannot be changed in place; a changed copy is validated again."""
    plan = Plan(dp=2, global_batch_size=8)
    with pytest.raises(ValidationError, match="frozen"):
        plan.dp = 4
    with pytest.raises(ValidationError, match="not divisible by dp=3"):
        Plan.model_validate({**plan.model_dump(), "dp": 3})


def test_rejected_assignment_leaves_plan_unchanged():
    """Oracle: the plan before the rejected assignment (a planner that catches the error keeps a valid plan)."""
    plan = Plan(dp=2, global_batch_size=8)
    with pytest.raises(ValidationError):
        plan.dp = 3
    assert plan.dp == 2


# ----------------------------------------------------------------------------------------- check_plan
def test_check_plan_accepts_a_consistent_plan(gpt_profile, moe_profile):
    """Oracle: a plan that respects every rule passes silently (returns None)."""
    cluster = Cluster.preset("dgx-h100", gpus=64)
    assert check_plan(gpt_profile, cluster, Plan(dp=4, tp=8, pp=2, global_batch_size=64)) is None
    assert check_plan(moe_profile, cluster.with_gpus(8), Plan(dp=4, tp=2, ep=4, global_batch_size=8)) is None


def test_check_plan_gpu_count(gpt_profile):
    """Oracle: dp·tp·pp·cp = 2·8·3·1 = 48 GPUs against a 64-GPU cluster."""
    with pytest.raises(InvalidPlanError) as err:
        check_plan(gpt_profile, Cluster.preset("dgx-h100", gpus=64), Plan(dp=2, tp=8, pp=3, global_batch_size=16))
    message = str(err.value)
    assert "dp*tp*pp*cp = 2*8*3*1 = 48" in message and "64 GPUs" in message


def test_check_plan_tp_must_divide_heads(gpt_profile):
    """Oracle: Megatron splits attention by heads, so tp | heads (Shoeybi et al. 2019 Sec. 3): 32 % 3 = 2."""
    with pytest.raises(InvalidPlanError, match="tp=3 does not divide 32 heads"):
        check_plan(gpt_profile, Cluster.preset("dgx-h100", gpus=3), Plan(tp=3, global_batch_size=8))


def test_check_plan_tp_must_divide_kv_heads():
    """Oracle: grouped-query K/V heads are split too: tp=16 divides 32 query heads but not 8 kv heads."""
    with pytest.raises(InvalidPlanError, match="tp=16 does not divide 8 key/value heads"):
        check_plan(make_profile(), Cluster.preset("dgx-h100", gpus=16), Plan(tp=16, global_batch_size=8))


def test_check_plan_pp_greater_than_layers(gpt_profile):
    """Oracle: a pipeline stage needs at least one block: pp=4 > 2 blocks; pp·v = 2·2 = 4 > 2 as well;
    limit case pp = blocks passes."""
    cluster = Cluster.preset("dgx-h100", gpus=4)
    with pytest.raises(InvalidPlanError, match="pp\\*virtual_stages = 4 exceeds the model's 2 layers"):
        check_plan(gpt_profile, cluster, Plan(pp=4, global_batch_size=8))
    with pytest.raises(InvalidPlanError, match="= 4 exceeds the model's 2 layers"):
        check_plan(gpt_profile, cluster, Plan(dp=2, pp=2, virtual_stages=2, schedule="interleaved-1f1b",
                                              global_batch_size=8))
    check_plan(gpt_profile, cluster, Plan(dp=2, pp=2, global_batch_size=8))


def test_check_plan_layers_per_stage_must_sum_to_blocks():
    """Oracle: 32 blocks split as 10 + 10 = 20 leaves 12 unplaced."""
    with pytest.raises(InvalidPlanError, match="layers_per_stage sums to 20 but the model has 32 layers"):
        check_plan(make_profile(), Cluster.preset("dgx-h100", gpus=2),
                   Plan(pp=2, global_batch_size=8, layers_per_stage=[10, 10]))


def test_check_plan_context_parallel_needs_2cp_dividing_seq_len():
    """Oracle: load-balanced ring attention cuts the sequence in 2·cp chunks: 4096 % (2·3) = 4."""
    with pytest.raises(InvalidPlanError, match="cp=3 needs seq_len divisible by 2\\*cp = 6, got 4096"):
        check_plan(make_profile(), Cluster.preset("dgx-h100", gpus=3), Plan(cp=3, global_batch_size=8))


def test_check_plan_ep_must_divide_experts(moe_profile):
    """Oracle: experts are dealt out evenly: ep=3 does not divide moe-tiny's 4 experts (8 % 3 for a Mixtral)."""
    with pytest.raises(InvalidPlanError, match="ep=3 does not divide 4 experts"):
        check_plan(moe_profile, Cluster.preset("dgx-h100", gpus=3), Plan(dp=3, ep=3, global_batch_size=9))
    with pytest.raises(InvalidPlanError, match="ep=3 does not divide 8 experts"):
        check_plan(make_profile(num_experts=8, top_k=2), Cluster.preset("dgx-h100", gpus=3),
                   Plan(dp=3, ep=3, global_batch_size=9))


def test_check_plan_ep_on_a_dense_model(gpt_profile):
    """Limit case: expert parallelism with no experts."""
    with pytest.raises(InvalidPlanError, match="ep=2 but the model has no experts"):
        check_plan(gpt_profile, Cluster.preset("dgx-h100", gpus=2), Plan(dp=2, ep=2, global_batch_size=8))


def test_check_plan_ep_must_divide_dp_cp_tp(moe_profile):
    """Oracle: ep folds over the dp·cp·tp ranks: ep=4 with dp=2 (pp=2 does not count) cannot."""
    with pytest.raises(InvalidPlanError, match="ep=4 does not divide dp\\*cp\\*tp = 2"):
        check_plan(moe_profile, Cluster.preset("dgx-h100", gpus=4), Plan(dp=2, pp=2, ep=4, global_batch_size=8))


# ----------------------------------------------------------------------------------------- parse_plan
def test_expert_tensor_parallel_field(moe_profile):
    """Oracle: Megatron-Core's folding (etp x ep x edp over the dp*cp*tp ranks) and the model's shape:
    etp defaults to 1 and is shown only above 1; ep*etp must divide dp*cp*tp (one line); etp must divide the
    experts' width (moe-tiny: 128) and needs experts; edp = dp*cp*tp / (ep*etp)."""
    assert Plan(global_batch_size=8).etp == 1
    plan = Plan(dp=4, tp=2, ep=2, etp=2, global_batch_size=8)
    assert plan.expert_data_parallel == 2 and plan.expert_sharded
    assert "ep=2 etp=2 zero=0" in plan.describe()
    assert "etp" not in Plan(dp=4, ep=2, global_batch_size=8).describe()
    assert plan_error(dp=2, ep=2, etp=2, global_batch_size=8) == "ep*etp = 2*2 does not divide dp*cp*tp = 2"
    assert moe_profile.expert_ffn_hidden == 128
    cluster = Cluster.preset("dgx-h100", gpus=8)
    assert check_plan(moe_profile, cluster, plan) is None
    with pytest.raises(InvalidPlanError, match="etp=3 does not divide the experts' width 128"):
        check_plan(moe_profile, cluster.with_gpus(3), Plan(dp=3, etp=3, global_batch_size=9))


def test_plan_files_without_etp_load_as_etp_1(tmp_path):
    """Oracle: backward compatibility: a plan file written before the etp field (no "etp" key) loads with etp=1,
    and a plan with etp round-trips."""
    old = Plan(dp=4, ep=2, global_batch_size=8).model_dump()
    del old["etp"]
    path = tmp_path / "old.json"
    path.write_text(json.dumps(old))
    assert Plan.load(path).etp == 1
    plan = Plan(dp=4, ep=2, etp=2, global_batch_size=8)
    assert parse_plan(plan.model_dump_json()) == plan


def test_parse_plan_malformed_json_is_one_line():
    """Limit case: malformed JSON -> InvalidInputError naming the source, line and column, on one line."""
    with pytest.raises(InvalidInputError) as err:
        parse_plan('{"dp": 2,\n  "tp": }', source="plan.json")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("plan.json is not valid JSON") and "line 2 column" in message


def test_parse_plan_invalid_plan_is_one_line():
    """Oracle: the Plan validator's own message, prefixed by the source."""
    with pytest.raises(InvalidInputError) as err:
        parse_plan('{"dp": 3, "global_batch_size": 8}', source="p.json")
    assert str(err.value) == "p.json: global_batch_size=8 is not divisible by dp=3"
    with pytest.raises(InvalidInputError, match="plan: bogus: Extra inputs are not permitted"):
        parse_plan('{"global_batch_size": 8, "bogus": true}')


def test_parse_plan_accepts_a_wrapped_plan_file(tmp_path):
    """Oracle: the plan itself: {"plan": {...}} with an origin and estimate beside it gives the same Plan."""
    plan = Plan(dp=2, tp=4, pp=2, global_batch_size=64, micro_batch_size=2, recompute="selective")
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"plan": plan.model_dump(), "estimate": {"step_time_s": 1.0}, "model": "llama3-8b"}))
    assert parse_plan(path.read_text(), source=str(path)) == plan
    assert parse_plan(plan.model_dump_json()) == plan


def test_plan_save_load_round_trip(tmp_path):
    """Oracle: equality after save and load."""
    plan = Plan(dp=2, pp=2, global_batch_size=8, schedule="zero-bubble", layers_per_stage=[3, 5])
    plan.save(tmp_path / "plan.json")
    assert Plan.load(tmp_path / "plan.json") == plan


# ----------------------------------------------------------------------------------------- Cluster
def numeric_fields() -> set[str]:
    """Every number a Cluster carries, named as the preset files' `sources` keys name them."""
    names = set()
    for name, info in Cluster.model_fields.items():
        if name == "schema_version":
            continue
        if info.annotation in (int, float):
            names.add(name)
        elif info.annotation in (Link, Link | None):
            names |= {f"{name}.{sub}" for sub in Link.model_fields}
        elif name == "gemm_efficiency":
            names.add(name)
    return names


def test_numeric_fields_are_the_expected_set():
    """Oracle: the Cluster noun's fields as listed in schema/cluster.py (guards numeric_fields() itself)."""
    assert numeric_fields() == {
        "num_gpus", "gpus_per_node", "peak_flops_per_s", "memory_bytes", "memory_bandwidth_bytes_per_s",
        "memory_reserve_bytes", "intra_node.bandwidth_bytes_per_s", "intra_node.latency_s",
        "inter_node.bandwidth_bytes_per_s", "inter_node.latency_s", "gemm_efficiency", "attention_efficiency",
        "memory_bound_efficiency", "layer_overhead_fwd_s", "layer_overhead_bwd_s", "sustained_clock_fraction",
        "overlap_slowdown", "fp8_gemm_speedup", "host_memory_bytes", "host_memory_reserve_bytes",
        "host_memory_bandwidth_bytes_per_s", "host_link.bandwidth_bytes_per_s", "host_link.latency_s",
        "cpu_optimizer_efficiency"}


@pytest.mark.parametrize("name", PRESETS)
def test_preset_has_a_source_for_every_number(name):
    """Oracle: house style (every number carries its source): `sources` covers every numeric field; every key
    names a real field (a '.method' suffix explains how a number was derived)."""
    cluster = Cluster.preset(name)
    assert cluster.name == name and cluster.schema_version == ap.SCHEMA_VERSION
    missing = numeric_fields() - set(cluster.sources)
    assert not missing, f"{name}: no source for {sorted(missing)}"
    for key, text in cluster.sources.items():
        field, _, sub = key.partition(".")
        assert field in Cluster.model_fields, key
        assert sub in ("", "method") or sub in Link.model_fields, key
        assert len(text) > 20, key


@pytest.mark.parametrize("name, peak_flops_per_s, marketed_gb, bandwidth_bytes_per_s", [
    ("dgx-a100-80gb", 312e12, 80, 2.039e12),   # A100 SXM4 80GB datasheet: 312 TFLOPS dense BF16, 2,039 GB/s
    ("dgx-h100", 989e12, 80, 3.35e12),         # H100 SXM5 datasheet: 1,979 TFLOPS with sparsity / 2, 3.35 TB/s
    ("dgx-h200", 989e12, 141, 4.8e12),         # H200 SXM datasheet: same compute as H100, 141 GB at 4.8 TB/s
])
def test_preset_numbers_match_datasheets(name, peak_flops_per_s, marketed_gb, bandwidth_bytes_per_s):
    """Oracle: NVIDIA datasheets (peak dense BF16, memory, HBM bandwidth), within 1%; memory as torch reports it
    lies between 0.95x the marketed GB and 1.07x (marketed GB are 10^9 B, HBM stacks are GiB)."""
    cluster = Cluster.preset(name)
    assert cluster.peak_flops_per_s == pytest.approx(peak_flops_per_s, rel=0.01)
    assert cluster.memory_bandwidth_bytes_per_s == pytest.approx(bandwidth_bytes_per_s, rel=0.01)
    assert 0.95 * marketed_gb * 1e9 <= cluster.memory_bytes <= 1.075 * marketed_gb * 1e9
    assert 0 < cluster.memory_reserve_bytes < 0.1 * cluster.memory_bytes
    assert cluster.inter_node.bandwidth_bytes_per_s < cluster.intra_node.bandwidth_bytes_per_s
    points = cluster.gemm_efficiency
    assert [p.flops for p in points] == sorted(p.flops for p in points)
    assert [p.efficiency for p in points] == sorted(p.efficiency for p in points)  # bigger GEMMs run closer to peak
    assert (cluster.num_gpus, cluster.gpus_per_node, cluster.num_nodes) == (8, 8, 1)


def test_unknown_preset_names_the_presets():
    """Limit case: a typo -> InvalidInputError listing every preset."""
    assert Cluster.presets() == PRESETS
    with pytest.raises(InvalidInputError) as err:
        Cluster.preset("dgx-b200")
    assert "'dgx-b200'" in str(err.value) and all(name in str(err.value) for name in PRESETS)


def test_with_gpus():
    """Oracle: ceil(gpus / 8) nodes; the preset itself is not changed; limit case gpus=0 refused."""
    base = Cluster.preset("dgx-h100")
    assert base.with_gpus(64).num_nodes == 8
    assert base.with_gpus(9).num_nodes == 2    # ceil(9/8)
    assert base.with_gpus(1).num_nodes == 1
    assert base.num_gpus == 8
    assert Cluster.preset("dgx-h100", gpus=16).num_gpus == 16
    with pytest.raises(InvalidInputError, match="between 1 and"):
        base.with_gpus(0)


def test_cluster_save_load_round_trip_and_resolve(tmp_path):
    """Oracle: equality after save and load; resolve takes a file path like a preset name."""
    cluster = Cluster.preset("dgx-a100-80gb", gpus=32)
    path = tmp_path / "measured.json"
    cluster.save(path)
    assert Cluster.load(path) == cluster
    assert Cluster.resolve(str(path)) == cluster
    assert Cluster.resolve(str(path), gpus=16) == cluster.with_gpus(16)
    assert Cluster.resolve("dgx-h200", gpus=16) == Cluster.preset("dgx-h200").with_gpus(16)


def test_cluster_load_errors(tmp_path):
    """Limit cases: a missing file, malformed JSON, a field out of range -> one-line InvalidInputError."""
    with pytest.raises(InvalidInputError, match="Cluster file not found"):
        Cluster.resolve(str(tmp_path / "none.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(InvalidInputError) as err:
        Cluster.load(bad)
    assert "\n" not in str(err.value)
    data = Cluster.preset("dgx-h100").model_dump()
    data["attention_efficiency"] = 1.5
    bad.write_text(json.dumps(data))
    with pytest.raises(InvalidInputError, match="attention_efficiency: Input should be less than or equal to 1"):
        Cluster.load(bad)
