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
import time
import warnings
from dataclasses import dataclass

import torch

from d2g_fast.bench.machine import device_name
from d2g_fast.data import store
from d2g_fast.data.seeding import (GUIDANCE_RULE, NOISE_RULE, PROMPT_RULE, GuidanceSchedule,
                                   PromptSchedule, batch_noise, derive_seed, guidance_set)
from d2g_fast.runtime.signals import Preempted, requested_on_any_rank, resume_line
from d2g_fast.runtime.signals import requested as preemption_requested
from d2g_fast.teacher.families import TeacherFamily as Teacher
from d2g_fast.teacher.families import clean_config, family_class


@dataclass
class ProcessGroup:
    """This process's place among the collecting processes (1 process when not distributed)."""
    rank: int = 0
    world: int = 1

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


def init_distributed(device: str) -> tuple[ProcessGroup, str]:
    """Join the process group when started by ``torchrun`` (WORLD_SIZE > 1): gloo on CPUs,
    NCCL on GPUs, each rank on ``cuda:LOCAL_RANK``. Returns (ProcessGroup, device of this rank)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return ProcessGroup(), device
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
    return ProcessGroup(rank, world), device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def collection_config(teacher: Teacher, prompts: list[str], *, steps: int, guidance: float,
                      scheduler: str | None, negative_prompt: str | None, batch_size: int,
                      shard_size: int, seed: int, store_embeddings: bool,
                      guidances: dict | None = None) -> dict:
    """Everything that determines the stored pairs. A store folder refuses to continue with a
    different one. (The number of pairs is not part of it: it may grow between runs.)
    ``guidances``: the guidance set of a multi-guidance collection (``seeding.guidance_set``;
    then ``guidance`` is None); a single-guidance configuration is the same as before."""
    sched = teacher.make_scheduler(scheduler)
    ident = teacher.identity()
    config = {
        "teacher_sha256": ident["sha256"],
        "teacher_kind": ident["kind"],
        "latent_shape": list(teacher.latent_shape),
        "resolution": [teacher.height, teacher.width],
        "scheduler": type(sched).__name__,
        "scheduler_config": json.loads(json.dumps(clean_config(sched.config), default=str)),
        "steps": int(steps),
        "guidance": None if guidances else float(guidance),
        "negative_prompt": negative_prompt,
        "seed": int(seed),
        "shard_size": int(shard_size),
        # Batch composition changes the rounding of batched kernels, so it is part of the
        # recipe for bit-exact resumption.
        "batch_size": int(batch_size),
        "dtype": str(teacher.dtype).replace("torch.", ""),
        "store_embeddings": bool(store_embeddings),
        "prompts_sha256": store.sha256_bytes(store.canonical_json(prompts)),
        "num_prompts": len(prompts),
        "noise_rule": NOISE_RULE,
        "prompt_rule": PROMPT_RULE,
    }
    if guidances:
        config.update(guidance_set=guidances, guidance_rule=GUIDANCE_RULE)
    return config


def pair_guidances(config: dict, indices) -> torch.Tensor:
    """The guidance scale of each pair (float32 [len(indices)]): the fixed one, or drawn from
    the guidance set by (seed, index)."""
    if config.get("guidance_set"):
        return GuidanceSchedule(config["guidance_set"], config["seed"]).values(indices)
    return torch.full([len(indices)], config["guidance"], dtype=torch.float32)


@dataclass(frozen=True)
class StoreRun:
    """One collection into one store folder: what the manifest and the shards are made from."""
    out: str            # the store folder
    config: dict        # collection_config(...)
    config_hash: str    # sha256 of its canonical JSON
    num_pairs: int
    prompts: list[str]
    prompt_source: str | None  # the --prompts argument (None: the bundled list)

    @property
    def prompts_bytes(self) -> bytes:
        return store.canonical_json({"prompts": self.prompts})

    def plan(self) -> list[tuple[int, int, int]]:
        """(shard, start, count) of every shard."""
        return store.plan_shards(self.num_pairs, self.config["shard_size"])


def _check_arguments(prompts, num_pairs, steps, batch_size, shard_size, guidance, guidances):
    for name, flag, value in (("num_pairs", "--num-pairs", num_pairs), ("steps", "--steps", steps),
                              ("batch_size", "--batch-size", batch_size),
                              ("shard_size", "--shard-size", shard_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} ({flag}): must be a positive integer, got {value!r}")
    if guidances is None and (not guidance == guidance or guidance < 0):  # NaN or negative
        raise ValueError(f"guidance (--guidance): must be >= 0, got {guidance!r}")
    if not prompts:
        raise ValueError("prompts (--prompts): the prompt list is empty")


def _warn_about_inputs(teacher: Teacher, prompts: list[str], scheduler: str | None) -> None:
    teacher.warn_if_stochastic(scheduler)
    truncated = teacher.count_truncated(prompts)
    if truncated:
        warnings.warn(
            f"prompts (--prompts): {truncated} of {len(prompts)} prompts are longer than the "
            f"tokenizer limit of {teacher.max_prompt_tokens()} tokens and are truncated to "
            f"it (as the diffusers pipelines do)", UserWarning, stacklevel=3)


def _prepare_store(run: StoreRun, teacher: Teacher) -> None:
    """Rank 0: validate or initialise the folder (config check, prompt list, first manifest)."""
    if os.path.exists(os.path.join(run.out, store.MANIFEST)):
        old = store.read_manifest(run.out)
        if old.get("config_hash") != run.config_hash:
            raise store.ConfigMismatchError(
                f"out (--out): {run.out!r} holds pairs made with a different configuration ("
                f"{store.describe_mismatch(old.get('config', {}), run.config)}). Rerun with the "
                f"original settings to resume, or choose a new --out folder.")
    store.remove_stale_temporaries(run.out)
    prompts_path = os.path.join(run.out, store.PROMPTS)
    if not os.path.isfile(prompts_path) or \
            store.sha256_file(prompts_path) != store.sha256_bytes(run.prompts_bytes):
        store.atomic_write_bytes(prompts_path, run.prompts_bytes)
    _write_manifest(run, teacher.identity(), final=False)


def _tensor_layout(config: dict) -> dict:
    """The manifest's description of the tensors in every shard."""
    c, h, w = config["latent_shape"]
    tensors = {"noise": {"dtype": "float32", "shape": ["n", c, h, w]},
               "latent": {"dtype": "float32", "shape": ["n", c, h, w]},
               "index": {"dtype": "int64", "shape": ["n"]},
               "prompt_index": {"dtype": "int64", "shape": ["n"]},
               "guidance": {"dtype": "float32", "shape": ["n"]}}
    family = family_class(config["teacher_kind"])
    if family.latent_note:
        tensors["latent"]["layout"] = tensors["noise"]["layout"] = family.latent_note
    if config["store_embeddings"]:
        tensors["prompt_embeds"] = {"dtype": config["dtype"], "shape": ["n", "L", "D"]}
        if family.stores_pooled:
            tensors["pooled_prompt_embeds"] = {"dtype": config["dtype"], "shape": ["n", "P"]}
    return tensors


