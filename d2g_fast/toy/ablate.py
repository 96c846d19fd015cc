"""``d2g toy ablate``: the paper's two ablation tables, reproduced in small on the toy world.

    d2g toy ablate [--out ablation] [--seeds 0 1 2] [--iters N] [--quick] [--rows NAME ...]

One student per row and seed, all trained on the SAME ODE pairs (collected once from the toy
teacher, DDIM + guidance), for the same number of steps, from the same seeds, then evaluated on
the same held-out prompts and noise as ``d2g demo``:

  loss table (regression only, lambda_GAN = 0): MSE, Pseudo-Huber, pixel LPIPS (VAE decodings,
  LPIPS-VGG with a RANDOM trunk: the ``lpips`` package ships only its linear heads and nothing
  downloads here), LatentLPIPS (no augmentation), E-LatentLPIPS;
  discriminator table (E-LatentLPIPS + lambda_GAN x GAN): regression only; + diffusion D (one
  head, no z, no R1, no mix-and-match); + z conditioning; + single-sample R1; + multi-scale
  (multi-scale input and heads); + mix-and-match (the full method).

The E-LatentLPIPS row of the loss table IS the "regression only" row of the discriminator table
(one student). Per row: FD and attribute accuracy (all four, and per attribute) of the
evaluation classifier, E-LatentLPIPS to the multi-step teacher, per-prompt diversity (classifier
features and E-LatentLPIPS) and precision / recall (d2g_fast.toy.evaluate.distribution_metrics),
seconds per training step, and the paper's figure. Several seeds give mean and spread (sample standard deviation).

Resumable per row: each finished (row, seed) is out/rows/<row>_seed<S>.json, and a killed
training resumes from its last checkpoint; rerunning the same command continues. Settings
other than the recorded ones are refused (choose another --out).

Writes out/metrics.json, out/report.md, out/ablation_loss.png, out/ablation_discriminator.png.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import shutil
import time
from pathlib import Path

import torch

from d2g_fast.demo import DEFAULTS as DEMO_DEFAULTS
from d2g_fast.demo import overlap_phases
from d2g_fast.toy import data

# (name, table, label, paper figure, regression settings, discriminator parts or None).
# None: regression only (lambda_GAN = 0). Parts: "z" noise conditioning, "r1" single-sample R1,
# "multiscale" multi-scale input and heads, "mix" mix-and-match; an empty tuple is the bare
# "diffusion D" (one head on the last decoder scale, no z, no R1, no mix-and-match).
ROWS = (
    ("mse", "loss", "MSE", "FID 110.55 / CLIP 0.222", dict(regression_loss="mse"), None),
    ("pseudo_huber", "loss", "Pseudo-Huber", "FID 87.60 / CLIP 0.230",
     dict(regression_loss="pseudo_huber"), None),
    ("pixel_lpips", "loss", "pixel LPIPS (random VGG trunk)", "FID 25.94 / CLIP 0.288",
     dict(regression_loss="pixel_lpips"), None),
    ("latentlpips", "loss", "LatentLPIPS (no augmentation)", "FID 67.17 / CLIP 0.244",
     dict(augment="none"), None),
    ("e_latentlpips", "both", "E-LatentLPIPS = regression only", "FID 22.95 / CLIP 0.299; "
     "FID-30k 14.72", {}, None),
    ("diffusion_d", "discriminator", "+ diffusion D", "FID-30k 12.04", {}, ()),
    ("z_conditioning", "discriminator", "+ z conditioning", "FID-30k 11.97", {}, ("z",)),
    ("r1", "discriminator", "+ single-sample R1", "FID-30k 10.60", {}, ("z", "r1")),
    ("multiscale", "discriminator", "+ multi-scale input and heads", "FID-30k 9.58", {},
     ("z", "r1", "multiscale")),
    ("mix_and_match", "discriminator", "+ mix-and-match (full method)", "FID-30k 9.45", {},
     ("z", "r1", "multiscale", "mix")),
)
ROW_NAMES = tuple(r[0] for r in ROWS)
_CAPTIONS = len(data.all_labels())  # the held-out prompts cycle through these captions


@dataclasses.dataclass
class AblateSettings:
    """One setting for every row (the demo's recipe: its defaults come from d2g_fast/demo.py)."""

    pairs: int = DEMO_DEFAULTS["pairs"]
    steps: int = DEMO_DEFAULTS["steps"]
    guidance: float = DEMO_DEFAULTS["guidance"]
    iters: int = DEMO_DEFAULTS["iters"]
    batch_size: int = DEMO_DEFAULTS["batch_size"]
    lr: float = DEMO_DEFAULTS["lr"]
    lr_d: float | None = DEMO_DEFAULTS["lr_d"]  # None: lr
    lambda_gan: float = DEMO_DEFAULTS["lambda_gan"]
    warmup_frac: float = DEMO_DEFAULTS["warmup_frac"]
    r1_gamma: float = DEMO_DEFAULTS["r1_gamma"]
    mix_fraction: float = 0.25
    ema_decay: float = DEMO_DEFAULTS["ema_decay"]
    eval_n: int = DEMO_DEFAULTS["eval_n"]
    teacher_steps: int = 25
    seeds: tuple[int, ...] = (0,)

    @classmethod
    def quick(cls) -> "AblateSettings":
        """Every row end to end in seconds (tests: the plumbing, not a result)."""
        return cls(pairs=32, steps=2, iters=2, batch_size=8, eval_n=2 * _CAPTIONS,
                   teacher_steps=2)

    def validate(self) -> "AblateSettings":
        for name in ("pairs", "steps", "iters", "batch_size", "eval_n", "teacher_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value!r}")
        if self.pairs < self.batch_size:
            raise ValueError(f"--pairs ({self.pairs}) must be at least --batch-size "
                             f"({self.batch_size})")
        if self.eval_n < 2 * _CAPTIONS:
            raise ValueError(f"--eval-n must be >= {2 * _CAPTIONS}: the held-out prompts cycle "
                             f"through the {_CAPTIONS} captions and diversity compares samples "
                             f"of one prompt, got {self.eval_n}")
        if not self.seeds or any(s < 0 for s in self.seeds):
            raise ValueError(f"--seeds must be one or more integers >= 0, got {self.seeds!r}")
        if not self.lambda_gan > 0:
            raise ValueError(f"--lambda-gan must be > 0 (the GAN rows), got {self.lambda_gan}")
        return self


# ------------------------------------------------------------------------------ training
def row_config(row: tuple, s: AblateSettings, seed: int, world: Path, pairs_dir: str,
               run_dir: str, progress: bool):
    """The TrainConfig of one (row, seed)."""
    from d2g_fast.train import TrainConfig

    _, _, _, _, regression, parts = row
    gan = parts is not None
    parts = set(parts or ())
    switches = dict(d_noise_off="z" not in parts, r1_gamma=s.r1_gamma if "r1" in parts else 0.0,
                    d_multiscale_input_off="multiscale" not in parts,
                    d_multiscale_output_off="multiscale" not in parts,
                    mix_fraction=s.mix_fraction if "mix" in parts else 0.0)
    iters = s.iters
    return TrainConfig(
        teacher=str(world / "teacher"), pairs=pairs_dir, out=run_dir,
        lpips_path=str(world / "elatentlpips.safetensors"), max_steps=iters,
        batch_size=s.batch_size, lr_g=s.lr, lr_d=s.lr_d or s.lr,
        lambda_gan=s.lambda_gan if gan else 0.0,
        warmup_steps=int(iters * s.warmup_frac), ema_decay=s.ema_decay, r1_interval=16,
        checkpoint_every=max(1, iters // 4), keep_checkpoints=1, log_every=max(1, iters // 20),
        progress=progress, seed=seed, device="cpu", overlap_phases=overlap_phases(),
        **switches, **regression)


def train_row(row, s: AblateSettings, seed: int, world: Path, pairs_dir: str, out: Path,
              progress: bool) -> tuple[str, float]:
    """Train (or finish) one student and export it; returns (pipeline folder, s per step)."""
    from d2g_fast.train import export_pipeline, train

    run_dir = out / "runs" / f"{row[0]}_seed{seed}"
    config = row_config(row, s, seed, world, pairs_dir, str(run_dir), progress)
    summary = train(config, log=lambda *a: None)
    per_step = _seconds_per_step(summary)
    student = export_pipeline(str(run_dir), str(out / "students" / f"{row[0]}_seed{seed}"))
    return student, per_step


def _seconds_per_step(summary: dict) -> float:
    """Training seconds per step (the step itself: data, G, D, optimisers, EMA), over the
    whole run including parts done before a resume (the checkpointed counter)."""
    return summary["device_hours"] * 3600 / max(1, summary["steps"])


# ------------------------------------------------------------------------------ evaluation
class Judge:
    """Everything the per-row evaluation shares: the teacher, the classifier, E-LatentLPIPS,
    the held-out prompts and noise, real features, and the multi-step teacher's latents."""

    def __init__(self, world: Path, s: AblateSettings):
        import importlib

        # The module (d2g_fast.toy re-exports its evaluate() function under the same name).
        ev = importlib.import_module("d2g_fast.toy.evaluate")
        self.ev = ev
        self.pipe = ev.use_ddim(ev.load_pipeline(world / "teacher"))
        self.clf = ev.load_classifier(world / "classifier.safetensors")
        self.lpips = ev.load_elatentlpips(world / "elatentlpips.safetensors")
        self.prompts, self.noise = ev.heldout(s.eval_n)
        self.real = ev.real_features(self.clf, max(s.eval_n, 512))
        self.reference = ev.pipeline_latents(self.pipe, self.prompts, self.noise,
                                             s.teacher_steps, s.guidance)

    def metrics(self, latents: torch.Tensor) -> dict:
        ev = self.ev
        images = ev.decode(self.pipe.vae, latents)
        m = ev.image_metrics(self.clf, images, self.prompts, self.real)
        m["e_latentlpips"] = ev.mean_latent_distance(self.lpips, latents, self.reference)
        m.update(ev.distribution_metrics(self.clf, images, latents, self.prompts, self.real,
                                         lpips=self.lpips))
        return m

    def real_images(self) -> dict:
        """Diversity of real images of the held-out captions, precision / recall of a second
        real set: the targets of the rows' values."""
        return self.ev.real_distribution_metrics(self.clf, self.prompts, self.real)

    def student(self, folder: str) -> dict:
        pipe = self.ev.load_pipeline(folder)
        return self.metrics(self.ev.pipeline_latents(pipe, self.prompts, self.noise, 1, 1.0))


# ------------------------------------------------------------------------------ the run
def _write_json(path: Path, value) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=1), encoding="utf-8")
    os.replace(tmp, path)


