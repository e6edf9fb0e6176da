"""FSDP2 over the NF4 base: each rank holds ~1/N of every NF4 linear's packed codes and block
scales, and a layer is all-gathered just before it runs (forward, and the forward recomputed by
gradient checkpointing or needed by its backward) and freed after.

Note (why frozen parameters, not a tensor subclass): `NF4Linear` keeps its data as module buffers,
which `fully_shard` replicates. Two ways make them shardable: (1) frozen `nn.Parameter`s
(requires_grad=False), which `fully_shard` shards on dim 0 like any parameter, or (2) a tensor
subclass implementing FSDP2's `fsdp_pre_all_gather`/`fsdp_post_all_gather` (torchao's NF4Tensor
does this, with its own layout). Torch 2.13 with gloo does (1) as is: the data are 1-D (packed
uint8, float32 or uint8 absmax, nested scales, code tables), FSDP2 all-gathers a group of mixed
dtypes through one uint8 buffer, frozen parameters need no reduce-scatter, and the all-gathered
tensors are plain tensors that every NF4 op path (host numpy decoder, torch reference, Triton)
takes unchanged, bit for bit. (2) would wrap every op in a subclass dispatch table for nothing the
parameters cannot do; (1) is chosen.

One catch: the CPU host path hands the gathered codes to numpy, and `Tensor.numpy()` marks a
storage as not resizable, while FSDP2 frees an unsharded parameter by resizing its storage to 0.
`ShardedNF4Linear` therefore gives the ops a private copy of the gathered data on that path (a
memcpy of 4.1 bits per weight, small beside the dequantization) and, in its autograd function,
saves the module instead of the weight: backward reads the data FSDP2 has gathered again for it.

LoRA adapters (and every other parameter: embeddings, norms, the head) are left out of sharding
(`ignored_params`) and stay replicated: adapters are a few MB, so their gradients are summed by
one all-reduce (`distributed.all_reduce_sum`) and every rank runs the same optimizer step on the
same values; the optimizer state stays the single-process one, and checkpoints need no gather.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor

from . import ops
from .dispatch import use_host
from .nf4_linear import _BUFFERS, NF4Linear
from .nf4_weight import NF4Weight


class _ShardedNF4Matmul(torch.autograd.Function):
    """y = x @ W^T with W read from the module at each call (FSDP2 gathers it for both calls)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, module: ShardedNF4Linear) -> torch.Tensor:
        ctx.module = module
        return ops.linear(x, module.gathered_weight())

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None
        return ops.linear_grad_input(grad_out, ctx.module.gathered_weight()), None


class ShardedNF4Linear(NF4Linear):
    """An NF4Linear whose data are frozen parameters that FSDP2 shards (see the module note).
    Made by `shard_nf4_linears`; outside its forward the parameters are DTensor shards."""

    def gathered_weight(self) -> NF4Weight:
        """The NF4 weight as FSDP2 has all-gathered it (call inside forward or backward only)."""
        tensors = {n: getattr(self, n) for n in _BUFFERS}
        if isinstance(tensors["packed"], DTensor):
            raise RuntimeError("the NF4 weight is sharded here; it is gathered only inside forward")
        copy = use_host(tensors["packed"])  # numpy would pin the storage FSDP2 frees
        data = {
            n: None if t is None else (t.detach().clone() if copy else t.detach())
            for n, t in tensors.items()
        }
        return NF4Weight(**data, **self._meta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        y = _ShardedNF4Matmul.apply(x, self)
        return y if self.bias is None else y + self.bias.to(y.dtype)


def shard_nf4_linears(model: nn.Module, world_size: int, device: torch.device) -> DeviceMesh:
    """Shard every NF4Linear of `model` over the `world_size` ranks of the default process group,
    one FSDP2 group per linear (so one layer is whole at a time). FSDP2 puts the shards on
    `device`: a model built on the host never holds its whole NF4 base on the accelerator. Then
    `shard_root` (after the adapters are applied)."""
    mesh = init_device_mesh(device.type, (world_size,))
    for m in model.modules():
        if isinstance(m, NF4Linear):
            _to_parameters(m)
            fully_shard(m, mesh=mesh, reshard_after_forward=True)
    return mesh


def shard_root(model: nn.Module, mesh: DeviceMesh) -> None:
    """Make `model` the FSDP2 root over the sharded linears; every other parameter (adapters,
    embeddings, norms, head) is left out of sharding and stays replicated."""
    held = {p for p in model.parameters() if not isinstance(p, DTensor)}
    fully_shard(model, mesh=mesh, ignored_params=held)  # orders the groups' hooks
    # every entry point (forward, loss, generation's last_logits) runs hidden_states, which must
    # enter through the root, or each linear would become a root that never reshards
    if hasattr(model, "hidden_states"):
        register_fsdp_forward_method(model, "hidden_states")


def _to_parameters(m: NF4Linear) -> None:
    m.__class__ = ShardedNF4Linear
    for name in _BUFFERS:
        t = m._buffers.pop(name)
        if t is None:
            m.register_buffer(name, None)
        else:  # a fresh, resizable storage (a tensor from numpy cannot be freed by FSDP2)
            m.register_parameter(name, nn.Parameter(t.detach().clone(), requires_grad=False))


def resident_nf4_bytes(model: nn.Module) -> int:
    """The bytes of NF4 data this rank holds now: local shards, plus any layer gathered whole."""
    total = 0
    for m in model.modules():
        if not isinstance(m, NF4Linear):
            continue
        for name in _BUFFERS:
            t = getattr(m, name)
            if t is None:
                continue
            if isinstance(t, DTensor):
                t = t.to_local()
            total += t.untyped_storage().nbytes() if t.untyped_storage().nbytes() else 0
    return total


def nf4_bytes(model: nn.Module) -> int:
    """The bytes of the whole (unsharded) NF4 base: what one process holds."""
    total = 0
    for m in model.modules():
        if isinstance(m, NF4Linear):
            for name in _BUFFERS:
                t = getattr(m, name)
                if t is not None:
                    total += t.shape.numel() * t.element_size()
    return total
