"""Judge students that were distilled from the toy teacher of git 60fc6f1 (before the retrained
teacher of 5c693a7 landed while they trained) against that teacher: their exported folders got
the NEW teacher's text encoder and tokenizer (the export copies them from the teacher folder,
which had changed on disk), so these are replaced by the old ones, then the student is judged
as benchmarks/demo_recipe_spread.py does, with the old toy world (same VAE and classifier;
E-LatentLPIPS to the old multi-step teacher).

    git archive 60fc6f1 d2g_fast/toy/weights | tar -x -C OLD
    python rejudge_old_teacher.py OLD/d2g_fast/toy/weights SPREAD_DIR TAG SEED [EVAL_N=288]
"""
import json
import os
import shutil
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)
from d2g_fast.toy.ablate import AblateSettings, Judge  # noqa: E402
from d2g_fast.toy.evaluate import quiet_diffusers  # noqa: E402

quiet_diffusers()
world, out, tag, seed = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
eval_n = int(sys.argv[5]) if len(sys.argv) > 5 else 288
student = out / f"{tag}_seed{seed}_student"
for part in ("text_encoder", "tokenizer"):
    shutil.rmtree(student / part)
    shutil.copytree(world / "teacher" / part, student / part)
judge = Judge(world, AblateSettings(eval_n=eval_n, guidance=4.0))
m = judge.student(str(student))
line = {"tag": tag, "seed": seed, "teacher": "git 60fc6f1 (old)", "rejudged": True,
        **{k: m[k] for k in ("fd", "accuracy", "attribute_accuracy", "e_latentlpips", "precision",
                             "recall") if k in m}}
with open(out / "results_old_teacher.jsonl", "a", encoding="utf-8") as f:
    f.write(json.dumps(line) + "\n")
print(json.dumps(line))