def _prompts_entry(run: StoreRun) -> dict:
    source = run.prompt_source
    return {"file": store.PROMPTS, "count": run.config["num_prompts"],
            "sha256": store.sha256_bytes(run.prompts_bytes),
            "source": os.path.abspath(source) if source and os.path.exists(source)
            else source or "bundled"}


def _cost(receipts: list[dict]) -> dict:
    """Machine- and run-dependent figures (everything else in the manifest is deterministic)."""
    seconds = sum(r["device_seconds"] for r in receipts)
    pairs_done = sum(r["count"] for r in receipts)
    return {
        "devices": sorted({r["device"] for r in receipts}),
        "device_seconds": seconds,
        "pairs_per_device_second": pairs_done / seconds if seconds > 0 else None,
        "device_days_per_million_pairs":
            seconds / max(pairs_done, 1) * 1e6 / 86400 if pairs_done else None,
        "shard_seconds": {r["file"]: r["device_seconds"] for r in receipts},
    }


def _write_manifest(run: StoreRun, teacher_identity: dict, *, final: bool) -> dict:
    """Write the manifest from the receipts on disk; ``final`` (after every rank finished)
    requires every shard. Returns the manifest."""
    plan = run.plan()
    receipts = [store.read_receipt(run.out, k, start, count, run.config_hash)
                for k, start, count in plan]
    done = [r for r in receipts if r is not None]
    complete = len(done) == len(plan)
    if final and not complete:
        missing = [store.shard_file(k) for (k, _, _), r in zip(plan, receipts) if r is None]
        raise store.StoreError(f"out: shards {missing[:8]} are missing after every rank finished")
    manifest = {
        "format": store.FORMAT, "version": store.VERSION, "complete": complete,
        "num_pairs": run.num_pairs, "num_shards": len(plan),
        "pairs_done": sum(r["count"] for r in done),
        "config": run.config, "config_hash": run.config_hash, "teacher": dict(teacher_identity),
        "prompts": _prompts_entry(run),
        "tensors": _tensor_layout(run.config),
        "shards": [{k: r[k] for k in ("file", "shard", "start", "count", "bytes", "sha256")}
                   for r in done],
        "cost": _cost(done),
    }
    store.atomic_write_json(os.path.join(run.out, store.MANIFEST), manifest)
    return manifest


