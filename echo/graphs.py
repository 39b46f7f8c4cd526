"""Replay a whole training or evaluation step as one CUDA graph.

A model of the paper (conv, batch 100, 32 latents) is far too small to fill a GPU: eager
PyTorch spends most of a step launching a few hundred small kernels from Python. Capturing the
step once -- forward, backward and the Adam update -- and replaying the captured graph turns
those launches into one ("whole-network capture", PyTorch's CUDA semantics notes).

`GraphedStep(fn)` wraps a function of one batch that returns a tensor (the metric sums of the
step). On CUDA its first `warmup` calls run eagerly on a side stream (as the notes require:
lazy initialisation, cuDNN's algorithm choice), the next call captures `fn` for that batch
shape, and every later call of that shape copies the batch into the captured input and replays.
A batch of another shape (a short last batch) runs eagerly. The tensor returned by a replay is
the graph's static output: consume it before the next call. Random numbers (the Echo noise,
Gaussian samples) are drawn afresh at every replay: the graph advances the CUDA generator.

Everything `fn` does must be capturable: no host synchronisation (`.item()`, `bool(tensor)`,
data-dependent shapes), and an optimizer that keeps its step count and learning rate on the
device (`graph_ready_adam`). A step that cannot be captured raises `GraphCaptureError` naming
the fix (turn the option off): a failed capture leaves the CUDA generator in capture mode
(PyTorch 2.x), so no eager fallback could draw random numbers in that process afterwards. On the
CPU the step always runs eagerly.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


class GraphCaptureError(RuntimeError):
    """The step could not be captured as a CUDA graph (it synchronises with the host, or uses
    an operation graphs do not support); train without `cuda_graph`."""


class GraphedStep:
    def __init__(self, fn: Callable[[Tensor], Tensor], *, enabled: bool = True, warmup: int = 3):
        self.fn = fn
        self.enabled = enabled
        self.warmup = warmup
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_x: Tensor | None = None
        self.static_out: Tensor | None = None

    @property
    def replaying(self) -> bool:
        return self.graph is not None

    def __call__(self, x: Tensor) -> Tensor:
        if not self.enabled or x.device.type != "cuda":
            return self.fn(x)
        if self.graph is not None:
            if x.shape != self.static_x.shape:
                return self.fn(x)
            self.static_x.copy_(x)
            self.graph.replay()
            return self.static_out
        if self.calls < self.warmup:
            self.calls += 1
            side = torch.cuda.Stream(device=x.device)
            side.wait_stream(torch.cuda.current_stream(x.device))
            with torch.cuda.stream(side):
                out = self.fn(x)
            torch.cuda.current_stream(x.device).wait_stream(side)
            return out
        return self._capture(x)

    def _capture(self, x: Tensor) -> Tensor:
        static_x = x.clone()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                static_out = self.fn(static_x)
        except Exception as err:  # capture raises several types (RuntimeError, AssertionError)
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise GraphCaptureError(
                f"this training step cannot be captured as a CUDA graph ({reason}); it must not "
                f"synchronise with the host (.item(), bool(tensor), data-dependent shapes). "
                f"Train without cuda_graph (TrainConfig.cuda_graph=False, --no-cuda-graph, "
                f"train.cuda_graph: false in params.yaml)") from err
        self.graph, self.static_x, self.static_out = graph, static_x, static_out
        # Capture only recorded the kernels: run them once for this batch.
        graph.replay()
        return static_out


def graph_ready_adam(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Make an Adam capturable in place: step counts and learning rates live on the device, so a
    replayed update reads the current learning rate (the schedule writes it with `fill_`) rather
    than the one at capture time, and nothing synchronises with the host.

    `initial_lr` stays a Python float, so LambdaLR computes the schedule on the host and writes
    it without reading the device back. Call after `load_state_dict` too: a checkpoint written
    by an eager run restores float learning rates and host step counts."""
    for group in optimizer.param_groups:
        lr = float(group["lr"])
        group["initial_lr"] = float(group.get("initial_lr", lr))
        group["lr"] = torch.tensor(lr, device=device)
        group["capturable"] = True
    for state in optimizer.state.values():
        if "step" in state:
            state["step"] = torch.as_tensor(state["step"], dtype=torch.float32).to(device)


def portable_optimizer_state(state: dict) -> dict:
    """An optimizer state_dict with device learning rates turned back into floats, so that a
    checkpoint of a graphed run resumes anywhere (CPU, eager) like one of an eager run."""
    for group in state["param_groups"]:
        if isinstance(group.get("lr"), Tensor):
            group["lr"] = float(group["lr"])
        group["capturable"] = False
    return state