def _check_settings(out: Path, s: AblateSettings) -> None:
    key = out / "settings.json"
    mine = dataclasses.asdict(s)
    mine["seeds"] = list(mine["seeds"])
    if key.is_file():
        saved = json.loads(key.read_text())
        differ = {k: (saved.get(k), v) for k, v in mine.items()
                  if k != "seeds" and saved.get(k) != v}
        if differ:
            raise ValueError(f"--out {out} holds an ablation with other settings ({differ}); "
                             "rerun with the same settings to resume, or choose another --out")
    _write_json(key, mine)


def collect_pairs(world: Path, out: Path, s: AblateSettings, progress: bool) -> str:
    from d2g_fast import toy
    from d2g_fast.teacher import Teacher
    from d2g_fast.teacher.collect import collect

    teacher = Teacher.from_pretrained(str(world / "teacher"))
    pairs_dir = str(out / "pairs")
    collect(teacher, toy.train_prompts(), pairs_dir, s.pairs, steps=s.steps,
            guidance=s.guidance, batch_size=64, shard_size=256, seed=0, progress=progress,
            log=lambda *a: None)
    return pairs_dir


def run_ablation(out: str | os.PathLike = "ablation", settings: AblateSettings | None = None,
                 rows: tuple[str, ...] | None = None, toy_dir=None, progress: bool = True,
                 command: str | None = None, log=print) -> dict:
    """Train and evaluate every requested row for every seed; write the report.

    Returns the metrics dict (also out/metrics.json)."""
    from tqdm.auto import tqdm

    from d2g_fast import toy

    s = (settings or AblateSettings()).validate()
    rows = tuple(rows or ROW_NAMES)
    unknown = [r for r in rows if r not in ROW_NAMES]
    if unknown:
        raise ValueError(f"--rows: unknown rows {unknown} (choose from {list(ROW_NAMES)})")
    world = Path(toy_dir) if toy_dir else toy.shipped_dir()
    if not (world / "teacher" / "model_index.json").is_file():
        raise FileNotFoundError(f"--toy-dir: {str(world)!r} is not a toy world folder")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _check_settings(out, s)
    (out / "rows").mkdir(exist_ok=True)
    start = time.perf_counter()
    log(f"d2g toy ablate: collecting {s.pairs} ODE pairs (DDIM {s.steps} steps, guidance "
        f"{s.guidance})")
    pairs_dir = collect_pairs(world, out, s, progress)
    log(f"d2g toy ablate: evaluation set of {s.eval_n} held-out prompts and noises")
    judge = Judge(world, s)
    teacher = judge.metrics(judge.reference)
    selected = [r for r in ROWS if r[0] in rows]
    jobs = [(r, seed) for r in selected for seed in s.seeds]
    results: dict[str, dict[int, dict]] = {r[0]: {} for r in selected}
    with tqdm(total=len(jobs), desc="ablation rows", disable=not progress,
              dynamic_ncols=True) as bar:
        for row, seed in jobs:
            path = out / "rows" / f"{row[0]}_seed{seed}.json"
            if path.is_file():
                results[row[0]][seed] = json.loads(path.read_text())
                bar.update()
                continue
            bar.set_postfix(row=row[0], seed=seed)
            student, per_step = train_row(row, s, seed, world, pairs_dir, out, progress)
            m = judge.student(student)
            m["seconds_per_step"] = per_step
            _write_json(path, m)
            shutil.rmtree(out / "students" / f"{row[0]}_seed{seed}", ignore_errors=True)
            results[row[0]][seed] = m
            bar.update()
    metrics = {
        "settings": {**dataclasses.asdict(s), "seeds": list(s.seeds)},
        "teacher_multistep": teacher,
        "real_images": judge.real_images(),
        "rows": {r[0]: {"table": r[1], "label": r[2], "paper": r[3],
                        "seeds": {str(k): v for k, v in results[r[0]].items()},
                        **aggregate(list(results[r[0]].values()))} for r in selected},
        "seconds": time.perf_counter() - start,
        "command": command,
        "software": _software(),
    }
    _write_json(out / "metrics.json", metrics)
    save_charts(metrics, out)
    (out / "report.md").write_text(report_markdown(metrics), encoding="utf-8")
    log(f"d2g toy ablate: report {out / 'report.md'}")
    return metrics