def _serialize_shard(tensors: dict, metadata: dict) -> bytes:
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)


def _pending_shards(run: StoreRun) -> list[tuple[int, int, int]]:
    """The shards without a receipt, in plan order."""
    return [s for s in run.plan() if store.read_receipt(run.out, *s, run.config_hash) is None]


def guidance_groups(guidances: torch.Tensor, rows: range) -> list[list[int]]:
    """The network batches of the rows ``rows``: one per distinct guidance scale, in order of
    first appearance (one batch when the scale is fixed, as before)."""
    groups: dict[float, list[int]] = {}
    for r in rows:
        groups.setdefault(float(guidances[r]), []).append(r)
    return list(groups.values())


def _sample_shard(teacher: Teacher, run: StoreRun, start: int, count: int, base_scheduler,
                  on_batch) -> dict:
    """The tensors of one shard: noise, the teacher's latents, indices, guidance scales (and
    embeddings). A batch mixing guidance scales runs one network batch per scale."""
    config = run.config
    seed, batch_size = config["seed"], config["batch_size"]
    indices = list(range(start, start + count))
    prompt_idx = PromptSchedule(len(run.prompts), seed).indices(indices)
    noise = batch_noise(seed, indices, teacher.latent_shape)
    guidances = pair_guidances(config, indices)
    latents, embeds, pooled = [None] * count, [None] * count, [None] * count
    for b in range(0, count, batch_size):
        for rows in guidance_groups(guidances, range(b, min(b + batch_size, count))):
            guidance = float(guidances[rows[0]])
            texts = [run.prompts[prompt_idx[r]] for r in rows]
            cond = teacher.encode_prompts(texts, config["negative_prompt"], guidance > 1.0)
            # Stochastic schedulers draw from a generator seeded by the batch's first pair.
            gen = torch.Generator(device=teacher.device).manual_seed(
                derive_seed(seed, start + rows[0], "sampler"))
            lat = teacher.sample(noise[rows], texts, steps=config["steps"], guidance=guidance,
                                 scheduler=copy.deepcopy(base_scheduler), generator=gen,
                                 conditioning=cond).cpu()
            for j, r in enumerate(rows):
                latents[r] = lat[j]
                if config["store_embeddings"]:
                    embeds[r] = cond.prompt_embeds[j].cpu()
                    if cond.pooled_prompt_embeds is not None:
                        pooled[r] = cond.pooled_prompt_embeds[j].cpu()
            on_batch(lat.shape[0])
    tensors = {"noise": noise, "latent": torch.stack(latents),
               "index": torch.tensor(indices, dtype=torch.int64),
               "prompt_index": torch.tensor(prompt_idx, dtype=torch.int64),
               "guidance": guidances}
    if embeds[0] is not None:
        tensors["prompt_embeds"] = torch.stack(embeds)
    if pooled[0] is not None:
        tensors["pooled_prompt_embeds"] = torch.stack(pooled)
    return tensors


