"""The part-query encoder: masks, query permutation, pose descriptors, metrics and losses."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import adjusted_rand_score

from neuroplast.models.parts import (
    PartQueryEncoder,
    angle_error_degrees,
    equivariance_error,
    foreground_ari,
    hungarian_match,
    part_miou,
    pixel_coordinates,
    pose_descriptors,
)


def tiny(**options) -> PartQueryEncoder:
    settings = dict(patch_size=4, dim=32, depth=1, heads=2, parts=4, iterations=2) | options
    return PartQueryEncoder((1, 16, 16), 3, **settings)


def one_hot_masks(labels: torch.Tensor, channels: int) -> torch.Tensor:
    return F.one_hot(labels, channels).permute(0, 3, 1, 2).double()


@pytest.mark.parametrize("options", [{}, {"patch_size": 1, "attention": "moba", "block_size": 16, "top_k": 2}])
def test_outputs_and_masks_sum_to_one_at_every_pixel(options):
    torch.manual_seed(0)
    model = tiny(joints=2, **options)
    assert model.blocks[0].attention.full == (model.tiles is None)  # MoBA runs in tile order
    out = model.parts(torch.randn(2, 1, 16, 16))
    tokens = (16 // model.patch_size) ** 2
    assert out.logits.shape == (2, 3) and out.masks.shape == (2, 4, 16, 16) and out.descriptors.shape == (2, 4, 6)
    assert out.assignment.shape == (2, 4, tokens) and out.reconstruction.shape == (2, 1, 16, 16)
    assert out.angles.shape == (2, 2, 2)
    torch.testing.assert_close(out.masks.sum(1), torch.ones(2, 16, 16))
    torch.testing.assert_close(out.assignment.sum(1), torch.ones(2, tokens))
    torch.testing.assert_close(out.angles.norm(dim=-1), torch.ones(2, 2))
    assert tiny(reconstruction=False).parts(torch.randn(1, 1, 16, 16)).reconstruction is None


@pytest.mark.parametrize("attention", ["dense", "moba"])
def test_permuting_the_queries_permutes_masks_and_descriptors_and_keeps_the_logits(attention):
    torch.manual_seed(0)
    options = {"patch_size": 1, "block_size": 16, "top_k": 2} if attention == "moba" else {}
    model = tiny(attention=attention, joints=2, **options).double().eval()
    permutation = torch.tensor([2, 0, 3, 1])
    permuted = copy.deepcopy(model)
    permuted.queries.data = model.queries.data[permutation]  # the only per-query parameter
    x = torch.randn(3, 1, 16, 16, dtype=torch.float64)
    out, out_permuted = model.parts(x), permuted.parts(x)
    torch.testing.assert_close(out_permuted.masks, out.masks[:, permutation])
    torch.testing.assert_close(out_permuted.descriptors, out.descriptors[:, permutation])
    torch.testing.assert_close(out_permuted.assignment, out.assignment[:, permutation])
    torch.testing.assert_close(out_permuted.logits, out.logits)
    torch.testing.assert_close(out_permuted.reconstruction, out.reconstruction)
    torch.testing.assert_close(out_permuted.angles, out.angles)


def ellipse(size: int, centre, axes, angle: float, supersample: int = 4) -> torch.Tensor:
    """A soft mask (fraction of covered sub-pixels) of an ellipse in pixel-centre coordinates."""
    u, v, _ = pixel_coordinates(size * supersample, size * supersample).double()
    du, dv = u - centre[0], v - centre[1]
    along = du * math.cos(angle) + dv * math.sin(angle)
    across = -du * math.sin(angle) + dv * math.cos(angle)
    inside = ((along / axes[0]) ** 2 + (across / axes[1]) ** 2 <= 1).double()
    return F.avg_pool2d(inside[None, None], supersample)[0, 0]


@pytest.mark.parametrize("angle", [0.0, 0.4, -1.1, math.pi / 2, 2.5])
def test_descriptors_of_a_rotated_ellipse_match_the_closed_form(angle):
    centre, (a, b), eps = (0.2, -0.3), (0.5, 0.2), 1e-4
    mask = ellipse(128, centre, (a, b), angle)
    area, mu_u, mu_v, cos2, sin2, elongation = pose_descriptors(mask[None, None], eps=eps)[0, 0].tolist()
    assert area == pytest.approx(math.pi * a * b / 4, rel=1e-2)  # the [-1, 1]^2 frame has area 4
    assert (mu_u, mu_v) == pytest.approx(centre, abs=2e-3)
    assert (cos2, sin2) == pytest.approx((math.cos(2 * angle), math.sin(2 * angle)), abs=1e-2)
    # a uniform ellipse has variances a^2 / 4 and b^2 / 4 along its axes
    assert elongation == pytest.approx(math.log((a * a / 4 + eps) / (b * b / 4 + eps)), rel=2e-2)


def test_descriptors_of_a_disc_have_no_orientation_and_an_empty_mask_is_finite():
    masks = torch.stack([ellipse(64, (0.0, 0.0), (0.5, 0.5), 0.0), torch.zeros(64, 64, dtype=torch.float64)])
    descriptors = pose_descriptors(masks[None])[0]
    assert descriptors[0, 3:].abs().max() < 0.05
    assert torch.isfinite(descriptors).all() and descriptors[1, 0] == 0


def test_hungarian_match_recovers_a_known_permutation_and_skips_empty_channels():
    torch.manual_seed(0)
    true = one_hot_masks(torch.randint(0, 5, (3, 12, 12)), 5)
    permutation = torch.tensor([3, 0, 4, 1, 2])
    pred = true[:, permutation] * 0.8 + 0.04  # soft, still closest to its own channel
    match = hungarian_match(pred, true)
    assert (match == torch.argsort(permutation)).all()  # pred[match[j]] is true[j]
    true[:, 2] = 0  # an absent part is not matched
    assert (hungarian_match(pred, true)[:, 2] == -1).all()


def test_part_miou_is_one_for_the_same_masks_in_any_order_and_counts_absent_matches_as_zero():
    torch.manual_seed(0)
    labels = torch.randint(0, 4, (2, 10, 10))
    true = one_hot_masks(labels, 4)
    torch.testing.assert_close(
        part_miou(true[:, [2, 3, 0, 1]] * 0.7 + 0.05, true), torch.ones(2, dtype=torch.float64)
    )  # soft, same argmax
    extra = torch.cat([true[:, [1, 0, 3, 2]], torch.zeros(2, 2, 10, 10, dtype=torch.float64)], 1)
    assert (part_miou(extra, true) == 1).all()  # more queries than parts
    half = torch.zeros(1, 2, 4, 4, dtype=torch.float64)
    half[0, 0, :2], half[0, 1, 2:] = 1, 1
    everything = torch.zeros_like(half)
    everything[0, 0] = 1
    # one predicted region: IoU 1/2 with the top half, and nothing left for the bottom half
    assert part_miou(everything, half).item() == pytest.approx(0.25)


def test_foreground_ari_matches_sklearn_on_the_foreground_pixels():
    rng = np.random.default_rng(0)
    labels = torch.from_numpy(rng.integers(0, 4, (4, 12, 12)))
    pred = torch.from_numpy(rng.random((4, 5, 12, 12)))
    pred[1] = one_hot_masks(labels[1:2], 5)[0, [4, 2, 0, 3, 1]]  # a perfect one, relabelled
    pred[2] = 0
    pred[2, 3] = 1  # a single predicted segment
    expected = []
    for b in range(4):
        foreground = labels[b].flatten() > 0
        expected.append(adjusted_rand_score(labels[b].flatten()[foreground], pred[b].argmax(0).flatten()[foreground]))
    assert expected[1] == pytest.approx(1.0)
    np.testing.assert_allclose(foreground_ari(pred, labels).numpy(), expected, atol=1e-12)
    one_part = torch.ones(1, 3, 3, dtype=torch.long)
    one_segment = torch.zeros(1, 2, 3, 3)
    one_segment[:, 1] = 1
    assert foreground_ari(one_segment, one_part).item() == adjusted_rand_score([1] * 9, [1] * 9) == 1.0
    assert foreground_ari(one_segment, torch.zeros(1, 3, 3, dtype=torch.long)).isnan().all()  # no foreground


def test_angle_error_in_degrees_wraps_around():
    def sincos(degrees):
        radians = torch.tensor(degrees, dtype=torch.float64).deg2rad()
        return torch.stack([radians.sin(), radians.cos()], -1)

    true = torch.tensor([[-170.0, 0.0, 90.0, 45.0]]).deg2rad()
    pred = sincos([[170.0, 180.0, 80.0, 0.0]]) * 3  # the scale of (sin, cos) does not matter
    valid = torch.tensor([[True, True, True, False]])
    assert angle_error_degrees(pred, true, valid).item() == pytest.approx((20 + 180 + 10) / 3)
    assert angle_error_degrees(pred, true, torch.zeros_like(valid)).isnan()


def test_angle_error_and_loss_take_the_best_relabelling_of_each_sample():
    true = torch.tensor([[0.5, -1.0, 0.2], [0.3, 1.1, -0.4]])
    valid = torch.tensor([[True, True, True], [True, True, False]])
    swapped = true[:, [1, 0, 2]]  # predictions with joints 0 and 1 exchanged
    pred = torch.stack([swapped.sin(), swapped.cos()], -1)
    identity, swap = [0, 1, 2], [1, 0, 2]
    perms = torch.tensor([[identity, swap], [identity, identity]])
    # sample 0 may swap its joints, sample 1 may not
    expected = (0 + 0 + 0 + 2 * math.degrees(0.8)) / 5
    assert angle_error_degrees(pred, true, valid, perms).item() == pytest.approx(expected)
    assert angle_error_degrees(pred, true, valid).item() == pytest.approx(
        (2 * math.degrees(1.5) + 2 * math.degrees(0.8)) / 5
    )
    model = tiny(joints=3)
    exact = model.angle_loss(pred, true, valid, torch.tensor([[identity, swap], [identity, swap]]))
    assert exact.item() == pytest.approx(0.0, abs=1e-6)
    assert model.angle_loss(pred, true, valid, perms).item() > 0.1
    with pytest.raises(ValueError, match="joint_perms"):
        model.angle_loss(pred, true, valid, perms[:, :, :2])


def test_training_loss_with_and_without_targets_backpropagates():
    torch.manual_seed(0)
    model = tiny(joints=2)
    x, y = torch.randn(2, 1, 16, 16), torch.tensor([0, 2])
    plain, logits = model.training_loss(x, y)
    assert logits.shape == (2, 3)
    plain.backward()
    assert model.queries.grad is not None and torch.isfinite(model.queries.grad).all()
    labels = torch.zeros(2, 16, 16, dtype=torch.long)
    labels[:, 4:12, 4:8], labels[:, 4:12, 8:12] = 1, 2
    targets = {
        "part_masks": one_hot_masks(labels, 3).float(),
        "joint_angles": torch.tensor([[0.5, -2.0], [3.0, 0.0]]),
        "joint_valid": torch.tensor([[True, False], [True, True]]),
    }
    model.zero_grad()
    supervised, _ = model.training_loss(x, y, targets)
    supervised.backward()
    assert supervised > plain and torch.isfinite(model.joint_head.weight.grad).all()
    # the joint head is optional: without one the angle targets are ignored
    torch.manual_seed(0)
    tiny().training_loss(x, y, targets)[0].backward()
    with pytest.raises(ValueError, match=r"^mask supervision needs parts >= 5 .*got parts=4$"):
        model.training_loss(x, y, {"part_masks": torch.zeros(2, 5, 16, 16)})


def test_mask_matching_hungarian_finds_the_permuted_parts_fixed_pairs_query_k_with_channel_k():
    """Predicted masks that are the true parts in another order: the Hungarian loss is the loss of
    the perfect masks, the fixed pairing (query k for channel k) scores the order as wrong; an
    empty true channel is skipped by both."""
    labels = torch.zeros(2, 16, 16, dtype=torch.long)
    labels[:, 4:12, 4:8], labels[:, 4:12, 8:12] = 1, 2
    true = one_hot_masks(labels, 4).float()  # channel 3 empty
    in_order = true.clone()
    permuted = true[:, [2, 0, 1, 3]]  # query 0 holds part 2, query 1 the background, query 2 part 1
    hungarian, fixed = tiny(mask_matching="hungarian"), tiny(mask_matching="fixed")
    best = hungarian.mask_loss(in_order, true)
    torch.testing.assert_close(hungarian.mask_loss(permuted, true), best)
    torch.testing.assert_close(fixed.mask_loss(in_order, true), best)
    assert fixed.mask_loss(permuted, true) > best + 1


@pytest.mark.parametrize(
    "options",
    [{"attention": "dense"}, {"attention": "moba", "patch_size": 1, "block_size": 16, "top_k": 2}],
)
def test_a_tiny_model_overfits_two_batches(options):
    """Class = where a bright square sits; after a plateau (the queries have to specialise) the
    loss falls."""
    torch.manual_seed(0)
    model = tiny(**options)
    batches = []
    for _ in range(2):
        y = torch.randint(0, 3, (8,))
        x = 0.1 * torch.rand(8, 1, 16, 16)
        for i, c in enumerate(y.tolist()):
            x[i, 0, 6:10, 1 + 5 * c : 5 + 5 * c] = 1
        batches.append((x, y))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        for x, y in batches:
            loss, _ = model.training_loss(x, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    assert np.mean(losses[-4:]) < 0.5 * np.mean(losses[:4])


def test_equivariance_error_is_zero_for_the_identity_and_bounded():
    torch.manual_seed(0)
    model = tiny().train()
    x = torch.randn(2, 1, 16, 16)
    assert equivariance_error(model, x, lambda t: t).item() == pytest.approx(0.0, abs=1e-10)
    for name in ("rot90", "hflip"):
        assert 0 < equivariance_error(model, x, name) <= 2
    assert model.training  # the mode is restored
    with pytest.raises(ValueError, match="unknown transform 'shear'; choose from: rot90, rot180"):
        equivariance_error(model, x, "shear")


@pytest.mark.parametrize(
    "options,message",
    [
        ({"patch_size": 5}, "patch_size 5 does not divide the 28x28 image; choose from: 1, 2, 4, 7, 14, 28"),
        ({"attention": "sparse"}, "unknown attention 'sparse'; choose from: dense, moba"),
        ({"parts": 1}, "parts must be at least 2"),
        ({"pixel_rank": 0}, "pixel_rank must be at least 1, got 0"),
        ({"mask_matching": "greedy"}, "unknown mask_matching 'greedy'; choose from: hungarian, fixed"),
        ({"attention": "moba", "patch_size": 2, "block_size": 3}, "block_size 3 cannot be a tile"),
    ],
)
def test_bad_settings_are_one_line_errors(options, message):
    with pytest.raises(ValueError, match=message) as error:
        PartQueryEncoder((1, 28, 28), 10, **options)
    assert "\n" not in str(error.value)


@torch.no_grad()
def test_masks_resolve_pixels_inside_one_patch():
    """The per-pixel head alone (token logits and the convolutions off) can split every 4x4 patch
    in a checkerboard, which no head with one logit per patch, nor one affine in the pixel's
    coordinates and intensity, can: the masks are at pixel resolution."""
    torch.manual_seed(0)
    model = tiny().eval()
    model.to_mask.weight.zero_()
    for parameter in model.local.parameters():
        parameter.zero_()
    model.subpixel.weight.zero_()
    sign = torch.tensor([[(-1.0) ** (a + b) for b in range(4)] for a in range(4)])  # per pixel of a patch
    bias = torch.zeros(4, 4, model.pixel_rank)
    bias[..., 0] = 50 * sign
    model.subpixel.bias.copy_(bias.flatten())
    out = model.parts(torch.randn(2, 1, 16, 16))
    winner = out.masks.argmax(1)  # (2, 16, 16)
    checker = sign.repeat(4, 4) > 0
    # the same query wins every "+" pixel and another one every "-" pixel, in every patch
    for b in range(2):
        plus, minus = winner[b][checker].unique(), winner[b][~checker].unique()
        assert len(plus) == 1 and len(minus) == 1 and plus.item() != minus.item()


def test_a_wrong_input_shape_is_a_one_line_error():
    with pytest.raises(ValueError, match=r"^expected images of shape \(B, 1, 16, 16\), got \(2, 3, 16, 16\)$"):
        tiny()(torch.randn(2, 3, 16, 16))


def test_parameter_count_at_the_spec_size():
    model = PartQueryEncoder((1, 28, 28), 10)
    assert 100_000 <= sum(p.numel() for p in model.parameters()) <= 150_000
