"""k replicates as one BatchedNet against k separate nets, each run with the global RNG at its generator's state."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from descent.batched import (
    ELEMENTWISE_OPTIMIZERS,
    BatchedDropout,
    BatchedLinear,
    BatchedNet,
    clip_grad_norm_per_replicate,
    is_elementwise,
)
from descent.model import CNN, MLP
from descent.optim import CourseAdam, CourseRMSprop, course_momentum

K, BATCH, SHAPE, CLASSES = 3, 10, [8, 8], 10
ATOL = 1e-5  # the batched matmuls and grouped convolutions sum in another order than the single net's
NETS = {"mlp": (MLP, [16, 16]), "cnn": (CNN, [4, 6])}
SETTINGS = [(kind, bn, p) for kind in NETS for bn in (False, True) for p in (0.0, 0.3)]


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def generator_at(state: torch.Tensor) -> torch.Generator:
    generator = torch.Generator()
    generator.set_state(state)
    return generator


def replicates(kind: str, batch_norm: bool = True, dropout: float = 0.3) -> tuple[list[nn.Module], BatchedNet]:
    """K nets seeded 0..K-1 and the BatchedNet of copies of them, whose generators hold the global RNG state each
    seed leaves after building its net (that of a run at its first step)."""
    cls, widths = NETS[kind]
    nets, generators = [], []
    for seed in range(K):
        torch.manual_seed(seed)
        nets.append(cls(SHAPE, CLASSES, widths, batch_norm, dropout, "relu"))
        generators.append(generator_at(torch.get_rng_state()))
    copies = [cls(SHAPE, CLASSES, widths, batch_norm, dropout, "relu") for _ in range(K)]
    for copy, net in zip(copies, nets, strict=True):
        copy.load_state_dict(net.state_dict())
    return nets, BatchedNet(copies, generators)


def own_generators(batched: BatchedNet) -> list[torch.Generator]:
    """Copies of the batched net's generators, for the separate nets to draw the same masks from."""
    return [generator_at(generator.get_state()) for generator in batched.generators]


def batches(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 + seed)
    x = torch.randn(K, BATCH, 64, generator=generator)
    return x, torch.randint(0, CLASSES, (K, BATCH), generator=generator)


def loss_of(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The sum of the replicates' mean losses: replicate i's gradient is that of its own mean loss."""
    return F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(K, -1).mean(1).sum()


def single_step(net: nn.Module, generator: torch.Generator, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Net's forward and backward with the global RNG at `generator`'s state, which then takes the global one."""
    torch.set_rng_state(generator.get_state())
    logits = net(x)
    F.cross_entropy(logits, y).backward()
    generator.set_state(torch.get_rng_state())
    return logits.detach()


def grads(batched: BatchedNet, i: int) -> dict[str, torch.Tensor]:
    """Replicate i's slices of the stacked gradients, under the single net's names and in its orientation."""
    out = {}
    for name, p in batched.named_parameters():
        owner = batched.get_submodule(name.rpartition(".")[0])
        out[name] = p.grad[i].mT if isinstance(owner, BatchedLinear) and name.endswith("weight") else p.grad[i]
    return out


def assert_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], atol: float = ATOL) -> None:
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=atol, msg=name)


@pytest.mark.parametrize(("kind", "batch_norm", "dropout"), SETTINGS)
def test_each_replicate_is_its_own_net_in_training(kind: str, batch_norm: bool, dropout: float) -> None:
    nets, batched = replicates(kind, batch_norm, dropout)
    generators = own_generators(batched)
    x, y = batches(0)
    logits = batched(x)
    loss_of(logits, y).backward()
    for i, (net, generator) in enumerate(zip(nets, generators, strict=True)):
        want = single_step(net, generator, x[i], y[i])
        torch.testing.assert_close(logits[i], want, rtol=0, atol=ATOL)
        assert_close(grads(batched, i), {name: p.grad for name, p in net.named_parameters()})
        assert torch.equal(batched.generators[i].get_state(), generator.get_state())  # as many draws, no more


