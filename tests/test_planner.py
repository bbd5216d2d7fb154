"""The planner reproduces the measured anchors and proposes the fastest configuration that fits a budget."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from flux2lora.cli import app
from flux2lora.planner import Plan, fastest_fitting, parse_size, predict

# ../shared/reference/anchors.md: H100, batch 1, 512 text tokens, rank 16 on the diffusers example's targets
ANCHORS = [("klein-4b", 1024, True, 9.3), ("klein-4b", 1024, False, 22.7), ("klein-4b", 512, True, 8.1),
           ("klein-9b", 1024, True, 19.9), ("dev", 1024, True, 66.2)]


@pytest.mark.parametrize("flavour,resolution,checkpointing,measured", ANCHORS)
def test_predicted_peaks_match_the_measured_anchors_within_5_percent(flavour, resolution, checkpointing, measured):
    predicted = predict(Plan(flavour, resolution, 1, gradient_checkpointing=checkpointing, lora_target="recipe"))
    assert abs(predicted.peak_gib - measured) / measured < 0.05


def test_int8_prediction_matches_its_anchor():
    predicted = predict(Plan("klein-4b", 1024, 1, base_model_precision="int8-quanto", lora_target="recipe"))
    assert abs(predicted.peak_gib - 5.7) / 5.7 < 0.05


def test_checkpointing_off_is_faster_and_larger():
    on, off = predict(Plan("klein-4b", 1024, 1)), predict(Plan("klein-4b", 1024, 1, gradient_checkpointing=False))
    assert off.relative_step_time < on.relative_step_time and off.peak_gib > on.peak_gib


def test_tread_lowers_time_and_activation_memory():
    plain = predict(Plan("klein-4b", 1024, 1))
    routed = predict(Plan("klein-4b", 1024, 1, tread_selection_ratio=0.5, tread_span_share=0.8))
    assert routed.relative_step_time < plain.relative_step_time
    assert routed.parts_gib["activations"] < plain.parts_gib["activations"]


def test_fastest_fitting_configuration_fits_the_budget_and_beats_slower_ones():
    best = fastest_fitting(Plan("klein-4b", 1024, 1), 32)
    assert best.required_gib <= 32 and not best.plan.gradient_checkpointing  # 32 GiB fits the no-recompute mode
    # 24 GiB: the no-recompute peak (~23 GiB) fits, but not with the headroom: some blocks are checkpointed
    at_24 = fastest_fitting(Plan("klein-4b", 1024, 1), 24)
    assert at_24.required_gib <= 24 and 0 < at_24.plan.checkpointed_share < 1
    tight = fastest_fitting(Plan("klein-9b", 1024, 1), 16)
    assert tight.required_gib <= 16 and tight.plan.base_model_precision != "bf16"
    assert fastest_fitting(Plan("dev", 1024, 4), 8) is None


def test_sizes_parse():
    assert parse_size("24GiB") == 24 and parse_size("80") == 80
    assert abs(parse_size("24GB") - 22.35) < 0.01
    with pytest.raises(ValueError, match="--vram"):
        parse_size("lots")


def test_plan_command_reads_params_and_proposes(tmp_path):
    from helpers import REPO

    result = CliRunner().invoke(app, ["plan", "--params", str(REPO / "params.yaml"), "--vram", "24GiB", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    train = out["stages"]["train"]
    assert train["configured"]["flavour"] == "klein-4b" and train["proposed"]["required_gib"] <= 24
    # the proposal as params.yaml keys, which the trainer accepts as they are
    from flux2lora.config import apply_overrides, parse_params, read_raw_params

    proposed = parse_params(apply_overrides(read_raw_params(REPO / "params.yaml"), out["proposed_params"]))
    assert proposed.train.base_model_precision in ("no_change", "fp8-torchao", "int8-quanto", "int4-quanto")


def test_compile_prediction_matches_its_anchor():
    """Regional compile without checkpointing: measured 0.169 s (recipe 0.372 s) and 19.6 GiB."""
    predicted = predict(Plan("klein-4b", 1024, 1, gradient_checkpointing=False, compile=True, lora_target="recipe"))
    assert abs(predicted.peak_gib - 19.6) / 19.6 < 0.05
    assert abs(predicted.relative_step_time - 0.169 / 0.372) < 0.02


def test_partial_checkpointing_lies_between_none_and_all_and_is_proposed_as_params():
    from flux2lora.planner import as_params

    full = predict(Plan("klein-4b", 1024, 1))
    none = predict(Plan("klein-4b", 1024, 1, gradient_checkpointing=False))
    half = predict(Plan("klein-4b", 1024, 1, checkpointed_share=0.48))  # 12 of 25 blocks
    assert full.peak_gib < half.peak_gib < none.peak_gib
    assert none.relative_step_time < half.relative_step_time < full.relative_step_time
    best = fastest_fitting(Plan("klein-4b", 1024, 1), 16)
    assert best.required_gib <= 16 and 0 < best.plan.checkpointed_share < 1  # fewer blocks than all fit 16 GiB
    proposed = as_params(best)
    assert proposed["train.gradient_checkpointing"] and 0 < proposed["train.gradient_checkpointing_blocks"] < 25


# ---- proposals that run: every flavour at the GPU sizes people have ------------------------------------------

BUDGETS_GIB = (8, 12, 16, 24, 32, 48, 80)
FLAVOURS = ("klein-4b", "klein-9b", "dev")


def real_run_raw(flavour: str) -> dict:
    """A valid params tree for a real run of `flavour` at 1024 px in bf16 (the shipped demo file, made real)."""
    from helpers import REPO

    from flux2lora.config import apply_overrides, read_raw_params

    return apply_overrides(read_raw_params(REPO / "params.yaml"), {
        "model.model_flavour": flavour, "model.pretrained_model_name_or_path": None,
        "model.base_model_default_dtype": "bf16", "prepare.resolution": 1024, "prepare.minimum_image_size": 256,
        "encode_text.cache_dtype": "bf16", "encode_latents.cache_dtype": "bf16", "train.train_batch_size": 1,
        "train.mixed_precision": "bf16", "train.gradient_checkpointing": True, "train.lora_rank": 16,
        "train.lora_alpha": 16})


@pytest.fixture(scope="module")
def reports():
    from flux2lora.config import parse_params
    from flux2lora.planner import plan_report

    return {(f, b): plan_report(parse_params(real_run_raw(f)), b) for f in FLAVOURS for b in BUDGETS_GIB}


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("budget", BUDGETS_GIB)
def test_every_proposal_passes_check_params_and_fits_budget_minus_headroom(reports, flavour, budget, tmp_path):
    import yaml

    from flux2lora.config import apply_overrides, parse_params
    from flux2lora.planner import headroom_gib

    report = reports[flavour, budget]
    for name, stage in report["stages"].items():
        if stage["proposed"] is not None:
            peak = stage["proposed"]["peak_gib"]
            assert peak <= budget - headroom_gib(peak) + 0.01, (name, stage["proposed"])  # 0.01: JSON rounding
    raw = apply_overrides(real_run_raw(flavour), report["proposed_params"])
    parse_params(raw)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    result = CliRunner().invoke(app, ["check-params", "--params", str(path)])
    assert result.exit_code == 0, result.output
    assert report["verdict"] and "\n" not in report["verdict"]


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("budget", BUDGETS_GIB)
def test_quantize_via_cpu_exactly_when_the_bf16_base_does_not_fit(reports, flavour, budget):
    from flux2lora.planner import _architecture, fits

    report = reports[flavour, budget]
    if report["stages"]["train"]["proposed"] is None:
        return
    bf16_base_gib = _architecture(flavour)["params"] * 2 / 2**30
    via_cpu = report["proposed_params"].get("train.quantize_via") == "cpu"
    assert via_cpu == (not fits(bf16_base_gib, budget))
    if bf16_base_gib > budget:
        assert via_cpu


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("budget", BUDGETS_GIB)
def test_no_offload_is_proposed_where_a_configuration_without_it_fits(reports, flavour, budget):
    from flux2lora.config import parse_params
    from flux2lora.planner import candidates, fits, plan_from_params

    report = reports[flavour, budget]
    base = plan_from_params(parse_params(real_run_raw(flavour)))
    plain_fits = any(fits(predict(c).peak_gib, budget) for c in candidates(base) if not c.group_offload)
    proposed = report["stages"]["train"]["proposed"]
    if plain_fits:
        assert proposed is not None and not proposed["group_offload"]
        assert not report["proposed_params"]["train.enable_group_offload"]
    recipe = predict(Plan(flavour, 1024, 1))  # the plain configuration: bf16, every block checkpointed
    if fits(recipe.peak_gib, budget):  # nothing that changes the model (quantization) or is slow (offload)
        assert proposed["base_model_precision"] == "bf16" and not proposed["group_offload"]
        assert "train.quantize_via" not in report["proposed_params"]


def test_what_fits_where(reports):
    """The proposals a user of each GPU size gets (printed), and the facts the issue named."""
    for (flavour, budget), report in sorted(reports.items()):
        train = report["stages"]["train"]["proposed"]
        text = report["stages"]["encode-text"]["proposed"]
        print(f"{flavour:9s} {budget:3d} GiB: train "
              + (f"{train['base_model_precision']:12s} ckpt {train['checkpointed_share']:.2f} "
                 f"offload {train['group_offload']!s:5s} needs {train['required_gib']:5.1f} "
                 f"~{train['step_s_h100']:.2f} s" if train else "none")
              + " | text " + (f"offload {text['group_offload']!s:5s} batch {text['batch']} "
                              f"needs {text['required_gib']:5.1f}" if text else "none")
              + f" | host {report['host_ram_gib']:.0f} GiB")
    dev80 = reports["dev", 80]
    assert dev80["stages"]["train"]["proposed"]["base_model_precision"] == "bf16"  # the anchor's 66 GiB run
    assert not dev80["proposed_params"]["train.enable_group_offload"]
    assert "train.quantize_via" not in dev80["proposed_params"]
    assert reports["klein-4b", 8]["stages"]["train"]["proposed"] is not None  # int8: 5.7 GiB measured
    # dev's 24B encoder cut at 30 layers is ~32 GiB of bf16 weights: offloaded below that, not above
    assert reports["dev", 24]["stages"]["encode-text"]["proposed"]["group_offload"]
    assert not reports["dev", 48]["stages"]["encode-text"]["proposed"]["group_offload"]
    assert reports["dev", 80]["host_ram_gib"] > 60  # the transformer is built in CPU memory before it moves


def test_offload_cost_comes_from_the_bytes_it_moves():
    """dev's 60 GiB of bf16 weights, twice per step at 25 GB/s, take longer than its whole measured step."""
    from flux2lora.planner import OFFLOAD_PASSES

    plain = predict(Plan("dev", 1024, 1))
    overlapped = predict(Plan("dev", 1024, 1, group_offload=True))
    serial = predict(Plan("dev", 1024, 1, group_offload=True, group_offload_use_stream=False))
    assert abs(overlapped.copy_s - OFFLOAD_PASSES * plain.parts_gib["weights"] * 2**30 / 25e9) < 1e-6
    assert overlapped.copy_s > 2.159 and overlapped.step_s == pytest.approx(max(plain.step_s, overlapped.copy_s))
    assert serial.step_s == pytest.approx(plain.step_s + serial.copy_s)
    faster_bus = predict(Plan("dev", 1024, 1, group_offload=True, host_bandwidth_gbps=50))
    assert faster_bus.copy_s == pytest.approx(overlapped.copy_s / 2)
    assert overlapped.peak_gib < plain.peak_gib - 50 and serial.peak_gib < overlapped.peak_gib


