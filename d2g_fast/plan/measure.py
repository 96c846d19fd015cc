"""Measured CPU memory of the trainer's real step: the ground truth the plan is checked against.

The CPU peak (``profiler_peak_bytes``, also what ``benchmarks/harness.py`` reports):
``torch.profiler`` with ``profile_memory=True`` records every allocation and free of torch's CPU allocator, and the
peak is the largest running sum, above what was allocated when the step began. The
persistent state (weights, EMA, AdamW states, frozen networks) is counted from the run's own
tensors, each storage once.
"""
from __future__ import annotations

import torch


def profiler_peak_bytes(fn) -> int:
    """Peak bytes allocated by one call of ``fn`` above the start (CPU allocator events)."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    deltas = []

    def collect(nodes):
        for node in nodes:
            if node.tag == _EventType.Allocation:
                deltas.append((node.start_time_ns, node.extra_fields.alloc_size))
            collect(node.children)

    collect(prof.profiler.kineto_results.experimental_event_tree())
    level = peak = 0
    for _, size in sorted(deltas):
        level += size
        peak = max(peak, level)
    return peak


def _tensors_in(value, depth: int = 4):
    """Tensors inside ``value`` (a tensor, or dicts / lists / tuples of them)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif depth and isinstance(value, dict):
        for v in value.values():
            yield from _tensors_in(v, depth - 1)
    elif depth and isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors_in(v, depth - 1)


def persistent_bytes(run) -> int:
    """Bytes of every tensor a run keeps between steps, each storage once: the networks'
    parameters and buffers (G, EMA, D, E-LatentLPIPS, the teacher's), AdamW's states and
    E-LatentLPIPS's folded trunk cache."""
    seen: dict[int, int] = {}

    def add(t):
        if hasattr(t, "to_local"):  # an FSDP2 shard (DTensor): this process's part
            t = t.to_local()
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            s = t.untyped_storage()
            seen[s._cdata] = s.nbytes()

    from d2g_fast.plan.simulate import frozen_networks

    nets = [run.generator, run.ema, run.discriminator, run.lpips] + \
        frozen_networks(run.teacher)
    for net in nets:
        if net is None:
            continue
        for t in list(net.parameters()) + list(net.buffers()):
            add(t)
        for m in net.modules():
            for value in vars(m).values():  # caches held as plain attributes
                for t in _tensors_in(value):
                    add(t)
    for opt in (run.opt_g, run.opt_d):
        for state in opt.state.values():
            for t in state.values():
                add(t)
    return sum(seen.values())


def measure_step(source: str, config, batch_size: int) -> dict:
    """Build the real run of ``config`` (teacher ``source``: an architecture name or a callable
    ``source(device) -> components``, weights random)
    on the CPU, take one step (AdamW states appear), then measure an R1 step.

    Returns {"persistent": bytes, "step_peak": bytes above the start, "total": their sum}."""
    from d2g_fast.bench import archs
    from d2g_fast.plan.simulate import _teacher, synthetic_batch
    from d2g_fast.train import build_run
    from d2g_fast.train.step import train_step

    torch.manual_seed(0)
    if callable(source):
        made = source("cpu")
        teacher = _teacher(made) if isinstance(made, dict) else made
    else:
        teacher = archs.teacher(source)
    run = build_run(config, teacher=teacher, dataset=None, device="cpu",
                    guidance=teacher.default_guidance)  # a store's, were there one
    batch = synthetic_batch(run, batch_size)
    step = config.r1_interval
    train_step(run, batch, step + 1)
    peak = profiler_peak_bytes(lambda: train_step(run, batch, step))
    kept = persistent_bytes(run)
    return {"persistent": kept, "step_peak": peak, "total": kept + peak}
