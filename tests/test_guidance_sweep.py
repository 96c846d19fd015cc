"""`d2g demo --guidance-sweep` (issue 21, item 4): a quick sweep end to end on the shipped toy
world, through the d2g command, and its refusal of bad input."""
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("diffusers")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCALES = ("2", "4", "8")
SAMPLERS = ("teacher_multistep", "teacher_1step", "teacher_2step", "teacher_4step",
            "conditioned_student_1step", "fixed_student_1step")


def _d2g(*argv, timeout=1500):
    """The d2g command in a fresh process (as a user runs it)."""
    return subprocess.run([sys.executable, "-c", "import sys; from d2g_fast.cli import main; "
                           "sys.exit(main(sys.argv[1:]))", "demo", *argv],
                          capture_output=True, text=True, cwd=REPO, timeout=timeout,
                          env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"))


def test_quick_guidance_sweep(tmp_path):
    out = tmp_path / "sweep"
    proc = _d2g("--guidance-sweep", ",".join(SCALES), "--quick",
                "--no-progress", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "guidance sweep finished" in proc.stdout
    for name in ("report.md", "metrics.json", "guidance_chart.png", "grid_guidance.png",
                 *(f"eval_g{g}/metrics.json" for g in SCALES)):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["settings"]["collection_scales"] == [2.0, 4.0, 8.0]
    assert metrics["settings"]["fixed_guidance"] == 4.0
    assert sorted(metrics["per_scale"], key=float) == list(SCALES)
    for g in SCALES:
        assert set(metrics["per_scale"][g]) == set(SAMPLERS), metrics["per_scale"][g].keys()
        for m in metrics["per_scale"][g].values():
            assert 0 <= m["accuracy"] <= 1 and m["fd"] > 0 and len(m["attribute_accuracy"]) == 4
    # one table row per scale and sampler, and the comparison at the fixed scale
    report = (out / "report.md").read_text()
    rows = [line for line in report.splitlines() if line.startswith(tuple(
        f"| {g} | " for g in SCALES))]
    assert len(rows) == len(SCALES) * len(SAMPLERS), rows
    assert "## How close the conditioned student comes" in report
    assert "At guidance 4, where both students were trained" in report
    # the two stores: one over the scales, one at the fixed scale (same size)
    cond = json.loads((out / "conditioned" / "pairs" / "manifest.json").read_text())
    fixed = json.loads((out / "fixed" / "pairs" / "manifest.json").read_text())
    assert cond["config"]["guidance_set"] == {"values": [2.0, 4.0, 8.0]}
    assert fixed["config"]["guidance"] == 4.0 and not fixed["config"].get("guidance_set")
    assert cond["num_pairs"] == fixed["num_pairs"] == metrics["settings"]["pairs"]
    # the exported conditioned student gives different images at different scales; the
    # fixed-scale student is exported without a guidance set
    from d2g_fast.toy import heldout
    from d2g_fast.toy.evaluate import load_pipeline, pipeline_latents

    pipe = load_pipeline(out / "student_conditioned")
    assert pipe.unet.config.time_cond_proj_dim is not None
    prompts, noise = heldout(4)
    low, high = (pipeline_latents(pipe, prompts, noise, 1, float(g)) for g in ("2", "8"))
    assert not torch.allclose(low, high, rtol=0, atol=1e-4), (low - high).abs().max()
    student_info = json.loads((out / "student_fixed" / "d2g_student.json").read_text())
    assert not student_info.get("guidance_set")


@pytest.mark.parametrize("argv, message", [
    (["--guidance-sweep", "2,x"], "--guidance-sweep must be comma-separated numbers"),
    (["--guidance-sweep", "4"], "--guidance-sweep needs at least two distinct scales"),
    (["--guidance-sweep", "0.5,4"], "--guidance-sweep scales must be >= 1"),
    (["--guidance-sweep", "2,3"], "--guidance (4, the fixed-scale student's) must lie within"),
    (["--guidance-sweep", "--iters", "0"], "--iters must be >= 1"),
    (["--guidance-sweep", "--ablation"], "--ablation"),
])
def test_guidance_sweep_refuses_bad_input(tmp_path, capsys, argv, message):
    from d2g_fast.cli import main

    out = tmp_path / "sweep"
    assert main(["demo", *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("d2g demo: error: ") and message in err, err
    assert not out.exists(), "bad input must write nothing"
