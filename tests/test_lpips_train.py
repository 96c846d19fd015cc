"""Train your own LatentLPIPS (d2g_fast.lpips): trunk training, 2AFC calibration, the weights
format ELatentLPIPS loads for a new encoder, exact resume after a kill. Tiny shapes (8x8
latents, width_div 8 trunks) on one thread."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from d2g_helpers import one_thread
from safetensors.torch import load_file

from d2g_fast import ELatentLPIPS
from d2g_fast.lpips import Triplets, calibrate_heads, train_trunk, trunk_info, two_afc_of_module, two_afc_score
from d2g_fast.lpips.calibrate import module_distances, pooled_differences
from d2g_fast.nn.latent_vgg import LatentVGG16BN

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NORM = (0.25, 0.5)
FAST = dict(width_div=8, steps=60, batch_size=32, lr=3e-3, progress=False)


def class_latents(n: int, channels: int, classes: int = 4, noise: float = 1.5, seed: int = 0):
    """Latents of ``classes`` classes: a random 8x8 pattern per class plus strong noise."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(classes, channels, 8, 8, generator=g)
    labels = torch.arange(n) % classes
    return protos[labels] + noise * torch.randn(n, channels, 8, 8, generator=g), labels


def ordered_triplets(n: int, channels: int, seed: int = 1, agreement: float = 0.8) -> Triplets:
    """p0 / p1 = the reference plus weak or strong noise, in random order; ``agreement`` of the
    humans prefer the weaker distortion (BAPPS convention: judge = share preferring p1)."""
    g = torch.Generator().manual_seed(seed)
    ref = torch.randn(n, channels, 8, 8, generator=g)
    weak = ref + 0.4 * torch.randn(ref.shape, generator=g)
    strong = ref + 1.2 * torch.randn(ref.shape, generator=g)
    p1_weak = (torch.rand(n, generator=g) < 0.5).view(-1, 1, 1, 1)
    judge = torch.where(p1_weak.view(-1), agreement, 1 - agreement)
    return Triplets(ref, torch.where(p1_weak, strong, weak), torch.where(p1_weak, weak, strong), judge)


@pytest.fixture(scope="module", params=[4, 16], ids=["4ch", "16ch"])
def trained(request, tmp_path_factory):
    """(channels, trunk file, module file) for 4- and 16-channel latents."""
    c = request.param
    d = tmp_path_factory.mktemp(f"lpips{c}")
    with one_thread():
        x, y = class_latents(320, c)
        trunk = train_trunk(x, y, d / "trunk.safetensors", encoder=f"toy{c}", normalization=NORM, **FAST)
        full = calibrate_heads(trunk, ordered_triplets(240, c), d / "full.safetensors", epochs=20, lr=1e-2)
    return c, trunk, full


def test_trunk_training_beats_chance(trained):
    c, trunk, _ = trained
    meta = trunk_info(trunk)
    assert meta["kind"] == "trunk" and meta["latent_channels"] == str(c) and meta["width_div"] == "8"
    assert (float(meta["shift"]), float(meta["scale"])) == NORM and meta["num_classes"] == "4"
    assert float(meta["top1"]) >= 60.0, meta["top1"]  # 4 classes: chance is 25 %
    # The trunk part loads strictly into the latent VGG16-BN layout.
    sd = load_file(str(trunk))
    net = LatentVGG16BN(c, width_div=8)
    net.load_state_dict({k[len("net."):]: v for k, v in sd.items() if k.startswith("net.")}, strict=True)
    assert {k for k in sd if not k.startswith("net.")} == {"classifier.weight", "classifier.bias"}


def test_calibration_beats_chance_and_heads_are_non_negative(trained):
    c, _, full = trained
    meta = trunk_info(full)
    # Judges agree 80 % with the true order: 0.8 is the best reachable score, 0.5 chance.
    assert float(meta["two_afc_val"]) >= 0.7 and float(meta["two_afc_train"]) >= 0.7, meta
    model = ELatentLPIPS.from_safetensors(full, augment=None)
    assert all((lin.weight >= 0).all() for lin in model.lins)
    assert sum(int((lin.weight > 0).sum()) for lin in model.lins) > 0
    # The module's own distance gives the same ranking score on fresh triplets.
    with one_thread():
        score = two_afc_of_module(model, ordered_triplets(120, c, seed=7))
    assert score >= 0.7, score


