"""k replicates of one MLP or CNN as one batched model: seeds s..s+k-1 trained at once, in one process.

Every parameter and buffer of the k nets is stacked along a leading replicate dimension k, so one optimizer over
`BatchedNet.parameters()` gives each replicate the update of its own optimizer when the optimizer is element-wise
(`is_elementwise`). Each replicate sees its own batch, normalizes over it, keeps its own running statistics and draws
its dropout masks from its own generator, bit for bit as a single net's nn.Dropout draws them on CPU.
Activations flow as (k, B, ...) views; batch norm, convolution and pooling see them as (B, k*C, ...), the layout in
which torch's own per-channel kernels keep the replicates apart. Nothing here may mix two replicates: a replicate that
diverges (NaN) must leave the others' numbers unchanged.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from descent.model import ACTIVATIONS, CNN, MLP
from descent.optim import CourseAdam, CourseRMSprop

# the optimizers whose update of an element reads only that element's gradient and state (and the step count):
# on stacked parameters they update each replicate as its own optimizer would. Not LBFGS (line search over all
# parameters), SparseAdam (sparse gradients only), Adafactor (row and column factored moments), Muon (orthogonalizes
# whole matrices).
ELEMENTWISE_OPTIMIZERS: frozenset[type[torch.optim.Optimizer]] = frozenset(
    {
        torch.optim.SGD,
        torch.optim.Adam,
        torch.optim.AdamW,
        torch.optim.RMSprop,
        torch.optim.Adagrad,
        torch.optim.Adamax,
        torch.optim.NAdam,
        torch.optim.RAdam,
        torch.optim.Adadelta,
        torch.optim.Rprop,
        torch.optim.ASGD,
        CourseRMSprop,
        CourseAdam,
    }
)


def is_elementwise(optimizer_class: type[torch.optim.Optimizer]) -> bool:
    """Whether one `optimizer_class` over stacked parameters updates each replicate as its own optimizer would.
    The class itself must be listed: a subclass may add a step that reads across elements."""
    return optimizer_class in ELEMENTWISE_OPTIMIZERS


def _stack(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    return torch.stack([tensor.detach() for tensor in tensors])


def _channels(x: torch.Tensor) -> torch.Tensor:
    """(k, B, C, ...) -> (B, k*C, ...): each replicate's channels side by side, a view where the layout allows."""
    return x.transpose(0, 1).reshape(x.shape[1], -1, *x.shape[3:])


def _replicates(y: torch.Tensor, k: int) -> torch.Tensor:
    """(B, k*C, ...) -> (k, B, C, ...), a view."""
    return y.view(y.shape[0], k, -1, *y.shape[2:]).transpose(0, 1)


