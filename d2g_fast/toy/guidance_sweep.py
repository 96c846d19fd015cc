"""``d2g demo --guidance-sweep``: one student for every guidance scale, on the toy world.

The paper distils one student per guidance scale. Here, on the shipped toy teacher and with the
code of ``d2g collect`` / ``d2g distill`` / ``d2g export`` (issue 21):

1. collects ODE pairs over several guidance scales (pair i's scale drawn by (seed, i)) and, for
   comparison, the same number of pairs (same prompts and noise) at one fixed scale;
2. distils ONE guidance-conditioned student from the first store and ONE fixed-scale student
   from the second (same steps, batch and learning rate);
3. evaluates, at every scale, on the same held-out prompts and noise (``toy.evaluate``, one
   folder per scale): the teacher at that scale (multi-step and 1/2/4 DDIM steps), the
   conditioned student run once at that scale, and the fixed-scale student (trained at its one
   scale: the same images at every scale);
4. writes report.md, metrics.json, a chart of FD and accuracy against the guidance scale
   (guidance_chart.png) and a grid of a few prompts and noises across the scales, teacher
   beside student (grid_guidance.png).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

# Two students' collection, distillation and evaluation at five scales: fewer pairs and steps
# than the demo's one student, sized for a shared 2-core CPU (the time of each stage is in the
# report; README: the committed run).
SWEEP_DEFAULTS = dict(pairs=256, steps=25, iters=100, eval_n=72)
# --quick (the test suite): every stage, tiny counts.
SWEEP_QUICK = dict(pairs=64, steps=6, iters=20, eval_n=72)
# Held-out prompt/noise pairs shown across the scales in grid_guidance.png (indices into
# toy.heldout(72): four shapes/colours/positions/backgrounds that differ).
GRID_INDICES = (0, 33, 52, 66)
TEACHER_SAMPLERS = ("teacher_multistep", "teacher_1step", "teacher_2step", "teacher_4step")
CONDITIONED, FIXED = "conditioned_student_1step", "fixed_student_1step"


def parse_scales(text: str) -> list[float]:
    """'1.5,3,8' -> [1.5, 3.0, 8.0] (sorted, distinct, each >= 1); bad text names the flag."""
    try:
        scales = sorted({float(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise ValueError(f"--guidance-sweep must be comma-separated numbers such as "
                         f"1.5,4,8, got {text!r}") from None
    if len(scales) < 2:
        raise ValueError(f"--guidance-sweep needs at least two distinct scales, got {text!r}")
    if scales[0] < 1:
        raise ValueError(f"--guidance-sweep scales must be >= 1, got {scales[0]:g}")
    return scales


def resolve(args: argparse.Namespace) -> tuple[dict, list[float], list[float]]:
    """(settings, collection scales, evaluation scales): explicit flags, else --quick's, else
    the sweep's defaults, checked by the demo's own rules. The fixed-scale student is trained
    at --guidance, which must lie within the sweep (it is evaluated there too)."""
    from d2g_fast import demo

    if args.ablation:
        raise ValueError("--ablation is the plain demo's (d2g toy ablate has the full "
                         "ablations); leave it out with --guidance-sweep")
    counts = SWEEP_QUICK if args.quick else SWEEP_DEFAULTS
    filled = argparse.Namespace(**{**vars(args), **{
        name: counts[name] if getattr(args, name) is None else getattr(args, name)
        for name in counts}})
    settings = demo.resolve(filled)
    scales = parse_scales(args.guidance_sweep)
    if not scales[0] <= args.guidance <= scales[-1]:
        raise ValueError(f"--guidance ({args.guidance:g}, the fixed-scale student's) must lie "
                         f"within --guidance-sweep ({scales[0]:g} to {scales[-1]:g})")
    return settings, scales, sorted(set(scales) | {float(args.guidance)})


def collect_store(folder: str, guidance, settings: dict, args) -> str:
    """The demo's collection into ``folder``/pairs at ``guidance`` (a scale or a list)."""
    from d2g_fast import demo

    return demo.collect_pairs(folder, settings, argparse.Namespace(**{**vars(args),
                                                                      "guidance": guidance}))


