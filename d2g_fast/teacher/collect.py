"""ODE-pair collection: run the teacher on (noise, prompt) and store (noise, prompt, latent).

Deterministic by pair index (see :mod:`d2g_fast.data.seeding`), resumable (a shard counts as done
once its receipt is on disk; a rerun of the same command does the rest), sharded between
processes (``torchrun``: shard k goes to the k-th pending shard's rank), and checksummed.
"""
from __future__ import annotations

import copy
import datetime
import json
import os
import platform
import time
import warnings
from dataclasses import dataclass

import torch

from d2g_fast.data import store as st
from d2g_fast.data.seeding import NOISE_RULE, PROMPT_RULE, PromptSchedule, batch_noise, derive_seed
from d2g_fast.teacher.adapter import Teacher, _clean_config


@dataclass
class Dist:
    """This process's place among the collecting processes (1 process when not distributed)."""
    rank: int = 0
    world: int = 1

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


def init_distributed(device: str) -> tuple[Dist, str]:
    """Join the process group when started by ``torchrun`` (WORLD_SIZE > 1): gloo on CPUs,
    NCCL on GPUs, each rank on ``cuda:LOCAL_RANK``. Returns (Dist, device of this rank)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        # Ranks wait for each other only at the start and the end; a long timeout lets the
        # slowest rank finish its last shard.
        torch.distributed.init_process_group(
            backend="nccl" if device.startswith("cuda") else "gloo",
            timeout=datetime.timedelta(hours=24))
    return Dist(rank, world), device


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def collection_config(teacher: Teacher, prompts: list[str], *, steps: int, guidance: float,
                      scheduler: str | None, negative_prompt: str | None, batch_size: int,
                      shard_size: int, seed: int, store_embeddings: bool) -> dict:
    """Everything that determines the stored pairs. A store folder refuses to continue with a
    different one. (The number of pairs is not part of it: it may grow between runs.)"""
    sched = teacher.make_scheduler(scheduler)
    ident = teacher.identity()
    return {
        "teacher_sha256": ident["sha256"],
        "teacher_kind": ident["kind"],
        "latent_shape": list(teacher.latent_shape),
        "resolution": [teacher.height, teacher.width],
        "scheduler": type(sched).__name__,
        "scheduler_config": json.loads(json.dumps(_clean_config(sched.config), default=str)),
        "steps": int(steps),
        "guidance": float(guidance),
        "negative_prompt": negative_prompt,
        "seed": int(seed),
        "shard_size": int(shard_size),
        # Batch composition changes the rounding of batched kernels, so it is part of the
        # recipe for bit-exact resumption.
        "batch_size": int(batch_size),
        "dtype": str(teacher.dtype).replace("torch.", ""),
        "store_embeddings": bool(store_embeddings),
        "prompts_sha256": st.sha256_bytes(st.canonical_json(prompts)),
        "num_prompts": len(prompts),
        "noise_rule": NOISE_RULE,
        "prompt_rule": PROMPT_RULE,
    }


def _check_arguments(num_pairs, steps, batch_size, shard_size, guidance):
    for name, flag, value in (("num_pairs", "--num-pairs", num_pairs), ("steps", "--steps", steps),
                              ("batch_size", "--batch-size", batch_size),
                              ("shard_size", "--shard-size", shard_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} ({flag}): must be a positive integer, got {value!r}")
    if not guidance == guidance or guidance < 0:  # NaN or negative
        raise ValueError(f"guidance (--guidance): must be >= 0, got {guidance!r}")


def _prepare_store(out: str, config: dict, config_hash: str, prompts: list[str], teacher: Teacher,
                   num_pairs: int, prompt_source: str | None) -> None:
    """Rank 0: validate or initialise the folder (config check, prompt list, first manifest)."""
    manifest_path = os.path.join(out, st.MANIFEST)
    if os.path.exists(manifest_path):
        old = st.read_manifest(out)
        if old.get("config_hash") != config_hash:
            raise st.ConfigMismatchError(
                f"out (--out): {out!r} holds pairs made with a different configuration ("
                f"{st.describe_mismatch(old.get('config', {}), config)}). Rerun with the "
                f"original settings to resume, or choose a new --out folder.")
    st.remove_stale_temporaries(out)
    prompts_path = os.path.join(out, st.PROMPTS)
    prompts_bytes = st.canonical_json({"prompts": prompts})
    if not os.path.isfile(prompts_path) or \
            st.sha256_file(prompts_path) != st.sha256_bytes(prompts_bytes):
        st.atomic_write_bytes(prompts_path, prompts_bytes)
    _write_manifest(out, config, config_hash, teacher, num_pairs, prompt_source,
                    st.sha256_bytes(prompts_bytes), final=False)


def _write_manifest(out, config, config_hash, teacher, num_pairs, prompt_source, prompts_sha,
                    final: bool) -> dict:
    plan = st.plan_shards(num_pairs, config["shard_size"])
    receipts = [st.read_receipt(out, k, start, count, config_hash) for k, start, count in plan]
    done = [r for r in receipts if r is not None]
    complete = len(done) == len(plan)
    if final and not complete:
        missing = [st.shard_file(k) for (k, _, _), r in zip(plan, receipts) if r is None]
        raise st.StoreError(f"out: shards {missing[:8]} are missing after every rank finished")
    ident = dict(teacher.identity())
    c, h, w = config["latent_shape"]
    tensors = {"noise": {"dtype": "float32", "shape": ["n", c, h, w]},
               "latent": {"dtype": "float32", "shape": ["n", c, h, w]},
               "index": {"dtype": "int64", "shape": ["n"]},
               "prompt_index": {"dtype": "int64", "shape": ["n"]}}
    if config["store_embeddings"]:
        tensors["prompt_embeds"] = {"dtype": config["dtype"], "shape": ["n", "L", "D"]}
        if config["teacher_kind"] == "sdxl":
            tensors["pooled_prompt_embeds"] = {"dtype": config["dtype"], "shape": ["n", "P"]}
    seconds = sum(r["device_seconds"] for r in done)
    pairs_done = sum(r["count"] for r in done)
    manifest = {
        "format": st.FORMAT, "version": st.VERSION, "complete": complete,
        "num_pairs": num_pairs, "num_shards": len(plan), "pairs_done": pairs_done,
        "config": config, "config_hash": config_hash, "teacher": ident,
        "prompts": {"file": st.PROMPTS, "count": config["num_prompts"], "sha256": prompts_sha,
                    "source": os.path.abspath(prompt_source) if prompt_source
                    and os.path.exists(prompt_source) else prompt_source or "bundled"},
        "tensors": tensors,
        "shards": [{k: r[k] for k in ("file", "shard", "start", "count", "bytes", "sha256")}
                   for r in done],
        # Everything under "cost" depends on the machine and the run; the rest is deterministic.
        "cost": {
            "devices": sorted({r["device"] for r in done}),
            "device_seconds": seconds,
            "pairs_per_device_second": pairs_done / seconds if seconds > 0 else None,
            "device_days_per_million_pairs":
                seconds / max(pairs_done, 1) * 1e6 / 86400 if pairs_done else None,
            "shard_seconds": {r["file"]: r["device_seconds"] for r in done},
        },
    }
    st.atomic_write_json(os.path.join(out, st.MANIFEST), manifest)
    return manifest


def _serialize_shard(tensors: dict, metadata: dict) -> bytes:
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)


def collect(teacher: Teacher, prompts: list[str], out: str, num_pairs: int, *, steps: int = 50,
            guidance: float = 8.0, scheduler: str | None = "ddim",
            negative_prompt: str | None = None, batch_size: int = 8, shard_size: int = 1000,
            seed: int = 0, store_embeddings: bool = False, prompt_source: str | None = None,
            dist: Dist | None = None, progress: bool = True, log=print) -> dict | None:
    """Collect ``num_pairs`` ODE pairs into the store folder ``out`` (created if needed) and
    return the final manifest (on rank 0; None on the other ranks).

    Rerunning with the same arguments resumes: finished shards are kept, the rest are made.
    The same folder with a different configuration raises ``ConfigMismatchError``. Latents with
    NaN/Inf raise ``NonFiniteLatentError`` and are never stored."""
    dist = dist or Dist()
    _check_arguments(num_pairs, steps, batch_size, shard_size, guidance)
    if not prompts:
        raise ValueError("prompts (--prompts): the prompt list is empty")
    out = st.ensure_writable(out)
    config = collection_config(teacher, prompts, steps=steps, guidance=guidance,
                               scheduler=scheduler, negative_prompt=negative_prompt,
                               batch_size=batch_size, shard_size=shard_size, seed=seed,
                               store_embeddings=store_embeddings)
    config_hash = st.sha256_bytes(st.canonical_json(config))
    if dist.rank == 0:
        teacher.warn_if_stochastic(scheduler)
        truncated = teacher.count_truncated(prompts)
        if truncated:
            warnings.warn(
                f"prompts (--prompts): {truncated} of {len(prompts)} prompts are longer than the "
                f"tokenizer limit of {teacher.max_prompt_tokens()} tokens and are truncated to "
                f"it (as the diffusers pipelines do)", UserWarning, stacklevel=2)
        _prepare_store(out, config, config_hash, prompts, teacher, num_pairs, prompt_source)
    dist.barrier()  # the folder is validated before anyone looks at it
    plan = st.plan_shards(num_pairs, shard_size)
    pending = [s for s in plan if st.read_receipt(out, *s, config_hash) is None]
    dist.barrier()  # everyone has the same view of what is pending before anyone writes
    mine = pending[dist.rank::dist.world]
    if dist.rank == 0:
        log(f"d2g collect: {num_pairs} pairs in {len(plan)} shards, {len(plan) - len(pending)} "
            f"done, {len(pending)} to make on {dist.world} process(es); out={out}")

    from tqdm.auto import tqdm

    schedule = PromptSchedule(len(prompts), seed)
    base_scheduler = teacher.make_scheduler(scheduler)
    device = teacher.device
    name = device_name(device)
    bar = tqdm(total=sum(c for _, _, c in mine), unit="pair", dynamic_ncols=True,
               disable=not progress or dist.rank != 0, desc="collect")
    for k, start, count in mine:
        _sync(device)
        t0 = time.perf_counter()
        indices = list(range(start, start + count))
        prompt_idx = schedule.indices(indices)
        noise = batch_noise(seed, indices, teacher.latent_shape)
        latents, embeds, pooled = [], [], []
        for b in range(0, count, batch_size):
            rows = slice(b, b + batch_size)
            texts = [prompts[j] for j in prompt_idx[rows]]
            guided = guidance > 1.0
            cond = teacher.encode_prompts(texts, negative_prompt, guided)
            # Stochastic schedulers draw from a generator seeded by the batch's first pair.
            gen = torch.Generator(device=device).manual_seed(
                derive_seed(seed, start + b, "sampler"))
            lat = teacher.sample(noise[rows], texts, steps=steps, guidance=guidance,
                                 scheduler=copy.deepcopy(base_scheduler), generator=gen,
                                 conditioning=cond)
            latents.append(lat.cpu())
            if store_embeddings:
                embeds.append(cond.prompt_embeds.cpu())
                if cond.pooled_prompt_embeds is not None:
                    pooled.append(cond.pooled_prompt_embeds.cpu())
            bar.update(lat.shape[0])
        tensors = {"noise": noise, "latent": torch.cat(latents),
                   "index": torch.tensor(indices, dtype=torch.int64),
                   "prompt_index": torch.tensor(prompt_idx, dtype=torch.int64)}
        if embeds:
            tensors["prompt_embeds"] = torch.cat(embeds)
        if pooled:
            tensors["pooled_prompt_embeds"] = torch.cat(pooled)
        # One metadata entry: safetensors writes a map of several in a per-process random
        # order, which would make identical shards differ byte-wise.
        data = _serialize_shard(tensors, {"d2g_fast": st.canonical_json(
            {"format": st.FORMAT, "shard": k, "start": start, "count": count,
             "config_hash": config_hash}).decode()})
        _sync(device)
        seconds = time.perf_counter() - t0
        st.atomic_write_bytes(os.path.join(out, st.shard_file(k)), data)
        st.atomic_write_json(os.path.join(out, st.receipt_file(k)), {
            "file": st.shard_file(k), "shard": k, "start": start, "count": count,
            "bytes": len(data), "sha256": st.sha256_bytes(data), "config_hash": config_hash,
            "device": name, "device_seconds": seconds, "rank": dist.rank})
    bar.close()
    dist.barrier()  # every shard is on disk
    if dist.rank != 0:
        return None
    manifest = _write_manifest(out, config, config_hash, teacher, num_pairs, prompt_source,
                               st.sha256_bytes(st.canonical_json({"prompts": prompts})),
                               final=True)
    cost = manifest["cost"]
    if cost["device_seconds"]:
        log(f"d2g collect: done, {manifest['pairs_done']} pairs, {cost['device_seconds']:.1f} "
            f"device-seconds ({cost['pairs_per_device_second']:.3g} pairs/s per device, "
            f"{cost['device_days_per_million_pairs']:.3g} device-days per million pairs)")
    return manifest


@torch.no_grad()
def recompute_pairs(teacher: Teacher, root: str, indices: list[int], *, atol: float | None = None,
                    batch_size: int | None = None) -> list[dict]:
    """Re-run the teacher on stored pairs and compare. For each pair: whether the stored noise
    and prompt index equal the ones the seed gives (exactly), and the largest latent difference
    (pairs are recomputed in new batches, so rounding may differ slightly). Returns one dict per
    pair with ``ok``."""
    from d2g_fast.data.dataset import PairDataset

    ds = PairDataset(root, check="none", load_embeddings=False)
    config = ds.manifest["config"]
    ident = teacher.identity()
    if ident["sha256"] != config["teacher_sha256"]:
        raise ValueError(f"teacher (--teacher): its identity {ident['sha256'][:16]} differs from "
                         f"the store's teacher {config['teacher_sha256'][:16]} (other weights, "
                         f"configs or --dtype)")
    if atol is None:
        atol = 1e-3 if config["dtype"] == "float32" else 5e-2
    schedule = PromptSchedule(config["num_prompts"], config["seed"])
    sched_cls = type(teacher.make_scheduler(config["scheduler"]))
    base = sched_cls.from_config(config["scheduler_config"])
    results = []
    batch_size = batch_size or config["batch_size"]
    for b in range(0, len(indices), batch_size):
        items = [ds[i] for i in indices[b:b + batch_size]]
        noise = batch_noise(config["seed"], [it["index"] for it in items], config["latent_shape"])
        texts = [it["prompt"] for it in items]
        lat = teacher.sample(noise, texts, steps=config["steps"], guidance=config["guidance"],
                             scheduler=copy.deepcopy(base),
                             negative_prompt=config["negative_prompt"]).cpu()
        for row, it in enumerate(items):
            err = float((lat[row] - it["latent"]).abs().max())
            scale = float(it["latent"].abs().max())
            noise_ok = torch.equal(noise[row], it["noise"])
            prompt_ok = schedule(it["index"]) == it["prompt_index"]
            results.append({"index": it["index"], "noise_ok": noise_ok, "prompt_ok": prompt_ok,
                            "max_abs_err": err, "tolerance": atol * max(1.0, scale),
                            "ok": noise_ok and prompt_ok and err <= atol * max(1.0, scale)})
    return results
