"""Tensor parallelism on torch.distributed: one model split over N ranks (GPUs, or CPU processes on gloo).

Rank 0 is the caller's process and runs the engine; the other ranks load only their shards and run each model
call rank 0 sends them. ``pyvl.load(..., tensor_parallel_size=N)`` is the way in; the parts:

  plan.py    which slice of which checkpoint tensor each rank holds, from the config alone (and its bytes)
  layers.py  the model cut down to one rank's shards, with the collectives where each block needs them
  comm.py    one rank's process groups: all-reduce, all-gather, broadcast, and the command channel
  load.py    a rank's slices read from the safetensors files (or random weights, for benchmarks)
  spec.py    what every rank loads (sent to the workers)
  launch.py  rank 0: start or join the group, run each command under one lock, end it all
  driver.py  rank 0: the engine's runner whose every model call also runs on the workers
  worker.py  ranks > 0: load, then run rank 0's commands
"""

from .plan import ShardPlan, split

__all__ = ["ShardPlan", "split"]