def conditioned_sampler(pipe, guidance: float):
    """G(noise, prompts) -> latents: the exported stock pipeline, one step at ``guidance``
    (one UNet call per image, timestep_cond from the scale, no classifier-free doubling)."""
    from d2g_fast.toy.evaluate import pipeline_latents

    return lambda noise, prompts: pipeline_latents(pipe, prompts, noise, 1, guidance)


def scale_folder(out: str, guidance: float) -> str:
    return os.path.join(out, f"eval_g{guidance:g}")


def evaluate_scales(out: str, students: dict, scales: list[float], settings: dict,
                    args) -> dict:
    """toy.evaluate at every scale (its report, metrics and grids in eval_g<scale>/):
    {scale: {sampler: metrics}}."""
    from d2g_fast import demo, toy
    from d2g_fast.toy.evaluate import load_pipeline

    conditioned = load_pipeline(students[CONDITIONED])
    per_scale = {}
    for g in scales:
        print(f"  guidance {g:g}", flush=True)
        per_scale[g] = toy.evaluate(
            {CONDITIONED: conditioned_sampler(conditioned, g), FIXED: students[FIXED]},
            scale_folder(out, g), toy_dir=demo.toy_world(args), n=settings["eval_n"],
            teacher_steps=settings["steps"], guidance=g, progress=not args.no_progress)
    return per_scale


def save_sweep_grid(out: str, student_folder: str, scales: list[float], steps: int,
                    args) -> None:
    """grid_guidance.png: columns are the scales; for each held-out prompt and noise of
    GRID_INDICES, a row of the multi-step teacher and below it a row of the conditioned
    student."""
    import torch

    from d2g_fast import demo, toy
    from d2g_fast.toy.evaluate import decode, load_pipeline, pipeline_latents, save_grid, use_ddim

    teacher = use_ddim(load_pipeline(demo.toy_world(args) / "teacher"))
    student = load_pipeline(student_folder)
    prompts, noise = toy.heldout(max(GRID_INDICES) + 1)
    prompts, noise = [prompts[i] for i in GRID_INDICES], noise[list(GRID_INDICES)]
    rows = []
    for i, prompt in enumerate(prompts):
        z = noise[i:i + 1]
        rows.append(torch.cat([pipeline_latents(teacher, [prompt], z, steps, g)
                               for g in scales]))
        rows.append(torch.cat([pipeline_latents(student, [prompt], z, 1, g) for g in scales]))
    save_grid(decode(teacher.vae, torch.cat(rows)), os.path.join(out, "grid_guidance.png"),
              columns=len(scales))
    (Path(out) / "grid_guidance.txt").write_text(
        "\n".join(f"rows {2 * i + 1}-{2 * i + 2} (teacher, student): {p}"
                  for i, p in enumerate(prompts)) + "\n", encoding="utf-8")


