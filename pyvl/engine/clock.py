"""Stage times of one request on the device's own timeline, without making the host wait for the device.

On CUDA a mark is a recorded CUDA event: the engine thread never synchronises to take it, and a stage's time is
read (``Event.elapsed_time``) only once the request has delivered a token, by which point the engine has read
that token on the host, so every earlier event has completed. On the CPU, where each op returns when it is done,
a mark is simply the wall time.
"""

from __future__ import annotations

import time

import torch

__all__ = ["StageClock"]


class StageClock:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        """A point on the device's timeline: a recorded CUDA event, or the wall time in seconds."""
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    @staticmethod
    def seconds(start, end) -> float:
        """Device time between two marks; the end must be reached (on CUDA it is waited for if not)."""
        if isinstance(start, float):
            return end - start
        end.synchronize()
        return start.elapsed_time(end) / 1e3
