"""CUDA-graph replay of the teacher UNet's forward.

A 50-step sample of a batch launches the same ~1000 UNet kernels 50 times; at the batch sizes that
fit pair collection, launching them from Python costs a large part of the step. A CUDA graph
captures the launches once per input shape and replays them with one call. Inputs are copied into
static buffers before each replay; the output buffer is reused, so callers must consume it before
the next call (the sampler does: guidance and the scheduler step read it at once).

If the capture fails (an op that cannot be captured, an old driver), the wrapper warns once and
runs the UNet eagerly from then on.
"""
from __future__ import annotations

import warnings

import torch


class GraphedUNet:
    """Callable with the UNet's signature as the sampler uses it:
    ``(sample, timestep, encoder_hidden_states=..., added_cond_kwargs=..., return_dict=False)``.
    ``timestep`` must be a tensor (on the GPU or the host)."""

    def __init__(self, unet, warmup: int = 2):
        self.unet = unet
        self.warmup = warmup
        self.graphs: dict = {}
        self.failed: str | None = None

    @staticmethod
    def _flat(sample, timestep, hidden, added):
        tensors = {"sample": sample, "timestep": torch.as_tensor(timestep), "hidden": hidden}
        for k, v in sorted((added or {}).items()):
            tensors[f"added.{k}"] = v
        return tensors

    def _run(self, tensors):
        added = {k[len("added."):]: v for k, v in tensors.items() if k.startswith("added.")}
        return self.unet(tensors["sample"], tensors["timestep"],
                         encoder_hidden_states=tensors["hidden"],
                         added_cond_kwargs=added or None, return_dict=False)[0]

    def _capture(self, tensors):
        device = tensors["sample"].device
        static = {k: v.to(device).clone(memory_format=torch.preserve_format)
                  for k, v in tensors.items()}
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up off the capture stream (cuDNN/cuBLAS set-up)
            for _ in range(self.warmup):
                self._run(static)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self._run(static)
        return graph, static, out

    def __call__(self, sample, timestep, encoder_hidden_states=None, added_cond_kwargs=None,
                 return_dict=False):
        tensors = self._flat(sample, timestep, encoder_hidden_states, added_cond_kwargs)
        if self.failed is not None or sample.device.type != "cuda":
            return (self._run(tensors),)
        key = tuple((k, tuple(v.shape), v.dtype, v.stride()) for k, v in tensors.items())
        if key not in self.graphs:
            try:
                self.graphs[key] = self._capture(tensors)
            except Exception as exc:  # noqa: BLE001 - any capture failure falls back to eager
                self.failed = f"{type(exc).__name__}: {exc}"
                warnings.warn(f"cuda_graphs: capture failed ({self.failed}); the UNet runs "
                              f"eagerly", RuntimeWarning, stacklevel=2)
                return (self._run(tensors),)
        graph, static, out = self.graphs[key]
        for k, v in tensors.items():
            static[k].copy_(v, non_blocking=True)
        graph.replay()
        return (out,)
