"""The semi-supervised objective: ramp, confidence filter, perturbation geometry, consistency loss."""

import contextlib

import torch

from fssl_covid.config import ConfigError, resolve_config
from fssl_covid.networks import build_network
from fssl_covid.ssl import (ConsistencyObjective, Perturbation, cutmix, masked_consistency_loss, pseudo_labels,
                            sigmoid_rampup, teacher_probabilities, unsup_weight)

import pytest


def test_rampup_is_zero_during_warmup_then_reaches_one():
    assert sigmoid_rampup(0, warmup=2, length=4) == 0.0
    assert sigmoid_rampup(1.9, warmup=2, length=4) == 0.0
    values = [sigmoid_rampup(t, warmup=2, length=4) for t in (2, 3, 4, 5, 6)]
    assert values == sorted(values) and values[0] < 0.01 and values[-1] == 1.0
    cfg = resolve_config({"ssl": {"unsup_weight": 0.5, "warmup_epochs": 1, "rampup_epochs": 0}})["ssl"]
    assert unsup_weight(cfg, 0) == 0.0 and unsup_weight(cfg, 1) == 0.5
    cfg["final_supervised_epochs"] = 3  # off in the last 3 of 10 epochs, whatever the ramp says
    assert [unsup_weight(cfg, e, total_epochs=10) for e in (6, 6.9, 7, 9.5)] == [0.5, 0.5, 0.0, 0.0]
    assert unsup_weight(cfg, 9) == 0.5  # without a horizon there is no end to count back from
    cfg["enabled"] = False
    assert unsup_weight(cfg, 10) == 0.0
    with pytest.raises(ConfigError, match="final_supervised_epochs"):
        resolve_config({"ssl": {"final_supervised_epochs": -1}})


def test_pseudo_label_filter_keeps_confident_voxels_only():
    # probabilities of (background, lesion) at 4 voxels: confident bg, unsure, unsure, confident lesion
    probs = torch.tensor([[0.97, 0.6, 0.4, 0.05], [0.03, 0.4, 0.6, 0.95]]).view(1, 2, 4)
    labels, mask = pseudo_labels(probs, threshold=0.9)
    assert labels.tolist() == [[0, 0, 1, 1]]
    assert mask.tolist() == [[1.0, 0.0, 0.0, 1.0]]
    # threshold 0 keeps everything (the no-threshold ablation) except voxels with no probability mass
    probs[0, :, 1] = 0.0
    _, mask = pseudo_labels(probs, threshold=0.0)
    assert mask.tolist() == [[1.0, 0.0, 1.0, 1.0]]


def test_ignored_voxels_do_not_contribute_to_the_loss():
    logits = torch.randn(1, 2, 8, 8)
    labels = torch.randint(0, 2, (1, 8, 8))
    mask = torch.zeros(1, 8, 8)
    assert masked_consistency_loss(logits, labels, mask).item() == 0.0
    mask[0, :4] = 1.0
    base = masked_consistency_loss(logits, labels, mask)
    changed = logits.clone()
    changed[0, :, 4:] = torch.randn(2, 4, 8) * 10  # only ignored voxels change
    assert torch.isclose(masked_consistency_loss(changed, labels, mask), base)


def test_geometry_is_applied_identically_to_image_and_label():
    gen = torch.Generator().manual_seed(0)
    pert = Perturbation({"flip_prob": 0.5, "rotate_deg": 15, "scale": 0.1}, gen)
    x = torch.zeros(4, 1, 24, 24, 8)
    x[:, :, 5:12, 6:15, 2:6] = 1.0
    xp, yp = pert(x, x.clone())
    assert torch.equal(yp, (xp > 0.5).float()) or (yp - (xp > 0.5).float()).abs().mean() < 0.01
    p = pert.sample(4, 3)
    assert p.theta.shape == (4, 3, 4)
    identity = Perturbation({}, gen)
    assert identity.sample(2, 2).theta is None
    assert torch.equal(identity(x)[0], x)


def test_gamma_curves_each_images_contrast_within_its_range_and_off_keeps_the_old_draws():
    """``gamma`` g: image i becomes x_i ** e^u_i, u_i uniform in [-g, g], one exponent per image (monotone: the
    ordering of intensities, so every edge, stays); g = 0 draws nothing, so every other draw is what it was."""
    x = torch.rand(6, 1, 16, 16)
    gen = torch.Generator().manual_seed(0)
    out, _ = Perturbation({"gamma": 0.4}, gen)(x)
    for xi, oi in zip(x, out):
        flat, curved = xi.flatten(), oi.flatten()
        exponent = (curved.log() / flat.log()).median()  # the one exponent of this image
        assert torch.allclose(curved, flat ** exponent, atol=1e-5)
        assert 0.4 >= exponent.log().abs() > 0.0
        assert torch.equal(flat.argsort(), curved.argsort())
    assert out.flatten(1).mean(1).std() > 0.01  # the exponents differ between images
    old = {"noise_std": 0.05, "intensity_scale": 0.1, "intensity_shift": 0.1, "flip_prob": 0.5}
    a = Perturbation(old, torch.Generator().manual_seed(3))(x)[0]
    b = Perturbation({**old, "gamma": 0.0}, torch.Generator().manual_seed(3))(x)[0]
    assert torch.equal(a, b)
    with pytest.raises(ConfigError, match="train.augment.gamma"):
        resolve_config({"train": {"augment": {"gamma": -0.1}}})