def test_weights_load_for_a_new_encoder_and_give_a_loss(trained):
    c, trunk, full = trained
    by_name = ELatentLPIPS(encoder=f"toy{c}", heads_path=full, verbose=False, augment="bg")
    by_file = ELatentLPIPS.from_safetensors(full)
    assert (by_name.latent_channels, by_name.width_div, by_name.normalization) == (c, 8, NORM)
    for a, b in zip(by_name.state_dict().values(), by_file.state_dict().values()):
        assert torch.equal(a, b)
    x, y = class_latents(2, c, seed=3)[0], class_latents(2, c, seed=4)[0]
    x.requires_grad_(True)
    with one_thread():
        loss = by_name(x, y, normalize=True)
        loss.sum().backward()
    assert loss.shape == (2, 1, 1, 1) and torch.isfinite(loss).all() and (loss > 0).all()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    # The trunk file alone: trunk_path with random heads; as heads_path it is refused clearly.
    trunk_only = ELatentLPIPS(encoder=f"toy{c}", pretrained=False, trunk_path=trunk, verbose=False)
    assert torch.equal(trunk_only.net.slice1[0].weight, by_name.net.slice1[0].weight)
    with pytest.raises(ValueError, match="trained trunk without calibrated heads"):
        ELatentLPIPS(encoder=f"toy{c}", heads_path=trunk, verbose=False)


def test_calibrated_distance_is_the_fitted_linear_form(trained):
    """The distance ELatentLPIPS computes (fast path) equals w . pooled differences (float64)."""
    c, _, full = trained
    model = ELatentLPIPS.from_safetensors(full, augment=None)
    t = ordered_triplets(6, c, seed=5)
    w = torch.cat([lin.weight.reshape(-1) for lin in model.lins]).double()
    with one_thread():
        expected = pooled_differences(model.net, t.ref, t.p0) @ w
        got = module_distances(model, t.ref, t.p0)
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-6)


def test_two_afc_score_convention():
    d0 = torch.tensor([1.0, 1.0, 1.0, 2.0])
    d1 = torch.tensor([0.5, 2.0, 1.0, 1.0])
    judge = torch.tensor([1.0, 0.25, 0.9, 0.0])  # share preferring p1
    # p1 closer & all prefer p1 -> 1; p0 closer & 75 % prefer p0 -> .75; tie -> .5; p1 closer, none prefer it -> 0
    assert two_afc_score(d0, d1, judge) == pytest.approx((1 + 0.75 + 0.5 + 0) / 4)


def test_unknown_encoder_needs_a_file_or_channels(tmp_path):
    with pytest.raises(ValueError, match="encoder must be one of .*'my-vae'"):
        ELatentLPIPS(encoder="my-vae", pretrained=False, pnet_rand=True, verbose=False)
    m = ELatentLPIPS(encoder="my-vae", pretrained=False, pnet_rand=True, verbose=False, augment=None,
                     latent_channels=4, width_div=4)
    assert m.chns == [16, 32, 64, 128, 128] and m.normalization is None
    x = torch.randn(1, 4, 8, 8)
    with pytest.raises(ValueError, match="normalize=True needs the VAE normalisation"):
        m(x, x, normalize=True, ensembling=False)
    m.save_safetensors(tmp_path / "m.safetensors")
    again = ELatentLPIPS.from_safetensors(tmp_path / "m.safetensors")
    assert again.width_div == 4 and again.encoder == "my-vae"
    with pytest.raises(ValueError, match="width_div must be one of"):
        ELatentLPIPS(encoder="sd15", pretrained=False, pnet_rand=True, verbose=False, width_div=3)


def test_official_layout_unchanged_by_width_option():
    full = LatentVGG16BN(4)
    assert full.tap_channels == (64, 128, 256, 512, 512) and full.width_div == 1
    assert sum(p.numel() for p in LatentVGG16BN(4, width_div=8).parameters()) * 40 < \
        sum(p.numel() for p in full.parameters())