def test_encode_stages_match_their_anchors():
    """Qwen3-4B at 27 layers, batch 16: 8.2 GiB with all hidden states kept; ours keeps 3 (less). VAE 6.2 GiB."""
    from flux2lora.planner import LatentPlan, TextPlan, predict_latents, predict_text

    ours = predict_text(TextPlan("klein-4b", batch=16))
    assert 6.0 < ours.peak_gib < 8.2 + 0.45
    assert abs(predict_latents(LatentPlan(1024, batch=4)).peak_gib - 6.2) < 0.01
    dev = predict_text(TextPlan("dev", batch=8, layers=(10, 20, 30)))
    assert 32 < dev.parts_gib["weights"] < 33.2  # 17.34B text-only parameters at 30 layers
    assert predict_text(TextPlan("dev", batch=8, layers=(10, 20, 30), group_offload=True)).peak_gib < 6


def test_plan_command_prints_a_table_and_a_verdict(tmp_path):
    import yaml

    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(real_run_raw("dev")))
    result = CliRunner().invoke(app, ["plan", "--params", str(path), "--vram", "80GiB", "--ram", "32GiB"])
    assert result.exit_code == 0, result.output
    assert "encode-text" in result.output and "encode-latents" in result.output and "headroom" in result.output
    verdict = result.output.strip().splitlines()[-1]
    assert verdict.startswith("dev fits 80.0 GiB") and "host RAM" in verdict  # 32 GiB of RAM is too little
    bad = CliRunner().invoke(app, ["plan", "--params", str(path), "--ram", "lots"])
    assert bad.exit_code != 0 and "--ram" in bad.output
