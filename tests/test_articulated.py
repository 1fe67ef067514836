"""Articulated shapes: masks, determinism, joint ranges, forward kinematics, rotation, pairs,
errors, and the cached Dataset."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from neuroplast.data import (
    ALL_FAMILIES,
    DATASETS,
    FAMILIES,
    SPLITS,
    DataError,
    family_info,
    generate,
    is_available_offline,
    load_articulated,
    load_dataset,
)
from neuroplast.data import articulated as art

STATE_FIELDS = ("image", "part_masks", "part_labels", "part_visible", "joint_angles", "joint_pos", "part_pose")


def direction(angle) -> np.ndarray:
    return np.array([math.cos(angle), math.sin(angle)])


def drawn_shapes(count, seed=0, families=FAMILIES, split="train", pairs=False) -> list:
    """The shapes `generate` draws for samples 0..count-1."""
    return [
        art._draw_shape(families[i % len(families)], art._sample_rng(seed, split, i), split, pairs, True)
        for i in range(count)
    ]


def brute_force_counts(layouts, size, supersample) -> np.ndarray:
    """Evaluate every part at every subsample; the last (top-most) part that covers it wins."""
    grid = (np.arange(size * supersample) + 0.5) / supersample
    top = np.zeros((len(layouts), size * supersample, size * supersample), np.uint8)
    for k in range(len(layouts[0].prims)):
        kind, columns = art._prepare(layouts[0].prims[k][0], [art._flat(layout.prims[k]) for layout in layouts])
        d = art._distance(kind, [c[:, None, None] for c in columns], grid[None, None, :], grid[None, :, None])
        top[d <= 0] = k + 1
    blocks = top.reshape(len(layouts), size, supersample, size, supersample)
    return np.stack([(blocks == label).sum((2, 4)) for label in range(len(layouts[0].prims) + 1)], axis=1)


def test_fields_masks_sum_to_one_and_labels_are_argmax():
    out = generate(60, seed=1, families=ALL_FAMILIES)
    n, s = 60, 32
    expected = {
        "image": (np.float32, (n, 1, s, s)),
        "label": (np.int64, (n,)),
        "part_masks": (np.float32, (n, 11, s, s)),
        "part_labels": (np.int64, (n, s, s)),
        "part_visible": (np.bool_, (n, 10)),
        "num_parts": (np.int64, (n,)),
        "joint_angles": (np.float32, (n, 8)),
        "joint_valid": (np.bool_, (n, 8)),
        "joint_pos": (np.float32, (n, 8, 2)),
        "part_pose": (np.float32, (n, 10, 3)),
        "theta0": (np.float32, (n,)),
    }
    assert set(out) == set(expected)
    for key, (dtype, shape) in expected.items():
        assert out[key].dtype == dtype and out[key].shape == shape, key
    masks = out["part_masks"]
    assert np.array_equal(masks.sum(1), np.ones((n, s, s), np.float32))  # multiples of 1/16: exact
    assert np.array_equal(out["part_labels"], masks.argmax(1))
    assert np.array_equal(out["image"][:, 0], 1 - masks[:, 0])  # silhouette
    for i in range(n):
        parts = out["num_parts"][i]
        assert parts == family_info(ALL_FAMILIES[out["label"][i]]).num_parts
        assert not masks[i, parts + 1 :].any() and not out["part_visible"][i, parts:].any()
        visible = [k for k in range(1, parts + 1) if (out["part_labels"][i] == k).any()]
        assert np.flatnonzero(out["part_visible"][i]).tolist() == [k - 1 for k in visible]
    default = generate(5)
    assert default["part_masks"].shape[1] == 7 and default["joint_angles"].shape[1] == 4  # P_max 6, J_max 4


def test_rasteriser_equals_supersampling_every_pixel():
    for size, supersample in ((32, 4), (28, 3), (19, 1)):
        for family in ALL_FAMILIES:
            layouts = [art._place(shape, size, True)[0] for shape in drawn_shapes(12, 7, (family,))]
            parts = [
                art._prepare(layouts[0].prims[k][0], [art._flat(layout.prims[k]) for layout in layouts])
                for k in range(len(layouts[0].prims))
            ]
            fast = art._rasterise(parts, size, supersample)
            assert np.array_equal(fast, brute_force_counts(layouts, size, supersample)), (family, size)


def test_same_seed_and_index_give_byte_identical_samples_in_any_batch():
    whole = generate(14, seed=5, families=ALL_FAMILIES, noise=0.1)
    tail = generate(6, seed=5, families=ALL_FAMILIES, noise=0.1, start=8)
    again = generate(14, seed=5, families=ALL_FAMILIES, noise=0.1)
    for key in whole:
        assert whole[key][8:].tobytes() == tail[key].tobytes(), key
        assert whole[key].tobytes() == again[key].tobytes(), key
    pairs = generate(10, seed=5, pairs=True)
    pairs_tail = generate(3, seed=5, pairs=True, start=7)
    for key in pairs:
        assert pairs[key][7:].tobytes() == pairs_tail[key].tobytes(), key


def test_different_indices_seeds_and_splits_differ():
    images = {split: generate(40, split=split)["image"].reshape(40, -1) for split in SPLITS}
    images["seed 1"] = generate(40, seed=1)["image"].reshape(40, -1)
    rows = np.concatenate(list(images.values()))
    assert len({row.tobytes() for row in rows}) == len(rows)
    out = generate(10)
    assert out["label"].tolist() == [0, 1, 2, 3, 4] * 2  # families cycle
    assert generate(4, families=("lamp", "arm2"))["label"].tolist() == [0, 1, 0, 1]  # position in families


def test_joint_angles_lie_in_their_split_ranges_and_ood_outside_training():
    assert family_info("arm2").ood_ranges[1] == ((-150.0, -100.0), (100.0, 150.0))
    assert family_info("lamp").train_ranges == ((-40.0, 40.0), (-100.0, 100.0), (-60.0, 60.0))
    assert family_info("scissors").ood_ranges == (((50.0, 80.0),),)
    assert family_info("stick").ood_ranges[0] == ((-180.0, 180.0),)  # shoulders: no band, full circle
    for split in SPLITS:
        out = generate(240, seed=2, families=ALL_FAMILIES, split=split, pairs=True)
        for i in range(240):
            info = family_info(ALL_FAMILIES[out["label"][i]])
            assert out["joint_valid"][i].tolist() == [j < info.num_joints for j in range(8)]
            for state in ("_a", "_b"):
                angles = np.degrees(out["joint_angles" + state][i].astype(np.float64))
                assert not angles[info.num_joints :].any()
                for j in range(info.num_joints):
                    q, (low, high) = angles[j], info.train_ranges[j]
                    bands = info.ood_ranges[j] if split == "ood" else (info.train_ranges[j],)
                    assert any(lo - 1e-4 <= q <= hi + 1e-4 for lo, hi in bands), (split, info.name, j, q)
                    if split == "ood" and info.ood_ranges[j] != (info.ranges[j],):
                        assert q <= low + 1e-4 or q >= high - 1e-4, (info.name, j, q)


def forward_kinematics(family, shape, theta0, unit) -> list[np.ndarray]:
    """Pivot offsets from the root, written from the family descriptions alone."""
    q, sizes = shape.angles, [unit * s for s in shape.sizes]
    if family in ("arm2", "arm3"):
        phi, points = theta0, [np.zeros(2)]
        for k in range(len(q) - 1):
            phi += q[k]
            points.append(points[-1] + sizes[1 + k] * direction(phi))
        return points
    if family == "lamp":
        p1 = sizes[1] * direction(theta0 - math.pi / 2 + q[0])
        return [np.zeros(2), p1, p1 + sizes[2] * direction(theta0 - math.pi / 2 + q[0] + q[1])]
    if family == "scissors":
        return [np.zeros(2)]
    neck = sizes[0] * direction(theta0 - math.pi / 2)
    if family == "stick":
        return [neck, neck, np.zeros(2), np.zeros(2)]
    down = theta0 + math.pi / 2
    points = []
    for limb, (start, upper) in enumerate(((neck, sizes[2]), (neck, sizes[2]), (0, sizes[4]), (0, sizes[4]))):
        points += [start + np.zeros(2), start + upper * direction(down + q[2 * limb])]
    return points


def test_joint_pos_are_the_forward_kinematics_chain_points():
    size, count = 32, 120
    out = generate(count, seed=3, size=size, families=ALL_FAMILIES)
    shrunk = 0
    for i, shape in enumerate(drawn_shapes(count, 3, ALL_FAMILIES)):
        family, theta0 = shape.family, float(out["theta0"][i])
        assert theta0 == np.float32(shape.theta0)
        assert np.allclose(out["joint_angles"][i, : len(shape.angles)], shape.angles)
        pivots = out["joint_pos"][i, : len(shape.angles)].astype(np.float64)
        unit = shape.scale * size
        expected = forward_kinematics(family, shape, shape.theta0, unit)
        # a shape that did not fit is shrunk, every length by one factor: measure it on one link
        root, far = (2, 0) if family == "stick" else (0, 1)  # stick: hip to neck
        factor = 1.0
        if family != "scissors":
            factor = np.linalg.norm(pivots[far] - pivots[root]) / np.linalg.norm(expected[far] - expected[root])
        shrunk += factor < 1 - 1e-4
        assert 0.5 < factor < 1 + 1e-4
        for j, point in enumerate(expected):
            assert np.allclose(pivots[j], pivots[root] + factor * (point - expected[root]), atol=2e-3), (family, j)
        if family == "scissors":  # the blades turn about the pivot
            blade, handle = factor * unit * shape.sizes[0], factor * unit * shape.sizes[1]
            for k, phi in enumerate((shape.theta0, shape.theta0 + shape.angles[0])):
                centre = pivots[0] + (blade - handle) / 2 * direction(phi)
                assert np.allclose(out["part_pose"][i, k, :2], centre, atol=2e-3)
                assert math.isclose(out["part_pose"][i, k, 2], art._wrap(phi), abs_tol=1e-5)
    assert shrunk <= count // 20


def test_adding_90_degrees_to_theta0_turns_image_and_masks_by_rot90():
    for pairs in (False, True):
        shapes = drawn_shapes(36, 4, ALL_FAMILIES, pairs=pairs)
        upright = art._render(shapes, 32, ALL_FAMILIES, jitter=False)
        turned = art._render([replace(s, theta0=s.theta0 + math.pi / 2) for s in shapes], 32, ALL_FAMILIES, False)
        for key in upright:
            if key.startswith(("image", "part_masks", "part_labels")):
                # y down: +90 degrees turns clockwise on screen, so rot90 (counter-clockwise) undoes it
                assert np.array_equal(np.rot90(turned[key], k=1, axes=(-2, -1)), upright[key]), key


# Poses in which no part covers another (scissors' blades always cross at their pivot).
SPREAD = {
    "arm2": (0, 0),
    "arm3": (0, 0, 0),
    "lamp": (0, 90, 0),
    "scissors": (80,),
    "stick": (90, -90, 30, -30),
    "stick_full": (100, 0, -100, 0, 35, 0, -35, 0),
}


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_each_family_shows_all_its_parts_when_nothing_is_occluded(family):
    info = family_info(family)
    angles = tuple(math.radians(a) for a in SPREAD[family])
    shapes = [replace(shape, angles=angles) for shape in drawn_shapes(10, 6, (family,))]
    out = art._render(shapes, 32, ALL_FAMILIES)
    assert (out["num_parts"] == info.num_parts).all()
    assert out["part_visible"][:, : info.num_parts].all() and not out["part_visible"][:, info.num_parts :].any()
    areas = out["part_masks"][:, 1 : info.num_parts + 1].sum((2, 3))
    assert (areas >= 2.0).all()  # every part owns at least two pixels' worth of subsamples
    random_poses = generate(100, seed=6, families=(family,))
    assert random_poses["part_visible"][:, : info.num_parts].mean(0).min() >= 0.6


def test_pairs_share_the_shape_and_differ_in_angles():
    out = generate(60, seed=8, families=ALL_FAMILIES, pairs=True)
    assert {f + s for f in STATE_FIELDS for s in ("_a", "_b")} <= set(out)
    assert {"label", "num_parts", "joint_valid", "theta0", "delta_q", "moved"} <= set(out)
    valid, moved = out["joint_valid"], out["moved"]
    assert (moved <= valid).all() and moved.any(1).all()
    assert np.array_equal(moved, out["delta_q"] != 0)
    assert (np.abs(out["delta_q"][moved]) >= math.radians(art.MIN_MOVE_DEGREES) - 1e-6).all()
    a, b = out["joint_angles_a"].astype(np.float64), out["joint_angles_b"].astype(np.float64)
    wrapped = (b - a + np.pi) % (2 * np.pi) - np.pi
    assert np.allclose(np.where(valid, wrapped, 0), out["delta_q"], atol=1e-5)
    assert np.array_equal(a[~moved], b[~moved])
    for i, shape in enumerate(drawn_shapes(60, 8, ALL_FAMILIES, pairs=True)):
        assert not np.array_equal(out["image_a"][i], out["image_b"][i])
        if not shape.family.startswith("stick"):  # a chain: the root and the pivots before the first move stay
            first = int(np.flatnonzero(moved[i])[0])
            assert np.array_equal(out["joint_pos_a"][i, : first + 1], out["joint_pos_b"][i, : first + 1])
        assert np.array_equal(out["part_pose_a"][i, 0], out["part_pose_b"][i, 0])  # base, plate, blade 1, torso


def test_shading_and_noise():
    grey = generate(10, shading="grey")
    colour = generate(10, shading="colour")
    plain = generate(10)
    assert colour["image"].shape == (10, 3, 32, 32)
    assert np.array_equal(grey["part_masks"], plain["part_masks"])
    levels = np.asarray(art._GREY[:6], np.float32)
    assert np.allclose(grey["image"][:, 0], np.einsum("nkhw,k->nhw", grey["part_masks"][:, 1:], levels), atol=1e-6)
    noisy = generate(10, noise=0.1)
    assert np.array_equal(noisy["part_masks"], plain["part_masks"])
    assert 0.05 < (noisy["image"] - plain["image"]).std() < 0.15


@pytest.mark.parametrize(
    "call, pieces",
    [
        (lambda: generate(0), ["count 0", ">= 1"]),
        (lambda: generate(3, families=("arm2", "arm4")), ["'arm4'", ", ".join(ALL_FAMILIES)]),
        (lambda: generate(3, families=()), ["empty", "stick_full"]),
        (lambda: generate(3, size=12), ["size 12", "28, 32, 64"]),
        (lambda: generate(3, size=32.0), ["size 32.0", "28, 32, 64"]),
        (lambda: generate(3, split="dev"), ["'dev'", "train, val, test, ood"]),
        (lambda: generate(3, shading="pink"), ["'pink'", "silhouette, grey, colour"]),
        (lambda: generate(3, seed=-1), ["seed -1"]),
        (lambda: generate(3, noise=-0.5), ["noise -0.5"]),
        (lambda: family_info("lever"), ["'lever'", ", ".join(ALL_FAMILIES)]),
        (lambda: load_articulated(split="train", cache=False), ["'train'", "iid, ood"]),
        (lambda: load_articulated(size=8, cache=False), ["size 8", "28, 32, 64"]),
        (lambda: load_articulated(train=0, cache=False), ["train 0"]),
    ],
)
def test_bad_input_is_a_one_line_error_naming_value_and_choices(call, pieces):
    with pytest.raises(ValueError) as error:
        call()
    message = str(error.value)
    assert "\n" not in message
    for piece in pieces:
        assert piece in message


def test_load_articulated_round_trips_through_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NEUROPLAST_DATA", str(tmp_path))
    assert "articulated" in DATASETS and is_available_offline("articulated")
    options = dict(size=28, train=50, test=20, split="ood")
    first = load_articulated(**options)
    files = sorted(p.name for p in (tmp_path / "articulated").iterdir())
    assert len(files) == 2 and all(name.endswith(".npz") for name in files)  # no temporary files left
    second = load_articulated(**options)
    assert str(tmp_path) in second.origin
    assert first.image_shape == (1, 28, 28) and first.num_classes == 5
    assert torch.equal(first.x_train, second.x_train) and torch.equal(first.x_test, second.x_test)
    assert abs(float(first.x_train.mean())) < 1e-4 and abs(float(first.x_train.std()) - 1) < 1e-2
    keys = {f"{p}_{k}" for p in ("train", "test") for k in ("part_masks", "part_labels", "joint_angles")}
    keys |= {f"{p}_{k}" for p in ("train", "test") for k in ("joint_valid", "joint_pos")}
    assert set(first.extras) == keys == set(second.extras)
    for key in keys:
        assert first.extras[key].dtype == second.extras[key].dtype and torch.equal(
            first.extras[key], second.extras[key]
        )
    ood = generate(20, size=28, split="ood")
    assert np.array_equal(second.extras["test_part_masks"].numpy(), ood["part_masks"])
    assert np.array_equal(second.y_test.numpy(), ood["label"])
    assert second.extras["train_part_labels"].dtype == torch.int64
    flat = load_dataset("articulated", flatten=True, progress=False, articulated=dict(options, split="iid"))
    assert flat.x_train.shape == (50, 28 * 28) and len(list((tmp_path / "articulated").iterdir())) == 3
    with pytest.raises(DataError, match="unknown articulated option 'colour'"):
        load_dataset("articulated", articulated={"colour": True})
    victim = tmp_path / "articulated" / files[0]
    victim.write_bytes(victim.read_bytes()[:100])
    with pytest.raises(DataError, match="truncated or corrupt"):
        load_articulated(**options)


@pytest.mark.parametrize("split", ["train", "ood"])
def test_pairs_move_at_least_the_minimum_even_in_narrow_ranges(split):
    """The scissors' ood band is 30 degrees wide: a joint in its middle can only move to an end."""
    p = generate(400, seed=5, size=28, families=("scissors", "lamp"), split=split, pairs=True)
    moved = np.degrees(np.abs(p["delta_q"]))[p["moved"]]
    assert len(moved) > 300 and moved.min() >= 15 - 1e-4