def test_train_trunk_rejects_bad_input(tmp_path):
    x, y = class_latents(16, 4)
    with pytest.raises(ValueError, match="normalization"):
        train_trunk(x, y, tmp_path / "t.safetensors", encoder="unknown-vae", **FAST)
    with pytest.raises(ValueError, match="at least 4x4"):
        train_trunk(x[:, :, :3, :3], y, tmp_path / "t.safetensors", encoder="sd15", **FAST)
    with pytest.raises(ValueError, match="at least 2 classes"):
        train_trunk(x, torch.zeros_like(y), tmp_path / "t.safetensors", encoder="sd15", **FAST)
    with pytest.raises(ValueError, match="steps must be a positive int"):
        train_trunk(x, y, tmp_path / "t.safetensors", encoder="sd15", **{**FAST, "steps": 0})


KILLED_RUN = textwrap.dedent("""
    import os, signal, sys
    import torch
    torch.set_num_threads(1)
    from d2g_fast.lpips import train_trunk
    data = torch.load(sys.argv[1], weights_only=True)

    def die_after(step):
        if step == 4:
            os.kill(os.getpid(), signal.SIGKILL)

    train_trunk(data["x"], data["y"], sys.argv[2], encoder="sd15", width_div=8, steps=8,
                batch_size=16, lr=3e-3, checkpoint_every=2, progress=False, on_checkpoint=die_after)
""")


def test_killed_and_resumed_training_equals_uninterrupted(tmp_path):
    x, y = class_latents(96, 4)
    torch.save({"x": x, "y": y}, tmp_path / "data.pt")
    (tmp_path / "run.py").write_text(KILLED_RUN)
    killed = tmp_path / "killed.safetensors"
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, str(tmp_path / "run.py"), str(tmp_path / "data.pt"), str(killed)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    ckpt = torch.load(str(killed) + ".ckpt", weights_only=True)
    assert ckpt["step"] == 4 and not killed.exists()

    kw = dict(encoder="sd15", width_div=8, steps=8, batch_size=16, lr=3e-3, checkpoint_every=2,
              progress=False)
    with one_thread():
        train_trunk(x, y, killed, **kw)  # resumes from step 4
        straight = train_trunk(x, y, tmp_path / "straight.safetensors", **kw)
    a, b = load_file(str(killed)), load_file(str(straight))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # A checkpoint of other settings is refused, naming the difference.
    with pytest.raises(ValueError, match="other settings.*lr"):
        train_trunk(x, y, killed, **{**kw, "lr": 1e-3})


def test_fit_heads_finds_the_feature_the_judges_follow():
    """Judges follow feature 0 alone, the other five are larger noise: uniform weights rank
    near chance, the fitted non-negative weights put their mass on feature 0."""
    from d2g_fast.lpips.calibrate import fit_heads
    g = torch.Generator().manual_seed(0)

    def pooled(n):
        m0, m1 = torch.rand(n, 6, generator=g, dtype=torch.float64), torch.rand(n, 6, generator=g, dtype=torch.float64)
        m0[:, 1:] *= 3
        m1[:, 1:] *= 3
        return m0, m1, torch.where(m1[:, 0] < m0[:, 0], 0.9, 0.1)

    (m0, m1, judge), (v0, v1, vjudge) = pooled(400), pooled(400)
    uniform = torch.ones(6, dtype=torch.float64)
    assert two_afc_score(v0 @ uniform, v1 @ uniform, vjudge) < 0.6
    with one_thread():
        w = fit_heads(m0, m1, judge, epochs=20, lr=1e-2).double()
    assert (w >= 0).all() and w[0] > 5 * w[1:].max()
    assert two_afc_score(v0 @ w, v1 @ w, vjudge) > 0.85  # 0.9 is the best reachable


def test_bf16_training_runs_and_records_a_finite_loss(tmp_path):
    x, y = class_latents(48, 4)
    with one_thread():
        out = train_trunk(x, y, tmp_path / "t.safetensors", encoder="sdxl",
                          **{**FAST, "steps": 3, "batch_size": 16, "precision": "bf16"})
    meta = trunk_info(out)
    assert meta["final_loss"] != "nan" and float(meta["final_loss"]) > 0
    assert (float(meta["shift"]), float(meta["scale"])) == (0.0, 0.13025)  # the official SDXL values
    sd = load_file(str(out))
    assert all(v.dtype == torch.float32 for k, v in sd.items() if v.is_floating_point())