class BatchedLinear(nn.Module):
    """k Linear layers as one batched matmul; weight stacked (k, in, out), the faster orientation for `bmm` on CPU."""

    def __init__(self, layers: Sequence[nn.Linear]) -> None:
        super().__init__()
        self.weight = nn.Parameter(_stack(layer.weight.mT for layer in layers).contiguous())
        self.bias = None if layers[0].bias is None else nn.Parameter(_stack(layer.bias for layer in layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is None:
            return torch.bmm(x, self.weight)
        return torch.baddbmm(self.bias.unsqueeze(1), x, self.weight)


class BatchedConv2d(nn.Module):
    """k Conv2d layers as one convolution with k times the groups; weight stacked (k, out, in/groups, kh, kw)."""

    def __init__(self, layers: Sequence[nn.Conv2d]) -> None:
        super().__init__()
        first = layers[0]
        self.stride, self.padding, self.dilation = first.stride, first.padding, first.dilation
        self.groups = first.groups
        self.weight = nn.Parameter(_stack(layer.weight for layer in layers))
        self.bias = None if first.bias is None else nn.Parameter(_stack(layer.bias for layer in layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = len(self.weight)
        y = F.conv2d(
            _channels(x),
            self.weight.flatten(0, 1),
            None if self.bias is None else self.bias.flatten(),
            self.stride,
            self.padding,
            self.dilation,
            k * self.groups,
        )
        return _replicates(y, k)


class BatchedBatchNorm(nn.Module):
    """k BatchNorm1d or BatchNorm2d layers as one F.batch_norm over k*C channels: each replicate's channels are
    normalized over its own batch and keep their own running statistics, (k, C) each."""

    def __init__(self, layers: Sequence[nn.BatchNorm1d | nn.BatchNorm2d]) -> None:
        super().__init__()
        self.eps, self.momentum = layers[0].eps, layers[0].momentum
        self.weight = nn.Parameter(_stack(layer.weight for layer in layers))
        self.bias = nn.Parameter(_stack(layer.bias for layer in layers))
        self.register_buffer("running_mean", _stack(layer.running_mean for layer in layers))
        self.register_buffer("running_var", _stack(layer.running_var for layer in layers))
        self.register_buffer("num_batches_tracked", _stack(layer.num_batches_tracked for layer in layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.num_batches_tracked.add_(1)
        y = F.batch_norm(
            _channels(x),
            self.running_mean.view(-1),
            self.running_var.view(-1),
            self.weight.flatten(),
            self.bias.flatten(),
            self.training,
            self.momentum,
            self.eps,
        )
        return _replicates(y, len(self.weight))


class BatchedDropout(nn.Module):
    """Dropout with replicate i's mask drawn from generator i, as CPU F.dropout draws it from the global generator
    (aten/src/ATen/native/Dropout.cpp: `empty_like(input).bernoulli_(1 - p)`, then `div_(1 - p)`, then `input * noise`):
    the same masks, bit for bit, as the single net's."""

    def __init__(self, p: float, generators: tuple[torch.Generator, ...]) -> None:
        super().__init__()
        self.p = p
        self.generators = generators

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        keep = 1 - self.p
        noise = torch.empty_like(x)  # x's strides: the product below runs over one layout
        for replicate, generator in zip(noise, self.generators, strict=True):
            replicate.bernoulli_(keep, generator=generator)  # fills in logical order, whatever the strides
        return x * noise.div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class BatchedPool(nn.Module):
    """A per-channel module (MaxPool2d) applied to the k replicates' channels side by side."""

    def __init__(self, pool: nn.Module) -> None:
        super().__init__()
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _replicates(self.pool(_channels(x)), len(x))


def _batched(layers: Sequence[nn.Module], generators: tuple[torch.Generator, ...]) -> nn.Module:
    """The batched form of one layer of k identically-configured nets."""
    first = layers[0]
    if isinstance(first, nn.Linear):
        return BatchedLinear(layers)
    if isinstance(first, nn.Conv2d):
        return BatchedConv2d(layers)
    if isinstance(first, nn.BatchNorm1d | nn.BatchNorm2d):
        return BatchedBatchNorm(layers)
    if isinstance(first, nn.Dropout):
        return BatchedDropout(first.p, generators)
    if isinstance(first, nn.MaxPool2d):
        return BatchedPool(copy.deepcopy(first))
    if isinstance(first, tuple(ACTIVATIONS.values())):
        return copy.deepcopy(first)  # element-wise and stateless: any layout
    raise TypeError(f"no batched form for {type(first).__name__}")


class BatchedNet(nn.Module):
    """k identically-configured MLPs or CNNs (each initialized by its own seed) as one model taking (k, B, F) inputs,
    replicate i's batch at [i], and returning (k, B, classes) logits. Parameters and buffers are the nets' own,
    stacked (k, ...) under the nets' own names; `generators[i]` draws replicate i's dropout masks, from the state a
    separate run of replicate i would have at its first training step, and is advanced in place as that run's global
    generator would be (the dropout layers share these objects: set their states, never replace them)."""

    def __init__(self, nets: Sequence[MLP | CNN], generators: Sequence[torch.Generator]) -> None:
        super().__init__()
        distinct = len({id(generator) for generator in generators})
        if not nets or len(nets) != len(generators) or distinct != len(generators):
            raise ValueError(
                f"BatchedNet needs one distinct generator per net, got {len(nets)} nets and {distinct} generators"
            )
        first = nets[0]
        if not isinstance(first, MLP | CNN) or any(
            type(net) is not type(first) or repr(net) != repr(first) for net in nets
        ):
            raise ValueError("BatchedNet needs k identically-configured MLPs or CNNs")
        self.generators = tuple(generators)
        self.input_shape: tuple[int, ...] | None = None
        if isinstance(first, CNN):
            if any(net.input_shape != first.input_shape for net in nets):
                raise ValueError("BatchedNet needs k CNNs of one input shape")
            self.input_shape = first.input_shape
            self.features = nn.Sequential(*self._layers([net.features for net in nets]))
            self.head = BatchedLinear([net.head for net in nets])
        else:
            for index, layer in enumerate(self._layers(nets)):
                self.add_module(str(index), layer)

    def _layers(self, sequences: Sequence[nn.Sequential]) -> list[nn.Module]:
        return [_batched(layers, self.generators) for layers in zip(*sequences, strict=True)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_shape is None:
            for layer in self.children():
                x = layer(x)
            return x
        k, batch = x.shape[:2]
        features = self.features(x.view(k, batch, *self.input_shape))
        return self.head(features.reshape(k, batch, -1))

    def replicate_state_dict(self, i: int) -> dict[str, torch.Tensor]:
        """Replicate i's parameters and buffers under the single net's keys, cloned: a strict `load_state_dict`
        into a fresh net of the same configuration gives replicate i."""
        state = {}
        for prefix, module in self.named_modules():
            tensors = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
            for name, tensor in tensors:
                value = tensor[i].mT if isinstance(module, BatchedLinear) and name == "weight" else tensor[i]
                state[f"{prefix}.{name}" if prefix else name] = value.detach().clone(
                    memory_format=torch.contiguous_format
                )
        return state

    @torch.no_grad()
    def load_replicate_state_dict(self, i: int, state: dict[str, torch.Tensor]) -> None:
        """Copy a single net's parameters and buffers (replicate_state_dict's keys, e.g. a best.ckpt's) into
        replicate i's slices, leaving the other replicates as they are."""
        expected = 0
        for prefix, module in self.named_modules():
            tensors = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
            for name, tensor in tensors:
                value = state[f"{prefix}.{name}" if prefix else name]
                tensor[i].copy_(value.mT if isinstance(module, BatchedLinear) and name == "weight" else value)
                expected += 1
        if expected != len(state):
            raise ValueError(f"replicate state has {len(state)} tensors, the batched net {expected}")

    def get_extra_state(self) -> dict[str, list[torch.Tensor]]:
        """The generators' states go into the state dict: a run resumed from a checkpoint draws the same masks."""
        return {"rng_states": [generator.get_state() for generator in self.generators]}

    def set_extra_state(self, state: dict[str, list[torch.Tensor]]) -> None:
        for generator, rng_state in zip(self.generators, state["rng_states"], strict=True):
            generator.set_state(rng_state)


@torch.no_grad()
def clip_grad_norm_per_replicate(
    parameters: Iterable[torch.Tensor], max_norm: float, norm_type: float = 2.0
) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ per replicate: replicate i's norm is over its slices [i] of every gradient,
    and only its slices are scaled. One global norm would let one replicate's gradients shrink the others'.
    Returns the k norms before clipping."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    norms = torch.stack([torch.linalg.vector_norm(g.flatten(1), norm_type, dim=1) for g in grads])
    total_norms = torch.linalg.vector_norm(norms, norm_type, dim=0)
    clip_coef = torch.clamp(max_norm / (total_norms + 1e-6), max=1.0)
    for g in grads:
        g.mul_(clip_coef.view(-1, *[1] * (g.dim() - 1)))
    return total_norms
