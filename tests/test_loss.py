"""Sub-cluster AdaCos: scale formula, probabilities, soft targets, the one-class degenerate case;
AdaProj: subspace similarities and the freedom they leave inside a class."""

import math

import pytest
import torch

from msn_edge.config import preset
from msn_edge.loss import AdaProj, SubClusterAdaCos, initial_scale, loss_head


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
    # The adaptive scale keeps the loss from reaching 0; the classes still separate.
    _fit_and_check(head, emb, target, steps=50)


def _fit_and_check(head, emb: torch.Tensor, target: torch.Tensor, steps: int) -> None:
    """Train `head` alone on fixed embeddings: the loss halves and >95 % are classified."""
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    first = head(emb, target).item()
    for _ in range(steps):
        opt.zero_grad()
        loss = head(emb, target)
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first
    predicted = head.log_probs(head.cosines(emb)).argmax(dim=1)
    assert (predicted == target.argmax(dim=1)).float().mean() > 0.95


def test_adaproj_similarity_is_the_projection_onto_the_class_subspace():
    head = AdaProj(4, 2, 2)
    # Class 0 spans e0, e1 (through vectors that are not orthonormal: QR fixes that); 1 e2, e3.
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[2.0, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 3]]))
    emb = torch.tensor([[3.0, -4, 0, 0], [0, 0, 5, 0], [1, 0, 1, 0]])
    cos = head.cosines(emb)
    assert cos.shape == (3, 2)
    h = 2**-0.5
    torch.testing.assert_close(cos, torch.tensor([[1.0, 0], [0, 1], [h, h]]), atol=1e-5, rtol=0)


def test_adaproj_leaves_clips_free_to_spread_inside_their_class():
    """The point of AdaProj (issue 9): anywhere in its class's subspace a clip is as close
    to its class as it can be, so training does not pull a class to one point; with
    Sub-cluster AdaCos only its K sub-cluster directions are."""
    torch.manual_seed(5)
    proj = AdaProj(8, 3, 4)
    basis, _ = torch.linalg.qr(proj.weight[:4].T.detach())  # class 0's subspace
    inside = torch.randn(6, 4) @ basis.T  # six different directions inside it
    torch.testing.assert_close(proj.cosines(inside)[:, 0], torch.ones(6), atol=1e-5, rtol=0)
    points = SubClusterAdaCos(8, 3, 4)
    with torch.no_grad():
        points.weight[:4] = proj.weight[:4]  # the same four vectors, as points
    own = points.cosines(inside)[:, :4].amax(dim=1)
    assert own.max().item() < 0.99 and (own.max() - own.min()).item() > 0.05


def test_adaproj_scale_and_sizes():
    head = AdaProj(8, 5, 3)
    assert head.scale.item() == pytest.approx(initial_scale(5, 1))
    assert head.weight.shape == (15, 8)
    with pytest.raises(ValueError, match="does not fit"):
        AdaProj(8, 2, 9)
    with pytest.raises(ValueError, match="unknown loss"):
        loss_head("arcface", 8, 2, 2)


def test_config_names_a_known_loss():
    cfg = preset("tiny")
    with pytest.raises(ValueError, match="train.loss"):
        type(cfg).from_dict({**cfg.to_dict(), "train": {**cfg.to_dict()["train"], "loss": "x"}})


def test_training_adaproj_separates_six_classes():
    torch.manual_seed(6)
    head = loss_head("adaproj", 8, 6, 1)
    # Orthogonal centres, not antipodal ones: a subspace holds x and -x alike. Six
    # classes: with AdaCos' rule the scale grows with ln(number of non-target classes).
    labels = torch.arange(60) % 6
    emb = torch.randn(60, 8) * 0.5 + 3 * torch.eye(8)[labels]
    target = torch.nn.functional.one_hot(labels, 6).float()
    _fit_and_check(head, emb, target, steps=100)
