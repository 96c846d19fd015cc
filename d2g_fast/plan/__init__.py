"""``d2g plan``: the peak memory per GPU of a distillation run, predicted before the run.

The trainer's own networks are built from the teacher's configs on fake tensors and its real
step functions run on them under an allocation counter (:mod:`d2g_fast.plan.simulate`); the
parts that cannot be simulated (the optimiser step, FSDP's gathers, the CUDA context) follow
documented rules (:mod:`d2g_fast.plan.planner`); small real CPU runs calibrate and check the
prediction (:mod:`d2g_fast.plan.calibrate`).
"""
from d2g_fast.plan.planner import Plan, PlanRequest, plan

__all__ = ["Plan", "PlanRequest", "plan"]
