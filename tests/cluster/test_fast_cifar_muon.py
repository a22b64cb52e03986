"""fast_cifar_muon's own pieces (Muon, progressive resizing, the linear decay) on tiny tensors; the recipe's
resume through the loop is in test_fast_cifar.py, beside fast_cifar's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cluster.recipes import fast_cifar_muon as fm
from cluster.recipes.fast_cifar import FastNet, flip_and_translate
from cluster.recipes.schedules import linear_decay
from tests.cluster.test_fast_cifar import spec


@pytest.mark.parametrize("shape", [(64, 32, 3, 3), (288, 32)])  # a filter bank; a tall matrix
def test_orthogonalized_keeps_the_directions_and_evens_out_the_singular_values(shape):
    g = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    g[0] *= 50  # one direction dominates the raw gradient
    out = fm.orthogonalized(g)
    assert out.shape == g.shape and out.dtype == g.dtype
    flat = out.reshape(len(g), -1)
    singular = torch.linalg.svdvals(flat)
    assert singular.min() > 0.3 and singular.max() < 1.6, singular
    u, _, vh = torch.linalg.svd(g.reshape(len(g), -1), full_matrices=False)
    exact = u @ vh  # U V^T: what the iteration approximates
    assert F.cosine_similarity(flat.flatten(), exact.flatten(), dim=0) > 0.95


def test_muon_steps_other_groups_as_nesterov_sgd_with_weight_decay():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(5, 3))
    b = torch.nn.Parameter(a.detach().clone())
    muon = fm.Muon([{"params": [a], "lr": 0.1, "weight_decay": 0.01}], momentum=0.85)
    sgd = torch.optim.SGD([b], lr=0.1, momentum=0.85, weight_decay=0.01, nesterov=True)
    for _ in range(4):
        grad = torch.randn(5, 3)
        a.grad, b.grad = grad.clone(), grad.clone()
        muon.step()
        sgd.step()
    torch.testing.assert_close(a, b)


def test_muon_steps_filters_by_the_orthogonalized_momentum_at_a_fixed_norm():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(8, 4, 3, 3) * 3)
    start = w.detach().clone()
    muon = fm.Muon([{"params": [w], "lr": 0.2, "momentum": 0.6, "orthogonal": True}], momentum=0.85)
    w.grad = torch.randn(8, 4, 3, 3)
    muon.step()
    # first step: the momentum buffer is the gradient, so Nesterov's step direction is (1 + 0.6) x the gradient
    expected = start * 8 ** 0.5 / start.norm() - 0.2 * fm.orthogonalized(w.grad.add(w.grad, alpha=0.6))
    torch.testing.assert_close(w.detach(), expected)
    w.grad = torch.randn(8, 4, 3, 3)
    before = w.detach().clone()
    muon.step()
    assert (w.detach() - before * 8 ** 0.5 / before.norm()).norm() > 0  # it moved from the renormalized point
    assert muon.state[w]["momentum_buffer"].shape == w.shape


def test_muon_optimizer_puts_every_trained_parameter_in_one_group():
    model = FastNet(spec())
    optimizer = fm.muon_optimizer(model, lr=0.24, momentum=0.85, batch_size=2000)
    filters, biases, head = optimizer.param_groups
    trained = [p for p in model.parameters() if p.requires_grad]
    grouped = [p for group in optimizer.param_groups for p in group["params"]]
    assert len(grouped) == len(trained) and {id(p) for p in grouped} == {id(p) for p in trained}
    assert filters["orthogonal"] and len(filters["params"]) == 6 and all(p.dim() == 4 for p in filters["params"])
    assert filters["momentum"] == fm.MUON_MOMENTUM and biases["momentum"] == head["momentum"] == 0.85
    assert not biases["orthogonal"] and any(p is model.whiten.bias for p in biases["params"])
    assert head["params"] == [model.head.weight]
    # airbench94_muon's rates at its own batch and rate: 0.053 per image for the summed loss = 106 for the mean
    assert biases["lr"] == pytest.approx(0.053 * 2000)
    assert biases["lr"] * biases["weight_decay"] == pytest.approx(2e-6 * 2000)  # the share lost per step
    doubled = fm.muon_optimizer(model, lr=0.48, momentum=0.85, batch_size=2000).param_groups
    assert [g["lr"] for g in doubled] == pytest.approx([2 * g["lr"] for g in optimizer.param_groups])


def test_progressive_resizing_shrinks_all_but_the_last_epochs():
    assert [fm.side_in_epoch(e, 7, 32) for e in range(1, 8)] == [20, 22, 24, 26, 28, 32, 32]
    assert [fm.side_in_epoch(e, 3, 32) for e in (1, 2, 3)] == [28, 32, 32]
    assert [fm.side_in_epoch(e, 2, 32) for e in (1, 2)] == [32, 32]
    assert {fm.side_in_epoch(e, 7, 16) for e in range(1, 8)} == {16}  # never under FastNet's smallest
    x = torch.randn(6, 3, 32, 32).to(memory_format=torch.channels_last)
    indices = torch.arange(6)
    augment = fm.progressive(flip_and_translate, epochs=7)
    for epoch, side in ((1, 20), (3, 24), (6, 32)):
        torch.manual_seed(epoch)
        out = augment(x, indices, epoch)
        torch.manual_seed(epoch)
        expected = flip_and_translate(x, indices, epoch)
        if side != 32:
            expected = F.interpolate(expected, size=(side, side), mode="bilinear", antialias=True)
        assert out.shape == (6, 3, side, side) and out.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(out, expected)
    torch.manual_seed(0)
    small = augment(torch.ones(2, 3, 32, 32), torch.arange(2), 1)
    torch.testing.assert_close(small, torch.ones(2, 3, 20, 20))  # a scaled constant image stays constant


def test_linear_decay():
    assert [linear_decay(step, 4) for step in range(4)] == [1.0, 0.75, 0.5, 0.25]


def test_fast_net_trains_on_the_small_side():
    torch.manual_seed(0)
    model = FastNet(spec(32))
    out = model(fm.progressive(flip_and_translate, 7)(torch.randn(4, 3, 32, 32), torch.arange(4), 1))
    assert out.shape == (4, 10) and torch.isfinite(out).all()
