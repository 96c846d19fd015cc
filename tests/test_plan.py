"""d2g plan: predicted peak memory against measured CPU peaks of real runs, the fits /
largest-batch logic, FSDP's sharding rules and the refused flags.

The measured-vs-predicted checks use shapes and batch sizes the activation factor was NOT
fitted on (d2g_fast.plan.calibrate.VALIDATION_CASES): SD-shaped UNets, the SD3/FLUX transformer
families and LoRA students. Three run in CI (a UNet, a FLUX transformer, a LoRA student); all of
them with D2G_TEST_PLAN_SLOW=1.
"""
import os

import numpy as np
import pytest

from d2g_fast.plan import calibrate
from d2g_fast.plan.planner import GIB, PlanRequest, State, plan
from d2g_fast.plan.simulate import LABELS, StepTimeline
from d2g_fast.train import TrainConfig

SLOW = os.environ.get("D2G_TEST_PLAN_SLOW") == "1"


def _check(case):
    result = calibrate.compare(case)
    m, p = result["measured"], result["predicted"]
    # The persistent state is counted, not modelled: it must agree to the byte but for the
    # AdamW step counters (scalars).
    assert abs(p["persistent"] - m["persistent"]) <= 4096 * 16, result
    assert abs(result["error"]) < 0.15, calibrate.table([result])
    assert abs(result["step_error"]) < 0.15, calibrate.table([result])


def _key(c):
    return (c.family, c.width, c.latent, c.batch, c.lora_rank, c.light_d)


def test_calibration_and_validation_cases_differ():
    fitted = {_key(c) for c in calibrate.CALIBRATION_CASES}
    assert not fitted & {_key(c) for c in calibrate.VALIDATION_CASES}
    assert {c.family for c in calibrate.VALIDATION_CASES} == {"sd", "sd3", "flux"}
    assert any(c.lora_rank for c in calibrate.VALIDATION_CASES)
    assert any(c.light_d for c in calibrate.VALIDATION_CASES)


CI_CASES = (calibrate.Case(48, 24, 3), calibrate.Case(2, 8, 2, family="flux"),
            calibrate.Case(32, 16, 3, lora_rank=4))


@pytest.mark.parametrize("case", CI_CASES, ids=str)
def test_prediction_matches_measured_cpu_peak(case):
    assert case in calibrate.VALIDATION_CASES
    _check(case)


@pytest.mark.skipif(not SLOW, reason="every validation case: D2G_TEST_PLAN_SLOW=1")
@pytest.mark.parametrize("case", [c for c in calibrate.VALIDATION_CASES if c not in CI_CASES],
                         ids=str)
def test_prediction_matches_measured_cpu_peak_all(case):
    _check(case)


def test_lora_student_changes_the_state_rows_by_itself():
    """The plan builds the LoRA run: only the adapters train, so AdamW's states and the
    gradients shrink to the adapters' while G's frozen base is still held."""
    full = calibrate.predict(calibrate.Case(32, 16, 2))
    lora = calibrate.predict(calibrate.Case(32, 16, 2, lora_rank=4))
    f, r = dict(full.rows), dict(lora.rows)
    assert r["AdamW states (G, D)"] < f["AdamW states (G, D)"]
    assert lora.params["g_trainable"] < full.params["g"] // 10
    assert r["weights: G"] >= f["weights: G"]  # the base plus the adapters


# ------------------------------------------------------------------------------ the logic
@pytest.fixture(autouse=True)
def _unit_factor(request, monkeypatch):
    """The synthetic plans below are worked out with an activation factor of 1."""
    from d2g_fast.plan import planner

    if "synthetic" in request.node.name or request.node.name.startswith(
            ("test_peak", "test_fits", "test_fsdp")):
        monkeypatch.setattr(planner, "ACTIVATION_FIT", {False: 1.0, True: 1.0})