SCALARS = ("fd", "accuracy", "e_latentlpips", "diversity_features", "diversity_e_latentlpips",
           "precision", "recall", "seconds_per_step")


def aggregate(per_seed: list[dict]) -> dict:
    """Mean and sample standard deviation over seeds of every scalar and attribute accuracy."""
    out = {}
    keys = [k for k in SCALARS if all(m.get(k) is not None for m in per_seed)]
    keys += [f"attribute_accuracy.{a}" for a in per_seed[0].get("attribute_accuracy", {})]
    for key in keys:
        values = [_get(m, key) for m in per_seed]
        mean = sum(values) / len(values)
        std = (math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
               if len(values) > 1 else None)
        out[key] = {"mean": mean, "std": std}
    return out


def _get(m: dict, key: str) -> float:
    for part in key.split("."):
        m = m[part]
    return float(m)


def _software() -> dict:
    import diffusers

    return {"python": platform.python_version(), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "threads": torch.get_num_threads(),
            "overlap_phases": overlap_phases(),
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}


# ------------------------------------------------------------------------------ report
def _fmt(stat: dict | None, digits: int = 3, percent: bool = False) -> str:
    if not stat:
        return "n/a"
    scale = 100.0 if percent else 1.0
    text = f"{stat['mean'] * scale:.{digits}f}"
    if stat.get("std") is not None:
        text += f" ± {stat['std'] * scale:.{digits}f}"
    return text


