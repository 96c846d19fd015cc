"""Teacher families (SD1.5/SD2.1, SDXL, SD3/SD3.5, FLUX.1: :mod:`d2g_fast.teacher.families`) and
ODE-pair collection.

Stage one of Diffusion2GAN: run the teacher's deterministic sampler on (noise, prompt) and store
the final latent.

Command line::

    d2g collect --teacher ./stable-diffusion-v1-5 --prompts captions_train2014.json \\
        --num-pairs 1000000 --out ./pairs --steps 50 --guidance 8 --batch-size 16
    torchrun --nproc-per-node 8 -m d2g_fast.cli collect ...   # same arguments, 8 GPUs
    d2g verify ./pairs --recompute 16

Python::

    from d2g_fast.teacher import Teacher, collect
    from d2g_fast.data import PairDataset, load_prompts
    teacher = Teacher.from_pretrained("./stable-diffusion-v1-5", dtype="float16", device="cuda")
    collect(teacher, load_prompts("captions.json"), "./pairs", 10_000, steps=50, guidance=8.0)
    item = PairDataset("./pairs")[0]   # {"noise", "latent", "prompt", "index", ...}

Properties:
  * deterministic by pair index: noise of pair i from (seed, i), its prompt from (prompt list,
    seed, i); any pair can be regenerated (``d2g verify --recompute``);
  * resumable: rerun the same command after a crash; finished shards are kept, the rest made;
    a different configuration on the same folder is refused (naming what differs); the number
    of pairs may grow;
  * bit-exact: on the same hardware, dtype and speed options, a killed-and-resumed run and a
    multi-process run give byte-identical shards to one uninterrupted process (the batch size is
    part of the configuration because batch composition changes the rounding of batched kernels);
  * cost accounting: the manifest records device names, device-seconds and device-days per
    million pairs.
Speed options (GPU): channels_last and fused QKV (on by default in ``d2g collect``), CUDA-graph
replay (``--cuda-graphs``) or ``torch.compile`` (``--compile``) of the UNet, bf16/fp16.
"""
from d2g_fast.teacher.adapter import Conditioning, NonFiniteLatentError, Teacher, parse_dtype
from d2g_fast.teacher.families import FAMILIES, TeacherFamily, load_teacher
from d2g_fast.teacher.collect import collect, collection_config, recompute_pairs

__all__ = ["Teacher", "TeacherFamily", "FAMILIES", "load_teacher", "Conditioning",
           "NonFiniteLatentError", "parse_dtype", "collect",
           "collection_config", "recompute_pairs"]