@pytest.mark.parametrize(("kind", "batch_norm", "dropout"), SETTINGS)
def test_eval_uses_each_replicates_running_stats_and_no_dropout(kind: str, batch_norm: bool, dropout: float) -> None:
    nets, batched = replicates(kind, batch_norm, dropout)
    generators = own_generators(batched)
    for step in range(2):
        x, y = batches(step)
        batched(x)
        for i, net in enumerate(nets):
            single_step(net, generators[i], x[i], y[i])
    batched.eval()
    states = [generator.get_state() for generator in batched.generators]
    x, _ = batches(2)
    with torch.no_grad():
        logits = batched(x)
        for i, net in enumerate(nets):
            torch.testing.assert_close(logits[i], net.eval()(x[i]), rtol=0, atol=ATOL)
    assert all(torch.equal(g.get_state(), s) for g, s in zip(batched.generators, states, strict=True))


@pytest.mark.parametrize("kind", NETS)
def test_batch_norm_keeps_each_replicates_running_stats(kind: str) -> None:
    nets, batched = replicates(kind, batch_norm=True, dropout=0.3)
    generators = own_generators(batched)
    for step in range(3):
        x, y = batches(step)
        loss_of(batched(x), y).backward()
        for i, net in enumerate(nets):
            single_step(net, generators[i], x[i], y[i])
    for i, net in enumerate(nets):
        want = {name: t for name, t in net.state_dict().items() if name.endswith(("running_mean", "running_var"))}
        got = {name: t for name, t in batched.replicate_state_dict(i).items() if name in want}
        assert want and got.keys() == want.keys()
        assert_close(got, want, atol=1e-6)
        tracked = {n: t for n, t in batched.replicate_state_dict(i).items() if n.endswith("num_batches_tracked")}
        assert all(int(t) == 3 for t in tracked.values())


@pytest.mark.parametrize("layout", ["replicate-first", "batch-first"])
@pytest.mark.parametrize("shape", [(BATCH, 16), (BATCH, 4, 5, 5)])
def test_dropout_masks_are_bit_identical_to_nn_dropout(layout: str, shape: tuple[int, ...]) -> None:
    x = torch.randn(K, *shape) if layout == "replicate-first" else torch.randn(shape[0], K, *shape[1:]).transpose(0, 1)
    generators = [torch.Generator().manual_seed(seed) for seed in range(K)]
    starts = [generator.get_state() for generator in generators]
    out = BatchedDropout(0.3, generators)(x)
    for i in range(K):
        torch.set_rng_state(starts[i])
        assert torch.equal(out[i], nn.Dropout(0.3)(x[i].contiguous()))
        assert torch.equal(generators[i].get_state(), torch.get_rng_state())


def _optimizers() -> dict[str, Callable[[list[torch.Tensor]], torch.optim.Optimizer]]:
    return {
        "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
        "adam-fused": lambda ps: torch.optim.Adam(ps, lr=1e-2, fused=True),
        "sgd-momentum": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True),
        "course-momentum": lambda ps: course_momentum(ps, lr=0.1),
        "rmsprop": lambda ps: torch.optim.RMSprop(ps, lr=1e-2),
        "rmsprop-centered": lambda ps: torch.optim.RMSprop(ps, lr=1e-2, momentum=0.9, centered=True),
        "adamw-amsgrad": lambda ps: torch.optim.AdamW(ps, lr=1e-2, amsgrad=True),
        "course-adam": lambda ps: CourseAdam(ps, lr=1e-2),
        "course-rmsprop": lambda ps: CourseRMSprop(ps, lr=1e-2),
        **{
            cls.__name__: (lambda ps, cls=cls: cls(ps, lr=1e-2))
            for cls in sorted(ELEMENTWISE_OPTIMIZERS, key=lambda cls: cls.__name__)
        },
    }