def table_markdown(metrics: dict, table: str) -> str:
    rows = [(k, r) for k, r in metrics["rows"].items() if r["table"] in (table, "both")]
    head = ("| row | FD | accuracy % | shape % | colour % | position % | background % | "
            "E-LatentLPIPS to teacher | diversity (features) | diversity (E-LatentLPIPS) | "
            "precision | recall | s / step | paper |")
    lines = [head, "|" + "---|" * 14]
    for _, r in rows:
        aa = [_fmt(r.get(f"attribute_accuracy.{a}"), 1, True)
              for a in ("shape", "colour", "position", "background")]
        lines.append(f"| {r['label']} | {_fmt(r.get('fd'), 2)} | "
                     f"{_fmt(r.get('accuracy'), 1, True)} | {' | '.join(aa)} | "
                     f"{_fmt(r.get('e_latentlpips'), 4)} | {_fmt(r.get('diversity_features'))} | "
                     f"{_fmt(r.get('diversity_e_latentlpips'), 4)} | {_fmt(r.get('precision'))} | "
                     f"{_fmt(r.get('recall'))} | {_fmt(r.get('seconds_per_step'), 2)} | "
                     f"{r['paper']} |")
    t = metrics["teacher_multistep"]
    steps = metrics["settings"]["teacher_steps"]
    lines.append(f"| multi-step teacher ({steps} DDIM steps, guidance) | {t['fd']:.2f} | "
                 f"{t['accuracy'] * 100:.1f} | "
                 + " | ".join(f"{t['attribute_accuracy'][a] * 100:.1f}"
                              for a in ("shape", "colour", "position", "background"))
                 + f" | 0 | {_num(t.get('diversity_features'))} | "
                   f"{_num(t.get('diversity_e_latentlpips'), 4)} | {_num(t.get('precision'))} | "
                   f"{_num(t.get('recall'))} | | |")
    real = metrics.get("real_images", {})
    lines.append(f"| real images (target) | | | | | | | | {_num(real.get('real_diversity_features'))}"
                 f" | | {_num(real.get('real_floor_precision'))} | "
                 f"{_num(real.get('real_floor_recall'))} | | |")
    return "\n".join(lines)


