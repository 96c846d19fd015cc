"""The pair store: prompt sources, determinism by index, atomic writes, PairDataset, verify."""
import json
import os

import pytest
import torch
from d2g_helpers import one_thread

pytest.importorskip("diffusers")  # the GPU machine may lack it
pytest.importorskip("transformers")

from d2g_fast.data import (PairDataset, PromptSchedule, StoreError,  # noqa: E402
                           batch_noise, load_prompts, pair_noise, verify_store)
from d2g_fast.data import store  # noqa: E402
from d2g_fast.teacher import Teacher, collect  # noqa: E402
from d2g_fast.testing import tiny_sdxl_pipeline  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread_pairstore():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def pairstore_folder(tmp_path_factory):
    """A finished store of 7 SDXL pairs in shards of 3 (3 + 3 + 1), with embeddings."""
    with one_thread():
        out = str(tmp_path_factory.mktemp("pairstore") / "pairs")
        teacher = Teacher.from_pipeline(tiny_sdxl_pipeline())
        collect(teacher, load_prompts(None)[:5], out, 7, steps=2, guidance=3.0, batch_size=2,
                shard_size=3, seed=1, store_embeddings=True, progress=False,
                log=lambda *_: None)
    return out


def _copy_store(src, dst):
    os.makedirs(dst)
    for name in os.listdir(src):
        with open(os.path.join(src, name), "rb") as f, open(os.path.join(dst, name), "wb") as g:
            g.write(f.read())
    return dst


