"""Model-state memory per GPU of a distillation run, with and without FSDP, from parameter counts.

The networks are built on the meta device from the architecture's published configs
(:func:`d2g_fast.bench.archs.meta_networks`: shapes only, no weights, no device memory), and G
and D exactly as the trainer builds them (D: the family's ``discriminator_class().build``, as
``make_discriminator`` builds it, so frozen parts such as a transformer's unused output layers
are counted as frozen). Bytes per parameter of what the trainer holds on every device
(``d2g distill``: fp32 weights, bf16 only inside autocast):

    G (trainable)   fp32 weights 4 + fp32 gradients 4 + AdamW exp_avg and exp_avg_sq 8 + EMA 4 = 20
    D (trainable)   4 + 4 + 8 = 16;  D (frozen) 4
    teacher         its network and text encoders, fp32 (4), loaded by the trainer and kept on
                    the device for live prompt encoding

Replicated training holds all of it on every GPU; FSDP2 (``--fsdp``) shards G, its EMA, D and
both optimisers' states over the N processes (the teacher stays whole). Activations are not
included: they depend on batch, resolution and gradient checkpointing, and are measured on a GPU
by the training rows (``train.*.peak_mem``).
"""
from __future__ import annotations

GIB = 2.0 ** 30
G_BYTES = 4 + 4 + 8 + 4      # weights, gradients, AdamW moments, EMA
D_BYTES = 4 + 4 + 8          # weights, gradients, AdamW moments
FROZEN_BYTES = 4             # fp32 weights only
FSDP_WORLDS = (8, 64)        # the processes of the FSDP rows (64: the paper's A100 count)


def parameter_counts(arch: str) -> dict[str, int]:
    """Parameters of G, D (trainable / frozen), the teacher's network and text encoders."""
    from d2g_fast.bench import archs
    from d2g_fast.teacher.families import family_for_pipeline_class

    nets = archs.meta_networks(arch)
    net = nets["denoiser"]
    family = family_for_pipeline_class(archs.pipeline_class(arch).__name__)
    d = family.discriminator_class().build(net)  # the trainer's builder, default D options

    def count(module, trainable=None):
        return sum(p.numel() for p in module.parameters()
                   if trainable is None or p.requires_grad == trainable)

    return {"generator": count(net), "discriminator_trainable": count(d, True),
            "discriminator_frozen": count(d, False), "teacher_network": count(net),
            "text_encoders": sum(count(m) for m in nets["text_encoders"])}


def memory_rows(arch: str, row_cls) -> list:
    """Rows: the parameter counts (measured: counted on the meta-device networks) and the
    model-state GiB per GPU replicated and under FSDP over each of :data:`FSDP_WORLDS`
    (derived)."""
    from d2g_fast.bench import archs

    n = parameter_counts(arch)
    where = (f"counted on the meta-device network built from {archs.ARCH_INFO[arch].description}'s "
             f"config (no weights)")
    names = {"generator": "G (trainable copy of the teacher's network)",
             "discriminator_trainable": "D, trainable", "discriminator_frozen": "D, frozen",
             "teacher_network": "teacher network (frozen)",
             "text_encoders": "teacher text encoders (frozen)"}
    rows = [row_cls(f"memory.params.{k}", "memory", f"parameters: {names[k]}", n[k] / 1e6,
                    "M params", "measured", where) for k in names]
    sharded = G_BYTES * n["generator"] + D_BYTES * n["discriminator_trainable"] + \
        FROZEN_BYTES * n["discriminator_frozen"]
    whole = FROZEN_BYTES * (n["teacher_network"] + n["text_encoders"])
    formula = (f"{G_BYTES} B x memory.params.generator + {D_BYTES} B x "
               f"memory.params.discriminator_trainable + {FROZEN_BYTES} B x "
               f"(memory.params.discriminator_frozen")
    teacher = (f"{FROZEN_BYTES} B x (memory.params.teacher_network + "
               f"memory.params.text_encoders)")
    rows.append(row_cls(
        "memory.replicated", "memory", "model state per GPU, replicated (every process holds "
        "G, EMA, D, AdamW states, teacher)", (sharded + whole) / GIB, "GiB", "derived",
        f"{formula}) + {teacher}; activations not included"))
    for world in FSDP_WORLDS:
        rows.append(row_cls(
            f"memory.fsdp{world}", "memory", f"model state per GPU, FSDP2 over {world} GPUs "
            f"(G, EMA, D and AdamW states sharded; teacher whole)",
            (sharded / world + whole) / GIB, "GiB", "derived",
            f"({formula})) / {world} + {teacher}; activations not included"))
    return rows