def _write_shard(run: StoreRun, k: int, start: int, count: int, data: bytes, *, device: str,
                 seconds: float, rank: int) -> None:
    """The shard file, then its receipt (a shard counts as done once its receipt exists)."""
    store.atomic_write_bytes(os.path.join(run.out, store.shard_file(k)), data)
    store.atomic_write_json(os.path.join(run.out, store.receipt_file(k)), {
        "file": store.shard_file(k), "shard": k, "start": start, "count": count,
        "bytes": len(data), "sha256": store.sha256_bytes(data), "config_hash": run.config_hash,
        "device": device, "device_seconds": seconds, "rank": rank})


def _make_shards(teacher: Teacher, run: StoreRun, mine: list, scheduler: str | None,
                 group: ProcessGroup, progress: bool) -> None:
    """Sample, serialise and write this rank's shards, timing each on the device."""
    from tqdm.auto import tqdm

    base_scheduler = teacher.make_scheduler(scheduler)
    device = teacher.device
    name = device_name(device)
    bar = tqdm(total=sum(c for _, _, c in mine), unit="pair", dynamic_ncols=True,
               disable=not progress or group.rank != 0, desc="collect")
    for k, start, count in mine:
        if preemption_requested():  # stop between shards: the ones on disk are kept
            break
        _sync(device)
        t0 = time.perf_counter()
        tensors = _sample_shard(teacher, run, start, count, base_scheduler, bar.update)
        # One metadata entry: safetensors writes a map of several in a per-process random
        # order, which would make identical shards differ byte-wise.
        data = _serialize_shard(tensors, {"d2g_fast": store.canonical_json(
            {"format": store.FORMAT, "shard": k, "start": start, "count": count,
             "config_hash": run.config_hash}).decode()})
        _sync(device)
        _write_shard(run, k, start, count, data, device=name,
                     seconds=time.perf_counter() - t0, rank=group.rank)
    bar.close()


def _log_cost(manifest: dict, log) -> None:
    cost = manifest["cost"]
    if cost["device_seconds"]:
        log(f"d2g collect: done, {manifest['pairs_done']} pairs, {cost['device_seconds']:.1f} "
            f"device-seconds ({cost['pairs_per_device_second']:.3g} pairs/s per device, "
            f"{cost['device_days_per_million_pairs']:.3g} device-days per million pairs)")