def test_consistency_loss_goes_down_on_a_fixed_unlabeled_batch():
    torch.manual_seed(0)
    cfg = resolve_config({"ssl": {"confidence_threshold": 0.6}})["ssl"]
    teacher = build_network("unet", 2, channels=(4, 8), strides=(2,), num_res_units=0).eval()
    student = build_network("unet", 2, channels=(4, 8), strides=(2,), num_res_units=0)
    student.load_state_dict(teacher.state_dict())
    with torch.no_grad():  # a teacher with confident, structured predictions
        for p in teacher.parameters():
            p.mul_(3.0)
    x = torch.rand(4, 1, 32, 32)
    objective = ConsistencyObjective(cfg, torch.Generator().manual_seed(1), class_balanced=True)
    opt = torch.optim.Adam(student.parameters(), lr=0.02)
    losses = []
    import contextlib
    for _ in range(40):
        objective.strong.generator.manual_seed(1)  # same perturbation every step: a fixed batch
        loss, stats = objective(student, teacher, x, autocast=contextlib.nullcontext)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert stats["confident_fraction"] > 0.1
    assert losses[-1] < 0.8 * losses[0]
    assert sum(losses[-5:]) < sum(losses[:5])


def test_config_rejects_unknown_keys_and_bad_values():
    with pytest.raises(ConfigError, match="ssl.tau"):
        resolve_config({"ssl": {"tau": 0.9}})
    with pytest.raises(ConfigError, match="confidence_threshold"):
        resolve_config({"ssl": {"confidence_threshold": 1.5}})
    with pytest.raises(ConfigError, match="spatial_dims"):
        resolve_config({"data": {"spatial_dims": 2, "patch_size": [64, 64]}})  # network still 3D


def test_class_adaptive_threshold_keeps_the_rare_class():
    # teacher: background voxels at 0.98 confidence, lesion voxels at 0.7 (never reaching tau = 0.9)
    bg = torch.tensor([0.98, 0.98, 0.98, 0.3, 0.3, 0.45])
    probs = torch.stack([bg, 1 - bg]).view(1, 2, 6)
    _, fixed = pseudo_labels(probs, 0.9)
    assert fixed.tolist() == [[1, 1, 1, 0, 0, 0]]  # a fixed tau drops every lesion voxel
    labels, adaptive = pseudo_labels(probs, 0.9, class_adaptive=True)
    # lesion threshold = 0.9 * mean(0.7, 0.7, 0.55) / 0.98 = 0.60: the two 0.7 voxels are kept, 0.55 is not
    assert labels.tolist() == [[0, 0, 0, 1, 1, 1]]
    assert adaptive.tolist() == [[1, 1, 1, 1, 1, 0]]


def test_flip_tta_teacher_averages_the_flipped_predictions():
    torch.manual_seed(0)
    teacher = torch.nn.Conv3d(1, 2, kernel_size=3, padding=1)  # an asymmetric kernel: not flip-equivariant
    x = torch.randn(2, 1, 8, 6, 4)
    plain = teacher_probabilities(teacher, x, flips=False, autocast=contextlib.nullcontext)
    assert torch.allclose(plain, torch.softmax(teacher(x), dim=1))
    tta = teacher_probabilities(teacher, x, flips=True, autocast=contextlib.nullcontext)
    manual = [torch.softmax(teacher(x), dim=1)]
    manual += [torch.flip(torch.softmax(teacher(torch.flip(x, (a,))), dim=1), (a,)) for a in (2, 3, 4)]
    assert torch.allclose(tta, torch.stack(manual).mean(0), atol=1e-6)
    assert not torch.allclose(tta, plain, atol=1e-3)
    assert torch.allclose(tta.sum(dim=1), torch.ones(2, 8, 6, 4), atol=1e-5)  # still probabilities


