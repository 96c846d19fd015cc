"""d2g_fast.lpips data and CLI: BAPPS 2AFC folders and image class folders encoded by a tiny
random diffusers VAE (16x16 PNGs -> 4x8x8 latents), the latent cache, bad folders, and
``d2g lpips train-trunk / calibrate / eval`` end to end."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from d2g_helpers import one_thread

from d2g_fast.cli import main
from d2g_fast.lpips import data
from d2g_fast.lpips.trunk import trunk_info

SIZE = 16


def write_png(path, seed: int) -> None:
    from PIL import Image
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(path)


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    from d2g_fast.testing.tiny import _tiny_vae
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vae") / "vae"
    _tiny_vae().save_pretrained(str(path))
    return path


def make_bapps(root, judges) -> None:
    # Written in reverse order: the reader must match files by stem, not by listing order.
    for i in reversed(range(len(judges))):
        stem = f"{i:06d}"
        for k, d in enumerate(("ref", "p0", "p1")):
            write_png(root / d / f"{stem}.png", seed=100 * i + k)
        (root / "judge").mkdir(parents=True, exist_ok=True)
        np.save(root / "judge" / f"{stem}.npy", np.array([judges[i]], dtype=np.float32))


JUDGES = [0.0, 0.25, 0.5, 0.75, 1.0]


def test_bapps_folder_is_read_and_encoded(tmp_path, vae_dir, monkeypatch):
    from diffusers import AutoencoderKL
    from PIL import Image
    root = tmp_path / "2afc"
    make_bapps(root, JUDGES)
    with one_thread():
        trip = data.load_triplets(root, vae_dir, cache_dir=tmp_path / "cache")
    assert trip.ref.shape == (5, 4, SIZE // 2, SIZE // 2) and trip.judge.tolist() == JUDGES
    # Independent encoding of p1/000003.png: encode(img*2-1).latent_dist.mean * scaling_factor.
    vae = AutoencoderKL.from_pretrained(str(vae_dir)).eval()
    img = torch.from_numpy(np.asarray(Image.open(root / "p1" / "000003.png"), dtype=np.float32) / 255)
    with torch.no_grad(), one_thread():
        expected = vae.encode(img.permute(2, 0, 1)[None] * 2 - 1).latent_dist.mean * vae.config.scaling_factor
    torch.testing.assert_close(trip.p1[3:4], expected, rtol=1e-4, atol=1e-5)

    # The cache is re-used while the files are unchanged and refreshed when one changes.
    def no_encoding(*args, **kwargs):
        raise AssertionError("encoded again although the cache is valid")
    monkeypatch.setattr(data.VaeEncoder, "encode", no_encoding)
    again = data.load_triplets(root, vae_dir, cache_dir=tmp_path / "cache")
    assert torch.equal(again.p1, trip.p1)
    write_png(root / "p1" / "000003.png", seed=999)
    with pytest.raises(AssertionError, match="encoded again"):
        data.load_triplets(root, vae_dir, cache_dir=tmp_path / "cache")


def test_bad_bapps_folders_say_what_is_missing(tmp_path):
    root = tmp_path / "2afc"
    make_bapps(root, JUDGES)
    (root / "judge" / "000002.npy").unlink()
    with pytest.raises(ValueError, match=r"judge' has 4 .npy files, ref/ has 5: missing 1 \(e.g. 000002\)"):
        data.bapps_files(root)
    np.save(root / "judge" / "000002.npy", np.array([1.5]))
    with pytest.raises(ValueError, match="000002.npy' must hold one value in \\[0, 1\\]"):
        data.read_judgements(data.bapps_files(root)[1]["judge"])
    for f in (root / "p1").iterdir():
        f.unlink()
    (root / "p1").rmdir()
    with pytest.raises(FileNotFoundError, match="missing subfolder\\(s\\) p1"):
        data.bapps_files(root)
    with pytest.raises(ValueError, match="needs --vae"):
        data.load_triplets(root, None)
    with pytest.raises(FileNotFoundError, match="--data: folder not found"):
        data.bapps_files(tmp_path / "nowhere")


def test_bad_class_folders_say_what_is_missing(tmp_path):
    write_png(tmp_path / "imgs" / "cat" / "a.png", 1)
    with pytest.raises(ValueError, match="one subfolder per class .*found 1"):
        data.class_folders(tmp_path / "imgs", data.IMAGE_EXTENSIONS)
    (tmp_path / "imgs" / "dog").mkdir()
    with pytest.raises(ValueError, match="class folder .*dog' holds no"):
        data.class_folders(tmp_path / "imgs", data.IMAGE_EXTENSIONS)


def test_cli_train_calibrate_eval_end_to_end(tmp_path, vae_dir, capsys):
    for label in range(2):
        for i in range(6):
            write_png(tmp_path / "imgs" / f"class{label}" / f"{i}.png", seed=10 * label + i)
    make_bapps(tmp_path / "2afc", JUDGES * 2)
    trunk, full = tmp_path / "out" / "trunk.safetensors", tmp_path / "out" / "full.safetensors"
    trunk.parent.mkdir()
    with one_thread():
        assert main(["lpips", "train-trunk", "--data", str(tmp_path / "imgs"), "--vae", str(vae_dir),
                     "--encoder", "tiny-vae", "--output", str(trunk), "--width-div", "8",
                     "--steps", "3", "--batch-size", "8", "--no-progress"]) == 0
        meta = trunk_info(trunk)
        assert (meta["encoder"], meta["latent_channels"], meta["shift"], meta["scale"]) == \
            ("tiny-vae", "4", "0.0", "0.18215")
        assert (trunk.parent / "trunk.safetensors.latents.safetensors").is_file()
        assert main(["lpips", "calibrate", "--trunk", str(trunk), "--data", str(tmp_path / "2afc"),
                     "--vae", str(vae_dir), "--output", str(full), "--epochs", "2",
                     "--val-fraction", "0.2"]) == 0
        assert "2AFC val:" in capsys.readouterr().out
        assert main(["lpips", "eval", "--weights", str(full), "--data", str(tmp_path / "2afc"),
                     "--vae", str(vae_dir)]) == 0
        out = capsys.readouterr().out
        assert "2AFC:" in out and "on 10 triplets (encoder 'tiny-vae')" in out
        # A latent-triplet file evaluates the same as the folder it came from.
        trip = data.load_triplets(tmp_path / "2afc", vae_dir, cache_dir=trunk.parent)
        data.save_triplet_file(trip, tmp_path / "trip.safetensors")
        assert main(["lpips", "eval", "--weights", str(full), "--data", str(tmp_path / "trip.safetensors")]) == 0
        assert capsys.readouterr().out.split("2AFC:")[1] == out.split("2AFC:")[1]
        # Official-format weights (a pickled state dict) evaluate with --encoder.
        from d2g_fast import ELatentLPIPS
        torch.save(ELatentLPIPS(pretrained=False, pnet_rand=True, encoder="sd15", verbose=False).state_dict(),
                   tmp_path / "sd15_latest_vgg16_tuned.pth")
        assert main(["lpips", "eval", "--encoder", "sd15", "--weights", str(tmp_path / "sd15_latest_vgg16_tuned.pth"),
                     "--data", str(tmp_path / "trip.safetensors")]) == 0
        assert "on 10 triplets (encoder 'sd15')" in capsys.readouterr().out


def test_cli_bad_arguments_are_named(tmp_path, vae_dir, capsys):
    with pytest.raises(SystemExit) as info:
        main(["lpips", "train-trunk", "--data", "x", "--encoder", "e", "--output", "o", "--steps", "0"])
    assert info.value.code == 2 and "--steps" in capsys.readouterr().err
    write_png(tmp_path / "imgs" / "a" / "0.png", 0)
    write_png(tmp_path / "imgs" / "b" / "0.png", 1)
    assert main(["lpips", "train-trunk", "--data", str(tmp_path / "imgs"), "--encoder", "e",
                 "--output", str(tmp_path / "t.safetensors")]) == 2
    assert "pass --vae" in capsys.readouterr().err
    torch.save({"latents": torch.randn(8, 4, 8, 8), "labels": torch.arange(8) % 2}, tmp_path / "lat.pt")
    assert main(["lpips", "train-trunk", "--data", str(tmp_path / "lat.pt"), "--encoder", "my-vae",
                 "--output", str(tmp_path / "t.safetensors")]) == 2
    assert "--shift/--scale" in capsys.readouterr().err
    assert main(["lpips", "eval", "--weights", str(tmp_path / "none.safetensors"), "--data", "x"]) == 2
    assert "--weights: file not found" in capsys.readouterr().err


def test_torchrun_two_cpu_ranks_train_a_trunk(tmp_path):
    """DDP with gloo on the CPU: two ranks share each global batch; rank 0 writes and reports."""
    import os
    import subprocess
    import sys
    x = torch.randn(64, 4, 8, 8)
    torch.save({"latents": x, "labels": torch.arange(64) % 2}, tmp_path / "lat.pt")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = tmp_path / "t.safetensors"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "d2g_fast.cli", "lpips", "train-trunk", "--data", str(tmp_path / "lat.pt"),
         "--encoder", "sd15", "--output", str(out), "--width-div", "8", "--steps", "4",
         "--batch-size", "16", "--checkpoint-every", "2", "--no-progress"],
        env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("wrote ") == 1, proc.stdout
    assert trunk_info(out)["steps"] == "4"
    assert torch.load(str(out) + ".ckpt", weights_only=True)["settings"]["world_size"] == 2