# ---------------------------------------------------------------- prompt sources
def test_pairstore_prompts_text_json_jsonl_coco(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("a cat\n\n   a  dog\t on a mat  \n")
    assert load_prompts(str(txt)) == ["a cat", "a dog on a mat"]
    js = tmp_path / "p.json"
    js.write_text(json.dumps(["one", {"prompt": "two"}, {"text": "three"}, ""]))
    assert load_prompts(str(js)) == ["one", "two", "three"]
    coco = tmp_path / "captions_val2014.json"
    coco.write_text(json.dumps({"images": [{"id": 1}], "annotations": [
        {"image_id": 1, "id": 10, "caption": "A man riding\na wave. "},
        {"image_id": 1, "id": 11, "caption": "Surfer on a board"}]}))
    assert load_prompts(str(coco)) == ["A man riding a wave.", "Surfer on a board"]
    jl = tmp_path / "p.jsonl"
    jl.write_text('"first"\n\n{"caption": "second"}\n')
    assert load_prompts(str(jl)) == ["first", "second"]
    bundled = load_prompts(None)
    assert bundled == load_prompts("bundled") and len(bundled) >= 30
    assert len(set(bundled)) == len(bundled)


def test_pairstore_prompts_bad_input(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError, match=r"--prompts.*no prompts"):
        load_prompts(str(empty))
    with pytest.raises(FileNotFoundError, match="--prompts"):
        load_prompts(str(tmp_path / "missing.txt"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('"ok"\n{not json\n')
    with pytest.raises(ValueError, match="line 2"):
        load_prompts(str(bad))
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match="annotations"):
        load_prompts(str(wrong))
    numbers = tmp_path / "numbers.json"
    numbers.write_text("[1, 2]")
    with pytest.raises(ValueError, match="item 0"):
        load_prompts(str(numbers))


# ---------------------------------------------------------------- determinism by index
def test_pairstore_noise_and_prompt_depend_only_on_seed_and_index():
    a = pair_noise(7, 12, (4, 8, 8))
    assert torch.equal(a, pair_noise(7, 12, (4, 8, 8)))
    assert not torch.equal(a, pair_noise(7, 13, (4, 8, 8)))
    assert not torch.equal(a, pair_noise(8, 12, (4, 8, 8)))
    assert abs(a.std().item() - 1) < 0.2
    stacked = batch_noise(7, [12, 3, 12], (4, 8, 8))
    assert torch.equal(stacked[0], a) and torch.equal(stacked[2], a)
    sched = PromptSchedule(10, seed=3)
    first_epoch = [sched(i) for i in range(10)]
    assert sorted(first_epoch) == list(range(10)), "each prompt once per epoch"
    second_epoch = [sched(i) for i in range(10, 20)]
    assert sorted(second_epoch) == list(range(10)) and second_epoch != first_epoch
    assert [PromptSchedule(10, seed=3)(i) for i in (17, 2, 5)] == [sched(17), sched(2), sched(5)]
    assert [PromptSchedule(10, seed=4)(i) for i in range(10)] != first_epoch
    with pytest.raises(ValueError, match="--prompts"):
        PromptSchedule(0, seed=0)


# ---------------------------------------------------------------- atomic writes
def test_pairstore_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = str(tmp_path / "x.bin")
    store.atomic_write_bytes(path, b"old")

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(store.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        store.atomic_write_bytes(path, b"new")
    monkeypatch.undo()
    assert open(path, "rb").read() == b"old"
    assert os.listdir(tmp_path) == ["x.bin"], "temporary file left behind"


def test_pairstore_ensure_writable(tmp_path):
    assert store.ensure_writable(str(tmp_path / "new" / "deep")) == str(tmp_path / "new" / "deep")
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(NotADirectoryError, match="--out"):
        store.ensure_writable(str(f))
    with pytest.raises(PermissionError, match="--out"):
        store.ensure_writable(str(f / "below"))


# ---------------------------------------------------------------- PairDataset
def test_pairstore_dataset_items(pairstore_folder):
    ds = PairDataset(pairstore_folder, check="sha256")
    assert len(ds) == 7 and ds.latent_shape == (4, 8, 8) and ds.has_embeddings
    prompts = load_prompts(None)[:5]
    for i in (0, 3, 6, -1):
        item = ds[i]
        assert item["index"] == i % 7
        assert item["noise"].dtype == torch.float32 and item["noise"].shape == (4, 8, 8)
        assert torch.equal(item["noise"], pair_noise(1, i % 7, (4, 8, 8)))
        assert item["latent"].shape == (4, 8, 8) and torch.isfinite(item["latent"]).all()
        assert not torch.equal(item["latent"], item["noise"])
        assert item["prompt"] == prompts[PromptSchedule(5, 1)(i % 7)]
        assert item["prompt_embeds"].shape == (77, 64)
        assert item["pooled_prompt_embeds"].shape == (32,)
    with pytest.raises(IndexError, match="index"):
        ds[7]
    plain = PairDataset(pairstore_folder, load_embeddings=False)
    assert "prompt_embeds" not in plain[0]
    with pytest.raises(ValueError, match="check"):
        PairDataset(pairstore_folder, check="md5")


def test_pairstore_dataset_with_distributed_sampler_and_loader(pairstore_folder):
    from torch.utils.data import DataLoader, DistributedSampler

    ds = PairDataset(pairstore_folder)
    seen = []
    for rank in range(2):
        sampler = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=0,
                                     drop_last=True)
        seen += [ds[i]["index"] for i in sampler]
    assert len(seen) == 6 and len(set(seen)) == 6
    loader = DataLoader(ds, batch_size=4, num_workers=1, shuffle=False)
    batches = list(loader)
    assert batches[0]["latent"].shape == (4, 4, 8, 8)
    assert batches[0]["index"].tolist() == [0, 1, 2, 3]
    assert isinstance(batches[0]["prompt"], list) and isinstance(batches[0]["prompt"][0], str)


def test_pairstore_dataset_names_missing_truncated_corrupt_shards(pairstore_folder, tmp_path):
    missing = _copy_store(pairstore_folder, str(tmp_path / "missing"))
    os.unlink(os.path.join(missing, "shard-00002.safetensors"))
    with pytest.raises(StoreError, match="shard-00002.safetensors: missing"):
        PairDataset(missing)
    assert any("shard-00002.safetensors: missing" in p for p in verify_store(missing))

    truncated = _copy_store(pairstore_folder, str(tmp_path / "truncated"))
    path = os.path.join(truncated, "shard-00001.safetensors")
    os.truncate(path, os.path.getsize(path) - 10)
    with pytest.raises(StoreError, match="shard-00001.safetensors.*truncated"):
        PairDataset(truncated)

    flipped = _copy_store(pairstore_folder, str(tmp_path / "flipped"))
    path = os.path.join(flipped, "shard-00000.safetensors")
    data = bytearray(open(path, "rb").read())
    data[-3] ^= 0xFF
    open(path, "wb").write(bytes(data))
    PairDataset(flipped)  # the size check does not read the data
    with pytest.raises(StoreError, match="shard-00000.safetensors: sha256"):
        PairDataset(flipped, check="sha256")
    assert verify_store(flipped) == ["shard-00000.safetensors: sha256 mismatch (corrupted)"]

    header = _copy_store(pairstore_folder, str(tmp_path / "header"))
    path = os.path.join(header, "shard-00001.safetensors")
    data = bytearray(open(path, "rb").read())
    data[0:8] = (10**12).to_bytes(8, "little")  # an impossible header length, same file size
    open(path, "wb").write(bytes(data))
    ds = PairDataset(header)
    with pytest.raises(StoreError, match="shard-00001.safetensors"):
        ds[4]

    prompts = _copy_store(pairstore_folder, str(tmp_path / "prompts"))
    with open(os.path.join(prompts, "prompts.json"), "a") as f:
        f.write(" ")
    with pytest.raises(StoreError, match="prompts.json"):
        PairDataset(prompts)
    assert verify_store(prompts) == ["prompts.json: sha256 mismatch (corrupted or replaced)"]

    with pytest.raises(StoreError, match="no manifest.json"):
        PairDataset(str(tmp_path))


def test_pairstore_incomplete_store_is_refused(pairstore_folder, tmp_path):
    partial = _copy_store(pairstore_folder, str(tmp_path / "partial"))
    manifest = json.load(open(os.path.join(partial, "manifest.json")))
    manifest["complete"] = False
    store.atomic_write_json(os.path.join(partial, "manifest.json"), manifest)
    with pytest.raises(StoreError, match="incomplete"):
        PairDataset(partial)
    assert any("incomplete" in p for p in verify_store(partial))