def _synthetic(per_sample=GIB, fixed=GIB, grads=2 * GIB):
    """A step whose peak is fixed + grads + per_sample * batch (labels: G and gradients)."""
    def line(b):
        rows = np.zeros((3, len(LABELS)), dtype=np.int64)
        rows[1, LABELS.index("G")] = per_sample * b + fixed
        rows[1, LABELS.index("gradients")] = grads
        rows[2, LABELS.index("gradients")] = grads
        return rows
    timeline = StepTimeline(LABELS, (2, 3), (line(2), line(3)), 0)
    state = State(g_weights=4 * GIB, g_trainable=GIB, ema=4 * GIB, d_weights=4 * GIB,
                  d_trainable=GIB, frozen=3 * GIB, largest_unit=GIB // 4)
    return timeline, state


def _plan(batch, gpus=1, memory=80, fsdp=False, device="cuda"):
    timeline, state = _synthetic()
    req = PlanRequest("synthetic", batch_size=batch, gpus=gpus, gpu_memory_gb=memory,
                      fsdp=fsdp, device=device)
    return plan(req, timeline=timeline, state=state, counts={})


def test_peak_is_the_sum_of_its_rows_and_grows_with_the_batch():
    p = _plan(4, device="cpu")
    rows = dict(p.rows)
    # persistent: G 4 + EMA 4 + D 4 + AdamW 2*(1+1) + frozen 3 = 19 GiB; step: 2 + 4 + 1
    assert rows["AdamW states (G, D)"] == 4 * GIB
    assert p.peak == 19 * GIB + 2 * GIB + 5 * GIB
    assert _plan(5, device="cpu").peak - p.peak == GIB


def test_fits_and_largest_batch():
    # cpu: no reserve; 80e9 B = 74.5 GiB -> 19 + 2 + 1 + b <= 74.5 -> b = 52
    p = _plan(8, device="cpu")
    assert p.fits and p.largest_batch == 52
    assert _plan(52, device="cpu").fits and not _plan(53, device="cpu").fits
    tight = _plan(8, memory=20, device="cpu")
    assert not tight.fits and tight.largest_batch == 0
    assert "does NOT fit" in tight.summary_line()
    # the GPU reserve (1 GiB + 5 %) lowers the largest batch
    assert _plan(8).largest_batch < 52


def test_fsdp_shards_the_training_state():
    one = dict(_plan(4, gpus=8, device="cpu").rows)        # replicated on 8
    sharded = dict(_plan(4, gpus=8, fsdp=True, device="cpu").rows)
    assert sharded["weights: G"] == one["weights: G"] // 8
    assert sharded["AdamW states (G, D)"] == one["AdamW states (G, D)"] // 8
    assert sharded["frozen: text encoders, E-LatentLPIPS"] == 3 * GIB
    assert sharded["FSDP: D gathered for the step"] == 4 * GIB - 4 * GIB // 8
    assert _plan(4, gpus=8, fsdp=True).largest_batch > _plan(4, gpus=8).largest_batch


# ------------------------------------------------------------------------------ the command
def _d2g(capsys, *args):
    from d2g_fast.cli import main

    code = main(["plan", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("args, flag", [
    (["--arch", "tiny", "--batch-size", "0"], "--batch-size"),
    (["--arch", "tiny", "--gpus", "0"], "--gpus"),
    (["--arch", "tiny", "--gpus", "two"], "--gpus"),
    (["--arch", "tiny", "--gpu-memory", "-1"], "--gpu-memory"),
] + [(["--arch", "tiny", flag], flag) for field, flag in
     (("lora_rank", "--lora-rank=8"), ("light_d", "--light-d"))
     # refused only while the trainer lacks the setting (then the plan builds it)
     if field not in TrainConfig.__dataclass_fields__] + [
    (["--teacher", "/nonexistent/teacher"], "--teacher"),
    ([], "--teacher DIR or --arch NAME"),
])
def test_bad_flags_are_named(capsys, args, flag):
    code, _, err = _d2g(capsys, *args)
    assert code == 2, err
    assert flag.split("=")[0] in err


def test_plan_command_on_the_tiny_architecture(capsys):
    code, out, err = _d2g(capsys, "--arch", "tiny", "--batch-size", "4", "--gpus", "1,2",
                          "--fsdp", "--gpu-memory", "80")
    assert code == 0, err
    assert out.count("\nplan: ") == 2
    for row in ("weights: G", "AdamW states (G, D)", "activations: G",
                "activations: loss (E-LatentLPIPS)", "activations: D", "R1 (double backward",
                "FSDP: D gathered for the step"):
        assert row in out
    # 1 GB cannot hold the CUDA reserve alone: refused with exit status 1
    code, out, _ = _d2g(capsys, "--arch", "tiny", "--batch-size", "4", "--gpu-memory", "1")
    assert code == 1 and "does NOT fit" in out


def test_plan_of_a_flux_folder(tmp_path, capsys):
    """A FLUX folder (any family): networks built from its configs on the meta device; the
    teacher's own transformer is counted as the trainer holds it (an fp32 copy, G's size)."""
    from d2g_fast.plan.planner import simulate
    from d2g_fast.testing.tiny import save_tiny_flux_pipeline

    path = save_tiny_flux_pipeline(str(tmp_path / "flux"))
    req = PlanRequest(path, batch_size=2, device="cpu", resolution=32)
    timeline, state, counts = simulate(req)
    assert state.teacher_net > 0 and abs(state.teacher_net - state.g_weights) <= 64  # G: + a scalar
    assert counts["g"] == counts["g_trainable"] > 0
    text = plan(req, timeline=timeline, state=state, counts=counts).format()
    assert "frozen: the teacher's network (held, not called)" in text
    code, _, err = _d2g(capsys, "--teacher", path, "--resolution", "33")
    assert code == 2 and "--resolution" in err
    code, _, err = _d2g(capsys, "--arch", "tiny", "--resolution", "32")
    assert code == 2 and "--resolution" in err


def test_distill_announces_only_where_asked(monkeypatch):
    from d2g_fast.plan.planner import announce

    lines = []
    monkeypatch.delenv("D2G_PLAN", raising=False)
    assert announce(TrainConfig(teacher="/nonexistent", device="cpu"), log=lines.append) is None
    assert lines == []  # CPU: no plan unless D2G_PLAN=1
    monkeypatch.setenv("D2G_PLAN", "1")
    assert announce(TrainConfig(teacher="/nonexistent", device="cpu"), log=lines.append) is None
    assert len(lines) == 1 and "plan unavailable" in lines[0] and "--teacher" in lines[0]


# ------------------------------------------------------------------------------ d2g bench
def test_gpu_days_lever_rows_come_from_the_plan():
    """d2g bench gpu-days' per-lever rows: each lever's predicted peak per GPU (the plan of
    the lever's run), and what it saves against full training."""
    from d2g_fast.bench import gpu_days

    s = gpu_days.Settings(arch="tiny", out="unused", device="cpu")
    rows = {r.name: r for r in gpu_days.measure_levers(s, gpu_days.Progress(1))}
    assert set(rows) == {f"memory.plan.{n}" for n in
                         ("full", "lora", "light-d", "lora+light-d", "checkpointing", "fsdp8")}
    value = {n.rsplit(".", 1)[1]: r.value for n, r in rows.items()}
    assert value["lora"] < value["full"] and value["light-d"] < value["full"]
    assert value["lora+light-d"] < min(value["lora"], value["light-d"])
    assert value["fsdp8"] < value["full"]
    for r in rows.values():
        assert r.source == "derived" and "memory.params.generator" in r.detail
        assert r.detail.startswith("d2g plan --arch tiny --batch-size 4")