def _stacked_against_separate(make: Callable, steps: int = 3) -> tuple[BatchedNet, list[nn.Module]]:
    """`steps` updates from the same random gradients: one optimizer over the stacked parameters, one per net."""
    nets, batched = replicates("mlp")
    stacked = make(list(batched.parameters()))
    separate = [make(list(net.parameters())) for net in nets]
    generator = torch.Generator().manual_seed(7)
    for _ in range(steps):
        for p in batched.parameters():
            p.grad = torch.randn(p.shape, generator=generator)
        for i, (net, optimizer) in enumerate(zip(nets, separate, strict=True)):
            given = grads(batched, i)
            for name, p in net.named_parameters():
                p.grad = given[name].contiguous()
            optimizer.step()
        stacked.step()
    return batched, nets


@pytest.mark.parametrize("optimizer", list(_optimizers()))
def test_one_optimizer_over_stacked_parameters_steps_each_replicate_as_its_own(optimizer: str) -> None:
    """Bit for bit, but for the fused kernel: its vectorized body and its scalar remainder round apart, and where an
    element falls depends on its position in the (stacked or single) tensor."""
    batched, nets = _stacked_against_separate(_optimizers()[optimizer])
    for i, net in enumerate(nets):
        assert_close(batched.replicate_state_dict(i), net.state_dict(), atol=1e-7 if "fused" in optimizer else 0)


def test_a_factored_optimizer_does_not_step_replicates_apart() -> None:
    """The check above can fail: Adafactor factors a stacked (k, H) vector as a matrix, across the replicates."""
    assert not is_elementwise(torch.optim.Adafactor)
    batched, nets = _stacked_against_separate(lambda ps: torch.optim.Adafactor(ps, lr=1e-2))
    with pytest.raises(AssertionError):
        assert_close(batched.replicate_state_dict(0), nets[0].state_dict(), atol=1e-6)


@pytest.mark.parametrize("kind", NETS)
@pytest.mark.parametrize(
    "optimizer", ["adam", "adam-fused", "sgd-momentum", "rmsprop", "course-adam", "course-rmsprop"]
)
def test_training_steps_of_the_batched_net_equal_separate_runs(kind: str, optimizer: str) -> None:
    make = _optimizers()[optimizer]
    nets, batched = replicates(kind)
    generators = own_generators(batched)
    stacked = make(list(batched.parameters()))
    separate = [make(list(net.parameters())) for net in nets]
    for step in range(3):
        x, y = batches(step)
        stacked.zero_grad()
        loss_of(batched(x), y).backward()
        stacked.step()
        for i, (net, opt) in enumerate(zip(nets, separate, strict=True)):
            opt.zero_grad()
            single_step(net, generators[i], x[i], y[i])
            opt.step()
    for i, net in enumerate(nets):
        assert_close(batched.replicate_state_dict(i), net.state_dict())


@pytest.mark.parametrize("kind", NETS)
def test_replicate_state_dict_loads_strictly_into_a_fresh_net(kind: str) -> None:
    _, batched = replicates(kind)
    x, y = batches(0)
    loss_of(batched(x), y).backward()
    torch.optim.SGD(batched.parameters(), lr=0.1).step()  # weights and running stats no longer the initial ones
    batched.eval()
    x, _ = batches(1)
    with torch.no_grad():
        logits = batched(x)
    cls, widths = NETS[kind]
    for i in range(K):
        state = batched.replicate_state_dict(i)
        assert all(type(t) is torch.Tensor for t in state.values())
        fresh = cls(SHAPE, CLASSES, widths, True, 0.3, "relu")
        fresh.load_state_dict(state, strict=True)
        for t in state.values():
            t.add_(1)  # a clone: changing it leaves the batched net alone
        with torch.no_grad():
            torch.testing.assert_close(fresh.eval()(x[i]), logits[i], rtol=0, atol=ATOL)
    with torch.no_grad():
        assert torch.equal(batched(x), logits)