def _num(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def ordering_notes(metrics: dict) -> list[str]:
    """Plain statements of where the toy's FD ordering agrees with the paper's and where not
    (a difference counts only when it exceeds the spread of both rows, if several seeds)."""
    rows = metrics["rows"]
    notes = []

    def fd(name):
        return rows[name]["fd"]["mean"] if name in rows else None

    def separated(a, b):
        sa, sb = rows[a]["fd"].get("std"), rows[b]["fd"].get("std")
        if sa is None or sb is None:
            return None
        return abs(fd(a) - fd(b)) > sa + sb

    loss_order = ["mse", "pseudo_huber", "latentlpips", "pixel_lpips", "e_latentlpips"]
    present = [n for n in loss_order if n in rows]
    if len(present) > 1:
        toy = sorted(present, key=fd)
        notes.append("Loss table, toy FD best to worst: " + ", ".join(rows[n]["label"]
                                                                   for n in toy)
                     + ". Paper (FID) best to worst: E-LatentLPIPS, pixel LPIPS, LatentLPIPS, "
                       "Pseudo-Huber, MSE. "
                     + ("The toy agrees." if toy == present[::-1] else
                        "The toy does NOT reproduce the paper's ordering."))
    chain = [n for n in ("e_latentlpips", "diffusion_d", "z_conditioning", "r1", "multiscale",
                         "mix_and_match") if n in rows]
    for a, b in zip(chain, chain[1:]):
        better = fd(b) < fd(a)
        sep = separated(a, b)
        verdict = ("improves FD" if better else "does NOT improve FD")
        if sep is False:
            verdict += " (within the seeds' spread: not separated)"
        elif sep is None:
            verdict += " (one seed: no spread measured)"
        notes.append(f"{rows[b]['label']} vs {rows[a]['label']}: {fd(a):.2f} -> {fd(b):.2f}, "
                     f"{verdict}; the paper's step improves FID.")
    return notes


def report_markdown(metrics: dict) -> str:
    s = metrics["settings"]
    sw = metrics["software"]
    parts = [
        "# The paper's ablations on the toy world (d2g toy ablate)",
        "",
        f"Command: `{metrics.get('command') or 'd2g toy ablate'}`; {metrics['seconds'] / 60:.1f} "
        f"min on {sw['cores']} CPU core(s) ({sw['cpu']}), torch {sw['torch']}, diffusers "
        f"{sw['diffusers']}, {sw['threads']} torch thread(s)"
        f"{', G and D phases overlapped' if sw.get('overlap_phases') else ''}.",
        "",
        f"Every student: {s['iters']} steps, batch {s['batch_size']}, lr {s['lr']} (G), "
        f"{s.get('lr_d') or s['lr']} (D), EMA "
        f"{s['ema_decay']}, on the same {s['pairs']} ODE pairs (teacher DDIM {s['steps']} steps, "
        f"guidance {s['guidance']}); GAN rows: lambda_GAN {s['lambda_gan']} after "
        f"{int(s['iters'] * s['warmup_frac'])} regression-only warm-up steps, R1 gamma "
        f"{s['r1_gamma']} every 16 steps, mix-and-match fraction {s['mix_fraction']}. Seeds "
        f"{s['seeds']}: values are mean ± sample standard deviation over seeds (no ± with one "
        f"seed). Evaluated on {s['eval_n']} held-out prompts/noises (each caption "
        f"{max(1, s['eval_n'] // 72)}x).",
        "",
        "FD: Fréchet distance to real toy images in the evaluation classifier's features (lower "
        "is better). Accuracy: all four attributes right, by the classifier. Diversity: mean "
        "pairwise distance between samples of the same prompt under different noise (classifier "
        "features; E-LatentLPIPS without augmentation); real images of the same captions are "
        "the target. Precision / recall: Kynkäänniemi et al.'s k-NN manifold estimate against "
        "real images in the classifier's features (a second real set gives the floor). s / step: one training step on this "
        "CPU, machine load included. The paper's figures are SD1.5 on COCO (FID-5k/CLIP for the "
        "loss table, FID-30k for the discriminator table): set beside the toy's for the "
        "ordering, not the values.",
        "",
        "Pixel LPIPS: the `lpips` package ships only its calibrated linear heads; its VGG16 "
        "trunk would come from a torchvision download, which never happens here, so the trunk "
        "is random (`pnet_rand=True`). This row is the paper's loss in form, not with ImageNet "
        "features.",
        "",
        "## Loss table (regression only)",
        "",
        table_markdown(metrics, "loss"),
        "",
        "## Discriminator table (E-LatentLPIPS + GAN)",
        "",
        table_markdown(metrics, "discriminator"),
        "",
        "## What the toy shows",
        "",
        *[f"- {n}" for n in ordering_notes(metrics)],
        "",
        "![loss table](ablation_loss.png) ![discriminator table](ablation_discriminator.png)",
        "",
    ]
    return "\n".join(parts)


def save_charts(metrics: dict, out: Path) -> None:
    """One bar chart of FD (with the seeds' spread) per table."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for table in ("loss", "discriminator"):
        rows = [r for r in metrics["rows"].values() if r["table"] in (table, "both")]
        if not rows:
            continue
        fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
        means = [r["fd"]["mean"] for r in rows]
        errs = [r["fd"]["std"] or 0.0 for r in rows]
        ax.bar(range(len(rows)), means, yerr=errs, capsize=4, color="tab:blue")
        ax.axhline(metrics["teacher_multistep"]["fd"], color="gray", linestyle=":",
                   label="multi-step teacher")
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels([r["label"].split(" (")[0] for r in rows], rotation=25, ha="right",
                           fontsize=8)
        ax.set_ylabel("FD (classifier features)")
        ax.set_title(f"toy ablation: {table} table (lower is better)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / f"ablation_{table}.png")
        plt.close(fig)
