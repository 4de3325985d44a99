"""Sub-cluster AdaCos: scale formula, probabilities, soft targets, the one-class degenerate case."""

import math

import pytest
import torch

from msn_edge.loss import SubClusterAdaCos, initial_scale


def test_initial_scale_is_sqrt2_ln_ck_minus_1():
    assert initial_scale(4, 16) == pytest.approx(math.sqrt(2) * math.log(63))
    assert initial_scale(1, 16) == pytest.approx(math.sqrt(2) * math.log(15))
    # C·K − 1 ≤ 1 would give a zero or undefined scale: guarded to a positive one.
    assert initial_scale(1, 1) > 0 and initial_scale(1, 2) > 0
    head = SubClusterAdaCos(8, 3, 16)
    assert head.scale.item() == pytest.approx(math.sqrt(2) * math.log(47), rel=1e-6)


def test_class_probabilities_sum_sub_clusters_and_to_one():
    torch.manual_seed(0)
    head = SubClusterAdaCos(8, 3, 4)
    emb = torch.randn(5, 8)
    cos = head.cosines(emb)
    probs = head.log_probs(cos).exp()
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(5))
    # Class probability = sum of its sub-clusters' softmax outputs.
    sub = torch.softmax(head.scale * cos, dim=1).view(5, 3, 4).sum(dim=2)
    torch.testing.assert_close(probs, sub)


def test_loss_is_cross_entropy_against_soft_targets():
    torch.manual_seed(1)
    head = SubClusterAdaCos(8, 3, 4).eval()  # eval: the scale stays fixed
    emb = torch.randn(4, 8)
    target = torch.tensor([[0.7, 0.3, 0.0], [0.1, 0.1, 0.8], [1.0, 0, 0], [0, 0.5, 0.5]])
    log_p = head.log_probs(head.cosines(emb))
    expected = -(target * log_p).sum(dim=1).mean()
    torch.testing.assert_close(head(emb, target), expected)
    # A one-hot target reduces to plain NLL of that class.
    one_hot = torch.nn.functional.one_hot(torch.tensor([2, 0, 1, 1]), 3).float()
    torch.testing.assert_close(
        head(emb, one_hot), torch.nn.functional.nll_loss(log_p, torch.tensor([2, 0, 1, 1]))
    )


def test_one_class_loss_and_gradient_are_identically_zero():
    """The degenerate case of issue 7: one class teaches the network nothing."""
    torch.manual_seed(2)
    head = SubClusterAdaCos(16, 1, 16)
    emb = torch.randn(6, 16, requires_grad=True)
    loss = head(emb, torch.ones(6, 1))
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    assert emb.grad.abs().max().item() < 1e-6
    assert head.weight.grad.abs().max().item() < 1e-6
    # With two classes the same embeddings do get a gradient.
    head2 = SubClusterAdaCos(16, 2, 16)
    emb.grad = None
    head2(emb, torch.tensor([[1.0, 0.0]] * 3 + [[0.0, 1.0]] * 3)).backward()
    assert emb.grad.abs().max().item() > 1e-3


def test_scale_follows_the_adacos_rule():
    torch.manual_seed(3)
    c, k = 4, 2
    head = SubClusterAdaCos(8, c, k)
    emb = torch.randn(10, 8)
    labels = torch.arange(10) % c
    target = torch.nn.functional.one_hot(labels, c).float()
    s0 = head.scale.item()
    cos = head.cosines(emb)
    head(emb, target)
    # Reference computation, one-hot targets: non-target sum and median target angle.
    mask = ~target.bool().repeat_interleave(k, dim=1)
    b_avg = ((s0 * cos).exp() * mask).sum(dim=1).mean()
    theta = cos.acos().view(10, c, k).amin(dim=2)[torch.arange(10), labels]
    expected = b_avg.log().item() / math.cos(min(math.pi / 4, theta.median().item()))
    assert head.scale.item() == pytest.approx(expected, rel=1e-4)
    # Eval mode leaves the scale alone; one class (no non-target mass) keeps it too.
    s1 = head.scale.item()
    head.eval()(emb, target)
    assert head.scale.item() == s1
    one = SubClusterAdaCos(8, 1, k)
    before = one.scale.item()
    one(emb, torch.ones(10, 1))
    assert one.scale.item() == before


def test_training_the_head_separates_two_classes():
    torch.manual_seed(4)
    head = SubClusterAdaCos(2, 2, 4)
    emb = torch.cat([torch.randn(20, 2) + 3, torch.randn(20, 2) - 3])
    target = torch.cat([torch.tensor([[1.0, 0.0]] * 20), torch.tensor([[0.0, 1.0]] * 20)])
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    first = head(emb, target).item()
    for _ in range(50):
        opt.zero_grad()
        loss = head(emb, target)
        loss.backward()
        opt.step()
    # The adaptive scale keeps the loss from reaching 0; the classes still separate.
    assert loss.item() < 0.5 * first
    predicted = head.log_probs(head.cosines(emb)).argmax(dim=1)
    assert (predicted == target.argmax(dim=1)).float().mean() > 0.95