def test_cutmix_moves_the_same_box_in_the_image_and_in_the_pseudo_labels():
    cfg = resolve_config({"ssl": {"cutmix_prob": 1.0}})["ssl"]
    objective = ConsistencyObjective(cfg, torch.Generator().manual_seed(0), class_balanced=True)
    xs = torch.arange(3, dtype=torch.float32).view(3, 1, 1, 1).expand(3, 1, 20, 20).clone()  # sample i is all i
    probs = torch.stack([torch.full((2, 20, 20), float(i)) for i in range(3)])
    mixed_x, mixed_p = objective.cutmix(xs, probs)
    for i in range(3):
        from_next = mixed_x[i, 0] == (i + 1) % 3
        assert 0.15 * 400 <= from_next.sum() <= 0.65 * 400  # one box of a fifth to three fifths of the image
        rows, cols = from_next.any(1).nonzero(), from_next.any(0).nonzero()
        assert from_next.sum() == len(rows) * len(cols)  # a box, not scattered voxels
        assert torch.equal(mixed_p[i, 1] == (i + 1) % 3, from_next)  # the teacher's map moved with it
    off = ConsistencyObjective(resolve_config({"ssl": {"cutmix_prob": 0.0, "class_balanced": True}})["ssl"])
    x = torch.rand(3, 1, 20, 20)
    net = build_network("unet", 2, channels=(4, 8), strides=(2,), num_res_units=0)
    loss, _ = off(net, net, x, autocast=contextlib.nullcontext)
    assert torch.isfinite(loss)
    with pytest.raises(ConfigError, match="cutmix_prob"):
        resolve_config({"ssl": {"cutmix_prob": 1.5}})


def test_supervised_cutmix_moves_the_mask_with_the_image_and_is_off_at_zero():
    x = torch.arange(4, dtype=torch.float32).view(4, 1, 1, 1).expand(4, 1, 16, 16).clone()  # sample i is all i
    y = (torch.arange(4) % 2).view(4, 1, 1, 1).expand(4, 1, 16, 16).clone()  # integer masks: odd samples lesion
    mixed_x, mixed_y = cutmix(x, y, 1.0, torch.Generator().manual_seed(1))
    assert mixed_y.dtype == y.dtype
    for i in range(4):
        from_next = mixed_x[i, 0] == (i + 1) % 4
        assert from_next.any() and not from_next.all()
        assert torch.equal(mixed_y[i, 0], torch.where(from_next, ((i + 1) % 4) % 2, i % 2))
    same_x, same_y = cutmix(x, y, 0.0, torch.Generator().manual_seed(1))
    assert torch.equal(same_x, x) and torch.equal(same_y, y)
    one_x, _ = cutmix(x[:1], y[:1], 1.0, torch.Generator().manual_seed(1))  # nothing to mix a single sample with
    assert torch.equal(one_x, x[:1])
    with pytest.raises(ConfigError, match="train.cutmix_prob"):
        resolve_config({"train": {"cutmix_prob": -0.1}})


def test_lesion_weight_weighs_the_teachers_lesion_voxels_in_every_unsupervised_loss():
    torch.manual_seed(0)
    logits = torch.randn(2, 2, 6, 6)
    labels = torch.randint(0, 2, (2, 6, 6))
    mask = (torch.rand(2, 6, 6) > 0.3).float()
    ce = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    lesion, background = mask * (labels == 1), mask * (labels == 0)
    # class-balanced: the lesion class term counts w times the background term
    terms = [(ce * background).sum() / background.sum(), (ce * lesion).sum() / lesion.sum()]
    expected = mask.mean() * (terms[0] + 3.0 * terms[1]) / 4.0
    got = masked_consistency_loss(logits, labels, mask, with_dice=False, lesion_weight=3.0)
    assert torch.isclose(got, expected)
    assert torch.isclose(masked_consistency_loss(logits, labels, mask, with_dice=False),
                         mask.mean() * (terms[0] + terms[1]) / 2.0)
    # without class balancing: per voxel
    expected = (ce * (background + 3.0 * lesion)).sum() / mask.numel()
    got = masked_consistency_loss(logits, labels, mask, with_dice=False, class_balanced=False, lesion_weight=3.0)
    assert torch.isclose(got, expected)


def test_soft_consistency_with_lesion_weight_counts_lesion_voxels_more():
    """The mse objective, end to end: a student that disagrees with the teacher only on the teacher's lesion voxels
    pays ssl.lesion_weight times more than at weight 1; disagreement on background costs the same."""
    teacher = build_network(spatial_dims=2, channels=(4, 8), strides=(2,), num_res_units=0)
    student = build_network(spatial_dims=2, channels=(4, 8), strides=(2,), num_res_units=0)
    x = torch.rand(2, 1, 16, 16)
    losses = {}
    for w in (1.0, 3.0):
        cfg = resolve_config({"ssl": {"unsup_loss": "mse", "confidence_threshold": 0.0, "lesion_weight": w,
                                      "teacher_flip_tta": False,
                                      "strong": {"noise_std": 0.0, "intensity_scale": 0.0, "intensity_shift": 0.0}}})
        objective = ConsistencyObjective(cfg["ssl"], torch.Generator().manual_seed(0))
        losses[w], stats = objective(student, teacher, x, autocast=contextlib.nullcontext)
    assert 0.0 < stats["pseudo_lesion_fraction"] < 1.0  # the untrained teacher calls some voxels lesion, not all
    # between 1x and 3x: the lesion voxels' share of the loss tripled, the background's unchanged
    assert losses[1.0] < losses[3.0] < 3.0 * losses[1.0]
    with pytest.raises(ConfigError, match="lesion_weight"):
        resolve_config({"ssl": {"lesion_weight": 0}})