def collect(teacher: Teacher, prompts: list[str], out: str, num_pairs: int, *, steps: int = 50,
            guidance: float | list[float] = 8.0, guidance_range: tuple | None = None,
            scheduler: str | None = None,
            negative_prompt: str | None = None, batch_size: int = 8, shard_size: int = 1000,
            seed: int = 0, store_embeddings: bool = False, prompt_source: str | None = None,
            group: ProcessGroup | None = None, progress: bool = True,
            log=print) -> dict | None:
    """Collect ``num_pairs`` ODE pairs into the store folder ``out`` (created if needed) and
    return the final manifest (on rank 0; None on the other ranks).

    ``group`` is this process's place among the collecting processes (``init_distributed``);
    None means a single process. Rerunning with the same arguments resumes: finished shards are
    kept, the rest are made. The same folder with a different configuration raises
    ``ConfigMismatchError``. Latents with NaN/Inf raise ``NonFiniteLatentError`` and are never
    stored.

    ``guidance``: one scale, or a list of scales; ``guidance_range``: (low, high), uniform. With
    several scales pair i's scale is drawn by (seed, i) (``seeding.GuidanceSchedule``) and
    stored per pair; the set is recorded in the manifest's config (``guidance_set``)."""
    group = group or ProcessGroup()
    guidances = guidance_set(guidance, guidance_range)
    if guidances is None and not isinstance(guidance, (int, float)):
        guidance = float(guidance[0])  # a list of one scale (repeated)
    _check_arguments(prompts, num_pairs, steps, batch_size, shard_size, guidance, guidances)
    teacher.check_sample_options(negative_prompt)
    out = store.ensure_writable(out)
    config = collection_config(teacher, prompts, steps=steps, guidance=guidance,
                               scheduler=scheduler, negative_prompt=negative_prompt,
                               batch_size=batch_size, shard_size=shard_size, seed=seed,
                               store_embeddings=store_embeddings, guidances=guidances)
    run = StoreRun(out=out, config=config,
                   config_hash=store.sha256_bytes(store.canonical_json(config)),
                   num_pairs=num_pairs, prompts=list(prompts), prompt_source=prompt_source)
    if group.rank == 0:
        _warn_about_inputs(teacher, prompts, scheduler)
        _prepare_store(run, teacher)
    group.barrier()  # the folder is validated before anyone looks at it
    pending = _pending_shards(run)
    group.barrier()  # everyone has the same view of what is pending before anyone writes
    mine = pending[group.rank::group.world]
    if group.rank == 0:
        log(f"d2g collect: {num_pairs} pairs in {len(run.plan())} shards, "
            f"{len(run.plan()) - len(pending)} done, {len(pending)} to make on {group.world} "
            f"process(es); out={out}")
    _make_shards(teacher, run, mine, scheduler, group, progress)
    if requested_on_any_rank():  # collective: every rank asks once, after its shards
        if group.rank == 0:
            _write_manifest(run, teacher.identity(), final=False)
        raise Preempted(resume_line("d2g collect", f"the finished shards are in {out}")
                        if group.rank == 0 else "")
    group.barrier()  # every shard is on disk
    if group.rank != 0:
        return None
    manifest = _write_manifest(run, teacher.identity(), final=True)
    _log_cost(manifest, log)
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
    if ident["kind"] != config["teacher_kind"]:
        raise ValueError(f"teacher (--teacher): the store holds {config['teacher_kind']} pairs; "
                         f"the teacher is a {ident['kind']} teacher")
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
        guidances = pair_guidances(config, [it["index"] for it in items])
        lat = torch.empty(noise.shape)
        for rows in guidance_groups(guidances, range(len(items))):
            lat[rows] = teacher.sample(noise[rows], [items[r]["prompt"] for r in rows],
                                       steps=config["steps"],
                                       guidance=float(guidances[rows[0]]),
                                       scheduler=copy.deepcopy(base),
                                       negative_prompt=config["negative_prompt"]).cpu()
        for row, it in enumerate(items):
            err = float((lat[row] - it["latent"]).abs().max())
            scale = float(it["latent"].abs().max())
            noise_ok = torch.equal(noise[row], it["noise"])
            prompt_ok = schedule(it["index"]) == it["prompt_index"]
            guidance_ok = float(guidances[row]) == float(it["guidance"])
            results.append({"index": it["index"], "noise_ok": noise_ok, "prompt_ok": prompt_ok,
                            "guidance_ok": guidance_ok, "guidance": float(guidances[row]),
                            "max_abs_err": err, "tolerance": atol * max(1.0, scale),
                            "ok": noise_ok and prompt_ok and guidance_ok
                            and err <= atol * max(1.0, scale)})
    return results
