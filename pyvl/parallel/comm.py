"""One rank's link to its tensor-parallel group: the collectives the sharded layers call, and the command channel.

Two process groups on one ``torch.distributed`` store, made for this model alone (no default group, no global
state: two models coexist, and closing one ends only its groups):
  data     NCCL on CUDA, gloo on the CPU: the all-reduces and all-gathers inside the forward, and the tensors a
           command carries (tiles, image-feature rows). A bounded timeout: a peer that hangs fails the call.
  control  gloo on the CPU: the pickled commands rank 0 sends (pyvl.parallel.driver). Workers wait on it between
           requests for as long as the model is idle, so it has no practical timeout; a peer that dies closes
           its sockets, and the wait fails at once.
A message is any picklable object; the tensors inside it (in lists and tuples) travel on the data group, on the
device, and the pickle carries only their shapes and dtypes.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = ["Comm", "COLLECTIVE_TIMEOUT"]

COLLECTIVE_TIMEOUT = timedelta(minutes=5)  # the longest one rank may wait for the others inside one call
_IDLE_WAIT = timedelta(days=3650)  # a worker waits for the next command as long as the model lives


@dataclass(frozen=True)
class _TensorSlot:
    """Where a message held a tensor: it follows the message on the data group."""

    shape: tuple[int, ...]
    dtype: torch.dtype


def _take_tensors(value, tensors: list[torch.Tensor]):
    """``value`` with its tensors replaced by slots, appended to ``tensors`` depth-first."""
    if isinstance(value, torch.Tensor):
        tensors.append(value.contiguous())
        return _TensorSlot(tuple(value.shape), value.dtype)
    if isinstance(value, (list, tuple)):
        return type(value)(_take_tensors(item, tensors) for item in value)
    return value


def _broadcast_options() -> dist.BroadcastOptions:
    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    return opts


class Comm:
    """Rank ``rank`` of ``world``: ``all_reduce`` (sum, in place), ``all_gather_last`` (uneven slices of the last
    dimension), ``broadcast`` (from rank 0) and the command channel (``send``/``receive``)."""

    def __init__(
        self,
        store: dist.Store,
        rank: int,
        world: int,
        device: torch.device,
        timeout: timedelta = COLLECTIVE_TIMEOUT,
    ):
        self.rank, self.world, self.device = rank, world, device
        # Both constructors wait until every rank has joined (bounded by the store's timeout).
        self._control = dist.ProcessGroupGloo(dist.PrefixStore("control", store), rank, world, _IDLE_WAIT)
        if device.type == "cuda":
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            self._data = dist.ProcessGroupNCCL(dist.PrefixStore("data", store), rank, world, options)
        else:
            self._data = dist.ProcessGroupGloo(dist.PrefixStore("data", store), rank, world, timeout)

    # ---- inside the forward (every rank, same order) ----------------------------------------------------------
    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` (contiguous) over the ranks, in place; returns it."""
        self._data.allreduce([tensor]).wait()
        return tensor

    def all_gather_last(self, tensor: torch.Tensor, sizes: tuple[int, ...]) -> torch.Tensor:
        """Every rank's slice of the last dimension (rank r's is ``sizes[r]`` wide), concatenated in rank order.

        The slices are padded to the widest, gathered in one call, and the padding dropped."""
        widest = max(sizes)
        local = tensor
        if tensor.shape[-1] < widest:
            local = torch.nn.functional.pad(tensor, (0, widest - tensor.shape[-1]))
        flat = local.contiguous().view(-1)
        gathered = torch.empty(self.world * flat.numel(), dtype=flat.dtype, device=flat.device)
        self._data._allgather_base(gathered, flat).wait()  # rank r's slice at [r * numel, (r + 1) * numel)
        gathered = gathered.view(self.world, *local.shape)
        return torch.cat([gathered[r, ..., :width] for r, width in enumerate(sizes)], dim=-1)

    def broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rank 0's ``tensor`` into every rank's (same shape and dtype), in place; returns it."""
        self._data.broadcast([tensor], _broadcast_options()).wait()
        return tensor

    # ---- the command channel ------------------------------------------------------------------------------------
    def send(self, message) -> None:
        """Rank 0: send ``message`` to every other rank (each is waiting in ``receive``); its tensors must be on
        this rank's device."""
        tensors: list[torch.Tensor] = []
        data = pickle.dumps(_take_tensors(message, tensors), protocol=pickle.HIGHEST_PROTOCOL)
        self._control_broadcast(torch.tensor([len(data)], dtype=torch.int64))
        self._control_broadcast(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        for tensor in tensors:
            self.broadcast(tensor)

    def receive(self):
        """Ranks > 0: wait for rank 0's next message (however long the model stays idle); its tensors arrive
        on this rank's device."""
        size = self._control_broadcast(torch.zeros(1, dtype=torch.int64))
        data = self._control_broadcast(torch.empty(int(size), dtype=torch.uint8))
        return self._put_tensors(pickle.loads(data.numpy().tobytes()))  # from our own rank 0, never a file

    def _put_tensors(self, value):
        """The message with each slot replaced by the tensor rank 0 broadcasts for it, depth-first."""
        if isinstance(value, _TensorSlot):
            return self.broadcast(torch.empty(value.shape, dtype=value.dtype, device=self.device))
        if isinstance(value, (list, tuple)):
            return type(value)(self._put_tensors(item) for item in value)
        return value

    def _control_broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        self._control.broadcast([tensor], _broadcast_options()).wait()
        return tensor

    def close(self) -> None:
        """Leave both groups (pending calls on other ranks fail rather than wait)."""
        for group in (self._data, self._control):
            group.abort()