def save_sweep_chart(per_scale: dict, fixed: float, path: str) -> None:
    """FD and accuracy against the guidance scale: the teacher's samplers, the conditioned
    student, the fixed-scale student at its scale, and the real-vs-real FD floor."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scales = sorted(per_scale)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=120)
    styles = {"teacher_multistep": ("o-", "tab:blue"), "teacher_1step": ("v:", "tab:gray"),
              "teacher_2step": ("^:", "tab:olive"), "teacher_4step": ("s:", "tab:cyan"),
              CONDITIONED: ("*-", "tab:red")}
    for ax, key, label in ((axes[0], "fd", "Fréchet distance (classifier features)"),
                           (axes[1], "accuracy", "attribute accuracy (all four)")):
        for name, (style, colour) in styles.items():
            ax.plot(scales, [per_scale[g][name][key] for g in scales], style, color=colour,
                    label=name.replace("_", " "), markersize=9 if name == CONDITIONED else 5)
        ax.plot([fixed], [per_scale[fixed][FIXED][key]], "D", color="black", markersize=8,
                label=f"fixed-scale student (trained at {fixed:g})")
        if key == "fd":
            ax.axhline(per_scale[scales[0]]["teacher_multistep"]["real_floor_fd"], color="gray",
                       linestyle="--", label="two random real sets (captions not balanced)")
            ax.set_yscale("log")
        ax.set_xlabel("guidance scale")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("toy world: one guidance-conditioned one-step student against the teacher")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _row(g: float, name: str, m: dict) -> str:
    from d2g_fast.toy import data

    per = " | ".join(f"{100 * m['attribute_accuracy'][a]:.1f}" for a in data.ATTRIBUTES)
    return (f"| {g:g} | {name} | {m['nfe']} | {m['fd']:.2f} | {100 * m['accuracy']:.1f} | "
            f"{per} | {m['e_latentlpips']:.4f} |")


def sweep_table(per_scale: dict) -> list[str]:
    """Markdown lines: one row per scale and sampler (accuracies in %)."""
    from d2g_fast.toy import data

    lines = ["| guidance | sampler | UNet evals | FD | accuracy | "
             + " | ".join(data.ATTRIBUTES) + " | E-LatentLPIPS to teacher |",
             "|---:|---|---:|---:|---:|" + "---:|" * len(data.ATTRIBUTES) + "---:|"]
    for g in sorted(per_scale):
        for name in (*TEACHER_SAMPLERS, CONDITIONED, FIXED):
            lines.append(_row(g, name, per_scale[g][name]))
    return lines


def closeness(per_scale: dict, fixed: float, scales: list[float]) -> list[str]:
    """What the numbers say, computed from them: the conditioned student against the
    fixed-scale student at its scale, and whether it follows the teacher across scales
    (``scales``: the conditioned student's collection scales)."""
    here = per_scale[fixed]
    c, f, t = here[CONDITIONED], here[FIXED], here["teacher_multistep"]
    lo, hi = min(per_scale), max(per_scale)
    lines = [
        f"- At guidance {fixed:g}, where both students were trained: the conditioned student "
        f"scores FD {c['fd']:.2f} against the fixed-scale student's {f['fd']:.2f} "
        f"({c['fd'] / f['fd']:.2f}x), accuracy {100 * c['accuracy']:.1f} % against "
        f"{100 * f['accuracy']:.1f} %, E-LatentLPIPS to the teacher {c['e_latentlpips']:.4f} "
        f"against {f['e_latentlpips']:.4f} (the teacher's {t['steps']} steps: FD {t['fd']:.2f}, "
        f"accuracy {100 * t['accuracy']:.1f} %; two random real sets of this size, whose "
        f"captions are not balanced as the held-out set's, are {t['real_floor_fd']:.2f} "
        f"apart).",
        f"- The conditioned student saw about 1/{len(scales)} of its pairs at each of its "
        f"{len(scales)} scales "
        f"(same pairs budget and steps as the fixed-scale student, spread over the scales).",
        f"- Across the scales, from {lo:g} to {hi:g}: the teacher's FD goes "
        f"{per_scale[lo]['teacher_multistep']['fd']:.2f} -> "
        f"{per_scale[hi]['teacher_multistep']['fd']:.2f} and its accuracy "
        f"{100 * per_scale[lo]['teacher_multistep']['accuracy']:.1f} % -> "
        f"{100 * per_scale[hi]['teacher_multistep']['accuracy']:.1f} %; the conditioned "
        f"student's FD {per_scale[lo][CONDITIONED]['fd']:.2f} -> "
        f"{per_scale[hi][CONDITIONED]['fd']:.2f}, accuracy "
        f"{100 * per_scale[lo][CONDITIONED]['accuracy']:.1f} % -> "
        f"{100 * per_scale[hi][CONDITIONED]['accuracy']:.1f} %.",
    ]
    others = [g for g in sorted(per_scale) if g != fixed]
    closer = [g for g in others if per_scale[g][CONDITIONED]["e_latentlpips"]
              < per_scale[g][FIXED]["e_latentlpips"]]
    lines.append(
        f"- Away from {fixed:g}, the conditioned student is closer (E-LatentLPIPS) than the "
        f"fixed-scale student to the teacher at that scale at {len(closer)} of "
        f"{len(others)} other scales ({', '.join(f'{g:g}' for g in closer) or 'none'}).")
    return lines


def command_line(settings: dict, scales: list[float], args) -> str:
    """The d2g command that reproduces this sweep (every count explicit)."""
    return (f"d2g demo --guidance-sweep {','.join(f'{g:g}' for g in scales)} --guidance "
            f"{args.guidance:g} --pairs {settings['pairs']} --steps {settings['steps']} "
            f"--iters {settings['iters']} --eval-n {settings['eval_n']} --batch-size "
            f"{args.batch_size} --lr {args.lr:g} --lambda-gan {args.lambda_gan:g} --seed "
            f"{args.seed} --precision {args.precision} --out {args.out}")


def report_markdown(per_scale: dict, fixed: float, scales: list[float], settings: dict, args,
                    seconds: dict) -> str:
    n = settings["eval_n"]
    lines = [
        "# Toy evaluation: one guidance-conditioned one-step student across guidance scales",
        "",
        "**The teacher is a toy** (the shipped 32x32 coloured-shapes world): the numbers show "
        "the method at work, not Stable Diffusion's quality.",
        "",
        f"Command: `{command_line(settings, scales, args)}`",
        "",
        f"- Conditioned student: {settings['pairs']} ODE pairs from the teacher (DDIM "
        f"{settings['steps']} steps), pair i's guidance drawn from "
        f"{', '.join(f'{g:g}' for g in scales)} by (seed, i); "
        f"{settings['iters']} distillation steps, batch {args.batch_size}, lambda_GAN "
        f"{args.lambda_gan}. Run once per image at each scale through the exported stock "
        f"pipeline (`pipe(prompt, num_inference_steps=1, guidance_scale=g)`).",
        f"- Fixed-scale student: the same number of pairs (same prompts and noise) at guidance "
        f"{fixed:g} only, the same steps; it has no guidance input, so its images are the same "
        f"at every scale (its rows compare them with the teacher at that scale).",
        f"- Every sampler at every scale: the same {n} held-out prompts and noises; the teacher "
        f"is DDIM with classifier-free guidance at that scale (UNet evals: a guided step costs "
        f"two). E-LatentLPIPS is measured to the multi-step teacher at that scale. Accuracies in "
        f"%, per attribute as the evaluation classifier reads them.",
        "",
        "![FD and accuracy against guidance](guidance_chart.png)",
        "",
        *sweep_table(per_scale),
        "",
        "## How close the conditioned student comes",
        "",
        *closeness(per_scale, fixed, scales),
        "",
        "## Pictures",
        "",
        "One held-out prompt and noise per pair of rows, the scales as columns "
        f"({', '.join(f'{g:g}' for g in sorted(per_scale))}); in each pair of rows the "
        "multi-step teacher above the conditioned student (prompts in grid_guidance.txt):",
        "",
        "![teacher and student across scales](grid_guidance.png)",
        "",
        "Each scale's full evaluation (its report.md with diversity and precision / recall, "
        "metrics.json and grids of 32 samples per sampler) is in "
        + ", ".join(f"`{os.path.basename(scale_folder('', g))}/`" for g in sorted(per_scale))
        + ".",
    ]
    from d2g_fast import demo

    return "\n".join(lines) + "\n" + demo.stage_times_section(seconds,
                                                             demo.training_layout(args))


def write_outputs(out: str, per_scale: dict, conditioned_folder: str, scales: list[float],
                  settings: dict, args, stage_seconds: dict, start: float) -> None:
    """The sweep's own files: guidance_chart.png, grid_guidance.png, metrics.json, report.md
    (``stage_seconds`` gets the report stage and the total, from ``start``)."""
    import torch

    from d2g_fast import demo

    fixed, eval_scales = float(args.guidance), sorted(per_scale)
    clock = time.perf_counter()
    save_sweep_chart(per_scale, fixed, os.path.join(out, "guidance_chart.png"))
    save_sweep_grid(out, conditioned_folder, eval_scales, settings["steps"], args)
    now = time.perf_counter()
    seconds = {**stage_seconds, "report": now - clock, "total": now - start}
    with open(os.path.join(out, "metrics.json"), "w", encoding="utf-8") as f:
        json.dump({"settings": {**settings, "collection_scales": scales,
                                "evaluation_scales": eval_scales, "fixed_guidance": fixed,
                                "batch_size": args.batch_size, "lr": args.lr,
                                "lambda_gan": args.lambda_gan, "seed": args.seed,
                                "precision": demo.training_precision(args.precision),
                                "overlap_phases": demo.overlap_phases(args)},
                   "per_scale": {f"{g:g}": m for g, m in per_scale.items()},
                   "stage_seconds": seconds, "threads": torch.get_num_threads()}, f, indent=1)
    (Path(out) / "report.md").write_text(
        report_markdown(per_scale, fixed, scales, settings, args, seconds), encoding="utf-8")


def run(args: argparse.Namespace) -> int:
    """The sweep (``d2g demo --guidance-sweep [SCALES]``): see the module docstring."""
    import torch

    from d2g_fast import demo
    from d2g_fast.teacher.collect_cmd import quiet_model_loading

    settings, scales, eval_scales = resolve(args)
    demo.toy_world(args)  # a missing --toy-dir fails before anything is written
    fixed = float(args.guidance)
    quiet_model_loading()
    import diffusers

    diffusers.utils.logging.disable_progress_bar()
    torch.manual_seed(args.seed)
    start = clock = time.perf_counter()
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    stage_seconds = {}

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        stage_seconds[name] = now - clock
        clock = now

    demo.stage(1, 4, f"collecting {settings['pairs']} ODE pairs over guidance "
                     f"{', '.join(f'{g:g}' for g in scales)} and {settings['pairs']} at "
                     f"{fixed:g} (DDIM {settings['steps']} steps)")
    conditioned_pairs = collect_store(os.path.join(out, "conditioned"), scales, settings, args)
    fixed_pairs = collect_store(os.path.join(out, "fixed"), fixed, settings, args)
    lap("collection")
    demo.stage(2, 4, f"distilling the guidance-conditioned student and the fixed-scale "
                     f"student: {settings['iters']} steps each")
    students = {CONDITIONED: demo.distill(out, "run_conditioned", conditioned_pairs, settings,
                                          args, args.lambda_gan),
                FIXED: demo.distill(out, "run_fixed", fixed_pairs, settings, args,
                                    args.lambda_gan)}
    lap("distillation")
    demo.stage(3, 4, f"evaluating at guidance {', '.join(f'{g:g}' for g in eval_scales)} on "
                     f"{settings['eval_n']} held-out prompts and noises each")
    per_scale = evaluate_scales(out, students, eval_scales, settings, args)
    lap("evaluation")
    demo.stage(4, 4, "chart, grid and report")
    write_outputs(out, per_scale, students[CONDITIONED], scales, settings, args, stage_seconds,
                  start)
    print("\n" + "\n".join(sweep_table(per_scale)))
    print("\n" + "\n".join(closeness(per_scale, fixed, scales)))
    print(f"\nguidance sweep finished in {(time.perf_counter() - start) / 60:.1f} min: report "
          f"{os.path.join(out, 'report.md')} (the teacher is a toy)")
    return 0
