"""``d2g bench``: measurements a user runs on their own hardware.

    d2g bench gpu-days --arch sd15 --out DIR    what a whole distillation costs here (gpu_days)

Modules: archs (the teacher architectures from their configs, random weights), timing,
collect_speed (ODE-pair collection providers), train_speed (the trainer's full step),
loss_speed (E-LatentLPIPS vs pixel LPIPS with decode), gpu_days (the command), report.
"""