@pytest.mark.parametrize("family", ["stick", "stick_full"])
def test_joint_symmetries_relabel_joints_without_changing_the_image(family):
    perms = art.joint_symmetries(family)
    assert perms[0] == tuple(range(family_info(family).num_joints)) and len(set(perms)) == len(perms) == 4
    shapes = drawn_shapes(12, 3, (family,))
    image = art._render(shapes, 28, ALL_FAMILIES)["image"]
    for p in perms[1:]:
        # joint k of a stick figure drives part 2 + k: its width goes with it
        relabelled = []
        for s in shapes:
            widths = list(s.widths)
            widths[2:] = [s.widths[2 + k] for k in p]
            relabelled.append(replace(s, angles=tuple(s.angles[k] for k in p), widths=tuple(widths)))
        assert np.array_equal(art._render(relabelled, 28, ALL_FAMILIES)["image"], image)
    # a relabelling that is not a symmetry (an arm's angle given to a leg) draws another image
    q = list(perms[0])
    q[0], q[-1] = q[-1], q[0]
    moved = [replace(s, angles=tuple(s.angles[k] for k in q)) for s in shapes]
    assert not np.array_equal(art._render(moved, 28, ALL_FAMILIES)["image"], image)


def test_joint_permutations_pad_with_the_identity_and_hidden_joints_are_dropped():
    perms = art.joint_permutations(FAMILIES)
    assert perms.shape == (len(FAMILIES), 4, 4) and perms.dtype == torch.int64
    identity = torch.arange(4)
    for f, name in enumerate(FAMILIES):
        if name != "stick":
            assert (perms[f] == identity).all()
    assert sorted(map(tuple, perms[FAMILIES.index("stick")].tolist())) == sorted(art.joint_symmetries("stick"))
    assert art.joint_permutations(ALL_FAMILIES).shape == (len(ALL_FAMILIES), 4, 8)
    labels = torch.tensor([FAMILIES.index("arm2"), FAMILIES.index("lamp")])
    visible = art.visible_joints(torch.ones(2, 4, dtype=torch.bool), labels, FAMILIES)
    assert visible.tolist() == [[False, True, True, True], [True, True, True, True]]