def test_per_replicate_clipping_equals_clip_grad_norm_of_each_net() -> None:
    nets, batched = replicates("cnn")
    generator = torch.Generator().manual_seed(3)
    for p in batched.parameters():
        p.grad = torch.randn(p.shape, generator=generator)
        p.grad[1] *= 1e-3  # replicate 1 below max_norm: left as it is
        p.grad[2] *= 10  # replicate 2 far above: one global norm would clip 0 by its norm
    want_norms = []
    for i, net in enumerate(nets):
        given = grads(batched, i)
        for name, p in net.named_parameters():
            p.grad = given[name].clone()
        want_norms.append(torch.nn.utils.clip_grad_norm_(net.parameters(), max_norm=5.0))
    norms = clip_grad_norm_per_replicate(batched.parameters(), max_norm=5.0)
    torch.testing.assert_close(norms, torch.stack(want_norms), rtol=1e-6, atol=0)  # the rows may sum in another order
    assert norms[0] > 5.0 > norms[1]
    for i, net in enumerate(nets):
        assert_close(grads(batched, i), {name: p.grad for name, p in net.named_parameters()}, atol=1e-6)


@pytest.mark.parametrize("kind", NETS)
def test_a_nan_replicate_leaves_the_others_unchanged(kind: str) -> None:
    x, y = batches(0)
    poisoned = x.clone()
    poisoned[1] = float("nan")
    results = []
    for inputs in (x, poisoned):
        _, batched = replicates(kind)
        optimizer = torch.optim.Adam(batched.parameters(), lr=1e-2, fused=True)
        logits = batched(inputs)
        loss_of(logits, y).backward()
        norms = clip_grad_norm_per_replicate(batched.parameters(), max_norm=0.1)
        optimizer.step()
        results.append(
            (
                logits.detach(),
                norms,
                {name: t.detach() for name, t in [*batched.named_parameters(), *batched.named_buffers()]},
            )
        )
    (clean, clean_norms, clean_state), (dirty, dirty_norms, dirty_state) = results
    assert dirty[1].isnan().all() and dirty_norms[1].isnan()
    for i in (0, 2):
        assert torch.equal(dirty[i], clean[i])
        assert torch.equal(dirty_norms[i], clean_norms[i])
        for name, tensor in clean_state.items():
            assert torch.equal(dirty_state[name][i], tensor[i]), name


def test_the_generators_travel_in_the_state_dict() -> None:
    _, batched = replicates("mlp")
    x, _ = batches(0)
    batched(x)
    _, resumed = replicates("mlp")
    resumed.load_state_dict(batched.state_dict())
    assert torch.equal(resumed(x), batched(x))


def test_nets_must_be_configured_alike() -> None:
    generators = [torch.Generator() for _ in range(2)]
    with pytest.raises(ValueError, match="identically-configured"):
        BatchedNet(
            [MLP(SHAPE, CLASSES, [16], True, 0.3, "relu"), MLP(SHAPE, CLASSES, [16], True, 0.2, "relu")], generators
        )
    with pytest.raises(ValueError, match="one distinct generator per net"):
        BatchedNet([MLP(SHAPE, CLASSES, [16], True, 0.3, "relu")], generators)
    with pytest.raises(ValueError, match="one distinct generator per net"):  # one stream shared: masks alike
        BatchedNet([MLP(SHAPE, CLASSES, [16], True, 0.3, "relu") for _ in range(2)], generators[:1] * 2)


def test_only_elementwise_optimizers_are_listed() -> None:
    assert is_elementwise(torch.optim.Adam) and is_elementwise(CourseAdam)
    for cls in (torch.optim.LBFGS, torch.optim.SparseAdam, torch.optim.Adafactor, torch.optim.Muon):
        assert not is_elementwise(cls)

    class Tweaked(torch.optim.Adam):
        pass

    assert not is_elementwise(Tweaked)
