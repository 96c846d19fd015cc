"""Flow-matching transformer teachers (SD3 / FLUX families) on tiny random-weight pipelines:
sampling and collection equal the stock pipelines, kill-and-resume and torchrun give the same
store, the one-step generator and its export reproduce each other, bad input is refused."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from d2g_helpers import one_thread

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from diffusers import DiffusionPipeline  # noqa: E402

from d2g_fast.cli import main as d2g_main  # noqa: E402
from d2g_fast.data import PairDataset  # noqa: E402
from d2g_fast.teacher import Teacher  # noqa: E402
from d2g_fast.teacher.families import FAMILIES  # noqa: E402
from d2g_fast.teacher.families.flux import pack, unpack  # noqa: E402
from d2g_fast.testing.tiny import (save_tiny_flux_pipeline, save_tiny_sd3_pipeline,  # noqa: E402
                                   tiny_flux_pipeline, tiny_sd3_pipeline)
from d2g_fast.train.export import STUDENT_INFO, student_info, student_pipeline  # noqa: E402
from d2g_fast.train.generator import make_generator  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["a red fox in the snow", "the lighthouse on a cliff", "x"]
FLUX_RES = (32, 24)   # latent (16, 16, 12): not square, packed 8 x 6
SD3_RES = (16, 24)    # latent (16, 8, 12)


@pytest.fixture(autouse=True)
def _one_thread_flow():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def sd3_folder(tmp_path_factory):
    # Another shape than the builder's default: three blocks, dynamic shifting.
    return save_tiny_sd3_pipeline(str(tmp_path_factory.mktemp("flow") / "sd3"), num_layers=3,
                                  dynamic_shifting=True)


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory):
    return save_tiny_flux_pipeline(str(tmp_path_factory.mktemp("flow") / "flux"))


def _noise(teacher, n, seed=0):
    return torch.randn(n, *teacher.latent_shape, generator=torch.Generator().manual_seed(seed))


def _rel_err(ours, ref):
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
    return env


# ------------------------------------------------------------------------------ the teacher
def test_registry_maps_pipeline_classes_to_families():
    assert {c: n for n, f in FAMILIES.items() for c in f.pipeline_classes} == {
        "StableDiffusionPipeline": "sd", "StableDiffusionXLPipeline": "sdxl",
        "StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux"}


@pytest.mark.parametrize("t5,guidance,negative", [
    (True, 5.0, None),      # CFG, T5 present
    (False, 4.0, "ugly"),   # T5 absent: the pipeline's zeros; a negative prompt
    (True, 1.0, None),      # no guidance: one unbatched pass
])
def test_sd3_sample_equals_pipeline(t5, guidance, negative):
    pipe = tiny_sd3_pipeline(t5=t5, shift=2.0)
    teacher = Teacher.from_pipeline(pipe, resolution=SD3_RES)
    assert teacher.name == "sd3" and teacher.latent_shape == (16, 8, 12)
    noise = _noise(teacher, 3)
    ref = pipe(PROMPTS, latents=noise.clone(), height=SD3_RES[0], width=SD3_RES[1],
               num_inference_steps=3, guidance_scale=guidance,
               negative_prompt=[negative] * 3 if negative else None, output_type="latent").images
    ours = teacher.sample(noise, PROMPTS, steps=3, guidance=guidance, negative_prompt=negative)
    assert ref.abs().max() > 0.1
    assert _rel_err(ours, ref) <= 1e-5


@pytest.mark.parametrize("guidance_embeds", [True, False])   # dev-like, schnell-like
def test_flux_sample_equals_pipeline(guidance_embeds):
    pipe = tiny_flux_pipeline(guidance_embeds=guidance_embeds, num_single_layers=2)
    teacher = Teacher.from_pipeline(pipe, resolution=FLUX_RES)
    assert teacher.name == "flux" and teacher.latent_shape == (16, 16, 12)
    noise = _noise(teacher, 3)
    for guidance in (3.5, 2.0):
        ref = pipe(PROMPTS, latents=pack(noise), height=FLUX_RES[0], width=FLUX_RES[1],
                   num_inference_steps=3, guidance_scale=guidance, output_type="latent").images
        ref = unpack(ref, 16, 12)
        ours = teacher.sample(noise, PROMPTS, steps=3, guidance=guidance)
        assert _rel_err(ours, ref) <= 1e-5, guidance
    # the guidance embedding matters for dev and is ignored by schnell
    a = teacher.sample(noise, PROMPTS, steps=2, guidance=3.5)
    b = teacher.sample(noise, PROMPTS, steps=2, guidance=1.5)
    assert (not torch.equal(a, b)) == guidance_embeds


def test_flux_dynamic_shift_follows_the_resolution():
    pipe = tiny_flux_pipeline()
    small, large = (Teacher.from_pipeline(pipe, resolution=r) for r in (16, 64))
    sched = [t.make_scheduler() for t in (small, large)]
    small.set_timesteps(sched[0], 4)
    large.set_timesteps(sched[1], 4)
    assert sched[0].timesteps[0] == sched[1].timesteps[0] == 1000  # sigma = 1 at any size
    assert not torch.equal(sched[0].timesteps, sched[1].timesteps)


# ------------------------------------------------------------------------------ collection
def _collect_args(folder, out, resolution, extra=()):
    return ["collect", "--teacher", folder, "--num-pairs", "3", "--steps", "2",
            "--resolution", str(resolution), "--batch-size", "2", "--shard-size", "2",
            "--seed", "7", "--no-progress", "--out", out, *extra]


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_collect_store_equals_stock_pipeline(kind, sd3_folder, flux_folder, tmp_path, capsys):
    folder, res, guidance = (sd3_folder, 24, "4.5") if kind == "sd3" else (flux_folder, 16, "3")
    out = str(tmp_path / "pairs")
    assert d2g_main(_collect_args(folder, out, res, ["--guidance", guidance,
                                                     "--store-embeddings"])) == 0
    ds = PairDataset(out, check="sha256")
    manifest = ds.manifest
    assert manifest["config"]["teacher_kind"] == kind
    assert manifest["config"]["scheduler"] == "FlowMatchEulerDiscreteScheduler"
    pipe = DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    items = [ds[i] for i in range(3)]
    refs = []
    for rows in ([0, 1], [2]):   # the collector's batches
        noise = torch.stack([items[r]["noise"] for r in rows])
        latents = pack(noise) if kind == "flux" else noise.clone()
        ref = pipe([items[r]["prompt"] for r in rows], latents=latents, height=res, width=res,
                   num_inference_steps=2, guidance_scale=float(guidance),
                   output_type="latent").images
        refs.append(unpack(ref, res // 2, res // 2) if kind == "flux" else ref)
    ref, stored = torch.cat(refs), torch.stack([it["latent"] for it in items])
    assert stored.shape == (3, 16, res // 2, res // 2)   # FLUX: unpacked
    assert _rel_err(stored, ref) <= 1e-5
    if kind == "sd3":   # CLIP 77 + T5 256 tokens x joint width; pooled CLIP-L + CLIP-G
        assert items[0]["prompt_embeds"].shape == (333, 64)
        assert items[0]["pooled_prompt_embeds"].shape == (64,)
    else:               # T5 512 tokens; CLIP-L pooled
        assert items[0]["prompt_embeds"].shape == (512, 32)
        assert items[0]["pooled_prompt_embeds"].shape == (32,)
        assert "unpacked" in manifest["tensors"]["latent"]["layout"]
    capsys.readouterr()
    assert d2g_main(["verify", out, "--recompute", "2"]) == 0
    assert "intact" in capsys.readouterr().out


def test_flow_bad_input_is_refused_and_writes_nothing(sd3_folder, flux_folder, tmp_path,
                                                      capsys):
    no_vae = str(tmp_path / "no_vae")
    shutil.copytree(sd3_folder, no_vae)
    shutil.rmtree(os.path.join(no_vae, "vae"))
    cases = [
        (_collect_args(no_vae, str(tmp_path / "a"), 16), "--teacher"),               # no VAE
        (_collect_args(sd3_folder, str(tmp_path / "b"), 18), "--resolution"),        # 18 % 4
        (_collect_args(flux_folder, str(tmp_path / "c"), 30), "--resolution"),       # 30 % 4
        (_collect_args(flux_folder, str(tmp_path / "d"), 16, ["--negative-prompt", "ugly"]),
         "--negative-prompt"),
        (_collect_args(sd3_folder, str(tmp_path / "e"), 16, ["--scheduler", "ddim"]),
         "--scheduler"),
    ]
    for args, flag in cases:
        capsys.readouterr()
        assert d2g_main(args) == 2, args
        err = capsys.readouterr().err
        assert flag in err, err
        assert not os.path.exists(args[args.index("--out") + 1]), f"{flag}: something written"
    with pytest.raises(ValueError, match="vae"):
        Teacher.from_pretrained(no_vae)


def test_flux_store_refused_with_an_sd3_teacher(sd3_folder, flux_folder, tmp_path, capsys):
    out = str(tmp_path / "flux_pairs")
    assert d2g_main(_collect_args(flux_folder, out, 16, ["--guidance", "3"])) == 0
    before = sorted(os.listdir(out))
    capsys.readouterr()
    # verify --recompute with the other family's teacher
    assert d2g_main(["verify", out, "--recompute", "1", "--teacher", sd3_folder]) == 2
    err = capsys.readouterr().err
    assert "--teacher" in err and "flux" in err and "sd3" in err
    # resuming the store with the SD3 teacher
    assert d2g_main(_collect_args(sd3_folder, out, 16)) == 2
    assert "--out" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == before


@pytest.mark.slow
def test_flow_collect_kill_and_resume_equals_uninterrupted_run(flux_folder, tmp_path, capsys):
    args = ["--teacher", flux_folder, "--num-pairs", "12", "--shard-size", "2",
            "--batch-size", "1", "--steps", "6", "--guidance", "3.5", "--resolution", "16",
            "--seed", "3", "--no-progress"]
    killed = str(tmp_path / "killed")
    cmd = [sys.executable, "-m", "d2g_fast.cli", "collect", *args, "--out", killed]
    proc = subprocess.Popen(cmd, env=_env(), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while not os.path.exists(os.path.join(killed, "shard-00001.json")):
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        assert time.time() < deadline, "the collector wrote no shard in time"
        time.sleep(0.01)
    time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    manifest = json.load(open(os.path.join(killed, "manifest.json")))
    assert not manifest["complete"], "the run finished before it was killed: test is void"
    rerun = subprocess.run(cmd, env=_env(), cwd=REPO, capture_output=True, text=True,
                           timeout=400)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    full = str(tmp_path / "uninterrupted")
    assert d2g_main(["collect", *args, "--out", full]) == 0
    _assert_same_shards(killed, full)


@pytest.mark.slow
def test_flow_collect_torchrun_two_processes_equals_one(sd3_folder, tmp_path):
    args = ["--teacher", sd3_folder, "--num-pairs", "5", "--shard-size", "1", "--batch-size", "1",
            "--steps", "2", "--resolution", "16", "--seed", "5", "--store-embeddings",
            "--no-progress"]
    two = str(tmp_path / "two")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "d2g_fast.cli", "collect", *args, "--out", two]
    run = subprocess.run(cmd, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    ranks = {json.load(open(os.path.join(two, f"shard-{k:05d}.json")))["rank"] for k in range(5)}
    assert ranks == {0, 1}
    one = str(tmp_path / "one")
    assert d2g_main(["collect", *args, "--out", one]) == 0
    _assert_same_shards(two, one)


def _assert_same_shards(a, b):
    names = sorted(n for n in os.listdir(b) if n.endswith(".safetensors"))
    assert names and names == sorted(n for n in os.listdir(a) if n.endswith(".safetensors"))
    for name in names:
        with open(os.path.join(a, name), "rb") as fa, open(os.path.join(b, name), "rb") as fb:
            assert fa.read() == fb.read(), f"{name} differs"


# ------------------------------------------------------------------------------ G and export
def _student(teacher, guidance, seed=0):
    """G, its weights moved off the teacher's (as training would)."""
    gen = make_generator(teacher, guidance=guidance)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in gen.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return gen.eval()


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_generator_starts_as_the_teachers_one_step_prediction(kind, sd3_folder, flux_folder):
    folder, res, guidance = (sd3_folder, 16, 1.0) if kind == "sd3" else (flux_folder, 16, 3.5)
    teacher = Teacher.from_pretrained(folder, resolution=res)
    gen = make_generator(teacher, guidance=guidance)
    rule = gen.rule
    assert rule.timestep == 1000.0 and rule.level == 1.0 and rule.prediction_type == "flow"
    assert rule.guidance == (3.5 if kind == "flux" else None)
    noise = _noise(teacher, 2, seed=4)
    cond = teacher.encode_prompts(PROMPTS[:2], guided=False)
    with torch.no_grad():
        x0 = gen(noise, cond.encoder_hidden_states, cond.added_cond_kwargs)
    one_step = teacher.sample(noise, PROMPTS[:2], steps=1, guidance=guidance)
    assert _rel_err(x0, one_step) <= 1e-5
    x0_param = make_generator(teacher, parameterization="x0", guidance=guidance)
    assert x0_param.rule.prediction_type == "sample"
    with pytest.raises(ValueError, match="--parameterization"):
        teacher.export_check(x0_param.describe())
    with pytest.raises(ValueError, match="--timestep"):
        make_generator(teacher, timestep=500, guidance=guidance)


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_export_reproduces_the_generator(kind, sd3_folder, flux_folder, tmp_path, capsys):
    folder, res, guidance = (sd3_folder, 24, 4.5) if kind == "sd3" else (flux_folder, 16, 3.0)
    teacher = Teacher.from_pretrained(folder, resolution=res)
    gen = _student(teacher, guidance)
    record = {**gen.describe(), "resolution": [res, res]}
    pipe, fam = student_pipeline(folder, gen.net.state_dict(), record)
    out = str(tmp_path / "student")
    pipe.save_pretrained(out, safe_serialization=True)
    info = student_info(fam, record, type(pipe).__name__)
    with open(os.path.join(out, STUDENT_INFO), "w") as f:
        json.dump(info, f)
    assert info["guidance_scale"] == (1.0 if kind == "sd3" else 3.0)
    loaded = DiffusionPipeline.from_pretrained(out, local_files_only=True)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded).__name__ == ("StableDiffusion3Pipeline" if kind == "sd3"
                                     else "FluxPipeline")
    noise = _noise(teacher, 3, seed=2)
    calls = []
    net = getattr(loaded, fam.denoiser_name)
    hook = net.register_forward_hook(lambda *a: calls.append(1))
    ref = loaded(PROMPTS, latents=fam.pipeline_latents(noise), num_inference_steps=1,
                 guidance_scale=info["guidance_scale"], height=res, width=res,
                 output_type="latent").images
    hook.remove()
    assert len(calls) == 1, "the exported pipeline must run the student exactly once"
    if kind == "flux":
        ref = unpack(ref, res // 2, res // 2)
    cond = teacher.encode_prompts(PROMPTS, guided=False)
    with torch.no_grad():
        ours = gen(noise, cond.encoder_hidden_states, cond.added_cond_kwargs)
    assert _rel_err(ours, ref) <= 1e-5
    # d2g sample uses the guidance and resolution d2g_student.json asks for
    capsys.readouterr()
    samples = str(tmp_path / "samples")
    assert d2g_main(["sample", "--model", out, "--prompts", "a red fox", "--out", samples,
                     "--device", "cpu"]) == 0
    from PIL import Image

    with Image.open(os.path.join(samples, "00000.png")) as im:
        assert im.size == (res, res)
    # d2g eval's generation step on the exported folder
    from d2g_fast.eval.generate import generate_images, native_resolution

    assert native_resolution(loaded) > 0
    images = generate_images(loaded, PROMPTS, [0, 2], seed=0, steps=1,
                             guidance=info["guidance_scale"], size=res)
    assert images.shape == (2, res, res, 3) and images.dtype.name == "uint8"
    if kind == "flux":  # d2g eval end to end on the exported FLUX student
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from eval_fixtures import save_tiny_inception, write_captions, write_reference_images

        evald = str(tmp_path / "eval")
        assert d2g_main([
            "eval", "--model", out, "--captions", write_captions(str(tmp_path / "c.txt"), 8),
            "--reference", write_reference_images(str(tmp_path / "ref"), 8),
            "--inception-weights", save_tiny_inception(str(tmp_path / "inception.pt")),
            "--num-images", "8", "--resolution", "16", "--gen-resolution", str(res),
            "--steps", "1", "--guidance", str(info["guidance_scale"]), "--batch-size", "4",
            "--shard-size", "8", "--diversity-prompts", "0", "--device", "cpu",
            "--out", evald]) == 0
        assert os.path.isfile(os.path.join(evald, "report.json"))


def test_export_of_a_trained_flux_run_reproduces_its_generator(flux_folder, tmp_path, capsys):
    """collect -> distill (a checkpoint) -> d2g export -> the stock FluxPipeline in one step equals
    G with the checkpoint's EMA weights and guidance; d2g sample reads d2g_student.json."""
    from d2g_fast.train import checkpoint as ckpt

    pairs, run, out = (str(tmp_path / n) for n in ("pairs", "run", "student"))
    assert d2g_main(_collect_args(flux_folder, pairs, 16, ["--guidance", "3.5"])) == 0
    assert d2g_main(["distill", "--teacher", flux_folder, "--pairs", pairs, "--out", run,
                     "--lpips-random", "--batch-size", "2", "--max-steps", "1",
                     "--checkpoint-every", "1", "--val-pairs", "0", "--no-progress"]) == 0
    capsys.readouterr()
    assert d2g_main(["export", run, "--out", out]) == 0
    assert "guidance_scale=3.5, height=16, width=16" in capsys.readouterr().out
    with open(os.path.join(out, STUDENT_INFO)) as f:
        info = json.load(f)
    assert info["family"] == "flux" and info["guidance_scale"] == 3.5
    path = ckpt.latest_checkpoint(run)
    teacher = Teacher.from_pretrained(flux_folder, resolution=16)
    gen = make_generator(teacher, guidance=info["guidance_scale"])
    gen.net.load_state_dict(ckpt.load_generator_weights(path, use_ema=True))
    pipe = DiffusionPipeline.from_pretrained(out, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    noise = _noise(teacher, 2, seed=9)
    ref = pipe(PROMPTS[:2], latents=pack(noise), num_inference_steps=1, guidance_scale=3.5,
               height=16, width=16, output_type="latent").images
    cond = teacher.encode_prompts(PROMPTS[:2], guided=False)
    with torch.no_grad():
        ours = gen(noise, cond.encoder_hidden_states, cond.added_cond_kwargs)
    assert _rel_err(ours, unpack(ref, 8, 8)) <= 1e-5
    assert d2g_main(["sample", "--model", out, "--prompts", "x", "--out",
                     str(tmp_path / "samples"), "--device", "cpu"]) == 0


def test_collect_guidance_defaults_to_the_familys_own(sd3_folder, flux_folder, tmp_path):
    """Without --guidance, FLUX-dev pairs get FluxPipeline's guidance_scale default (3.5), not
    the classifier-free 8 of the UNet and SD3 families."""
    for folder, res, expected in ((flux_folder, 16, 3.5), (sd3_folder, 16, 8.0)):
        out = str(tmp_path / f"pairs-{expected}")
        args = _collect_args(folder, out, res)
        args[args.index("--num-pairs") + 1] = "1"
        assert d2g_main(args) == 0
        assert PairDataset(out).manifest["config"]["guidance"] == expected
