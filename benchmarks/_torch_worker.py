"""PyTorch side of the benchmarks, run as a worker process in an environment with torch (and
diffusers): ``python _torch_worker.py conv`` or ``python _torch_worker.py diffusers BATCH``.

It imports no JAX. It prints one JSON line of versions, then answers one JSON request per line
on stdin with ``{"s": seconds per call}`` (best of the request's repeats), and stays idle between
requests, so the benchmark can time JAX and PyTorch alternately on a shared machine. torch and
diffusers are never dependencies of jaxdiff.
"""

from __future__ import annotations

import json
import math
import sys
import time


def _best_of(fn, reps: int, k: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(k):
            fn()
        times.append((time.perf_counter() - t0) / k)
    return min(times)


def conv_timer(x_shape, w_shape, stride):
    """One forward and backward (input and kernel gradients) of a convolution, NCHW."""
    import torch
    import torch.nn.functional as F

    b, h, w, cin = x_shape
    kh, kw, _, cout = w_shape
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(b, cin, h, w, generator=gen, requires_grad=True)
    k = (0.05 * torch.randn(cout, cin, kh, kw, generator=gen)).requires_grad_()

    def run():
        x.grad = k.grad = None
        y = F.conv2d(x, k, stride=stride, padding=kh // 2)
        y.backward(y.detach())

    return run


def diffusers_step(batch: int):
    """diffusers' ``UNet2DModel`` (64-128-128, 6,469,889 parameters) train step on 16x16x1:
    noise, MSE on the noise, Adam, global-norm clipping, EMA (what jaxdiff's step does)."""
    import diffusers
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    net = diffusers.UNet2DModel(
        sample_size=16, in_channels=1, out_channels=1, block_out_channels=(64, 128, 128),
        layers_per_block=2, down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    )  # fmt: skip
    params = list(net.parameters())
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.Adam(params, lr=1e-4)
    x0 = 2 * torch.rand(batch, 1, 16, 16) - 1

    def step():
        t = 1e-3 + (1 - 1e-3) * torch.rand(batch)
        alpha, sigma = torch.cos(0.5 * math.pi * t), torch.sin(0.5 * math.pi * t)
        eps = torch.randn_like(x0)
        x_t = alpha[:, None, None, None] * x0 + sigma[:, None, None, None] * eps
        loss = F.mse_loss(net(x_t, 999 * t).sample, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, params, 1e-3)

    step()  # warm-up
    info = {"diffusers": diffusers.__version__, "params": sum(p.numel() for p in params)}
    return step, info


def main(argv):
    import torch

    info = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    if argv[0] == "diffusers":
        step, more = diffusers_step(int(argv[1]))
        info.update(more)
    print(json.dumps(info), flush=True)
    timers = {}
    for line in sys.stdin:
        req = json.loads(line)
        if argv[0] == "diffusers":
            fn = step
        else:
            key = (tuple(req["x"]), tuple(req["w"]), req["stride"])
            if key not in timers:
                timers[key] = conv_timer(*key)
                timers[key]()  # warm-up
            fn = timers[key]
        print(json.dumps({"s": _best_of(fn, req.get("reps", 1), req["k"])}), flush=True)


class Worker:
    """Start the worker with ``python`` (the environment with torch) and talk to it."""

    def __init__(self, python: str, *args: str):
        import subprocess
        from pathlib import Path

        cmd = [python, str(Path(__file__).resolve()), *args]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the torch worker did not start: {' '.join(cmd)}")
        self.info = json.loads(line)

    def time(self, pause: float = 0.2, **request) -> float:
        """Seconds per call of the request; ``pause`` lets the other side's threads go idle."""
        time.sleep(pause)
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        seconds = json.loads(self.proc.stdout.readline())["s"]
        time.sleep(pause)
        return seconds

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()


if __name__ == "__main__":
    main(sys.argv[1:])
