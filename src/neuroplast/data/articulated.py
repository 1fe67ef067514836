"""Procedural articulated shapes: 2D jointed figures with exact part masks and joint angles.

A file-free, deterministic generator. Each sample is a figure of one family (the class), built
from primitives (capsules, discs, convex polygons) placed by forward kinematics and rasterised
with supersampling, so every pixel knows which part covers it and by how much.

Coordinates: pixel (column c, row r) covers [c, c+1) x [r, r+1) and has its centre at
(x, y) = (c + 0.5, r + 0.5); y points down, as array rows do. An angle a is the direction
(cos a, sin a), so a positive angle turns clockwise on the screen, and adding 90 degrees to
theta0 (jitter off) turns the whole image by `np.rot90(image, k=-1, axes=(-2, -1))`.

Families. The label is the family's position in `families` (with the default, arm2 0 ... stick 4).
Parts are listed bottom to top (z-order). Joint ranges are in degrees, relative to the previous
link: the full range, "train" (the range of every in-distribution split: train, val and test) and
"ood" (the rest of the full range, both bands where there are two, drawn by the ood split).
Shoulders span the full circle: they have no ood band and keep their full range in every split.

- arm2 (label 0): base (disc), link1, link2. Joints: shoulder [-180, 180) in every split (link1
  at theta0 + shoulder); elbow [-150, 150], train [-100, 100], ood 100 < |q| <= 150.
- arm3 (1): base (disc), link1, link2, link3. Joints: shoulder as arm2; elbow1 and elbow2 as
  arm2's elbow.
- lamp (2): base_plate (rectangle), link1, link2, shade (triangle, apex at the pivot). Joints: base
  [-60, 60] about vertical (link1 at theta0 - 90 + base), train [-40, 40], ood 40 < |q| <= 60;
  elbow as arm2's; shade [-90, 90], train [-60, 60], ood 60 < |q| <= 90.
- scissors (3): blade1, blade2 (capsules crossing at one pivot; blade1 at theta0, blade2 at
  theta0 + opening). Joint: opening [5, 80], train [5, 50], ood 50 < q <= 80.
- stick (4): torso (hip to neck, at theta0 - 90), head (disc), left_arm, right_arm, left_leg,
  right_leg; arms hang off the neck, legs off the hip. Joints about downward (theta0 + 90):
  left/right_shoulder [-180, 180) in every split; left/right_hip [-60, 60], train [-40, 40],
  ood 40 < |q| <= 60.
- stick_full (label = its position in `families`): torso, head, left_upper_arm, left_forearm,
  right_upper_arm, right_forearm, left_thigh, left_shin, right_thigh, right_shin. Joints:
  left_shoulder, left_elbow, right_shoulder, right_elbow, left_hip, left_knee, right_hip,
  right_knee; shoulders and hips as stick, elbows and knees as arm2's elbow.

`stick_full` (10 parts, 8 joints) is only generated when named. With it, P_max = 10 parts and
J_max = 8 joints; otherwise P_max = 6 and J_max = 4.

Geometry of a sample: scale s ~ U(0.7, 1.0)*S; theta0 ~ U(-pi, pi) (0 with `rotate=False`: the
lamp and the stick figure then stand upright, arms and scissors point along +x); sizes
s*L_k*U(0.85, 1.15) with family constants L_k; thickness U(1.5, 3.0)*S/32 px. Along a chain,
phi_k = theta0 + (family rest direction) + sum of the joint angles up to k, and
p_{k+1} = p_k + l_k*(cos phi_k, sin phi_k). The bounding box is centred on the canvas and shifted
by a uniform jitter within the remaining margin; a shape that does not fit (one pixel margin per
32) is shrunk until it does.

Rasterisation: each pixel is sampled at ss x ss sub-pixel centres; a subsample takes the label of
the top-most part that covers it (0 = background). Soft mask m_k = fraction of subsamples with
label k, so the masks sum to 1 at every pixel; the hard label is their argmax (ties go to the
lower label). Image = sum_k m_k*gamma_k: gamma_k = 1 ("silhouette"), a grey level per part
("grey": 1 - 0.06*(k-1) for part k) or a colour per part ("colour": the tab10 palette, 3 channels),
plus optional Gaussian noise (not clipped).

Sample fields (batched by `generate`, first axis = sample):

| field | dtype, shape | meaning |
|---|---|---|
| image | float32 [C, S, S] | C = 1 (3 with "colour") |
| label | int64 | family index |
| part_masks | float32 [P_max+1, S, S] | channel 0 = background, channel k = part k |
| part_labels | int64 [S, S] | argmax of part_masks |
| part_visible | bool [P_max] | the part is the hard label of at least one pixel |
| num_parts | int64 | P of the family |
| joint_angles | float32 [J_max] | relative angles, radians (0 where not valid) |
| joint_valid | bool [J_max] | the family has this joint |
| joint_pos | float32 [J_max, 2] | pivot of each joint, (x, y) in the pixel coordinates above |
| part_pose | float32 [P_max, 3] | centroid (x, y) and axis angle in [-pi, pi) of each primitive |
| theta0 | float32 | global rotation, radians |

A capsule's axis points away from its pivot (the torso from hip to neck, a blade towards its
tip); the shade's from its apex to its base; the base disc and the plate carry theta0, the head
the torso's direction. Unused part and joint slots are zero (and not visible, not valid).

Pairs (`pairs=True`, the 2D analogue of two joint states of one object): the same figure (scale,
theta0, sizes, thickness, placement) in two joint states. Each joint moves with probability 1/2
(at least one does), by at least 15 degrees, to a new angle from the same split's range. Fields
image, part_masks, part_labels, part_visible, joint_angles, joint_pos and part_pose come as `_a`
and `_b`; label, num_parts, joint_valid and theta0 are shared; `delta_q` float32 [J_max] is
angle_b - angle_a wrapped to [-pi, pi) and `moved` bool [J_max] marks the joints that moved. Both
states share one placement, so the root stays put.

Determinism: sample i of a split is drawn from `np.random.default_rng([seed, i])` (train) or
`np.random.default_rng([seed, i, stream])` with stream 1, 2, 3 for val, test and ood, so splits
are disjoint seed streams; the same (seed, i, options) gives byte-identical arrays whatever the
batch it is generated in.
"""

from __future__ import annotations

import math
import os
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from neuroplast.data.dataset import Dataset, to_dataset
from neuroplast.data.sources import DataError, data_root

FAMILIES = ("arm2", "arm3", "lamp", "scissors", "stick")
ALL_FAMILIES = (*FAMILIES, "stick_full")
SPLITS = ("train", "val", "test", "ood")
TEST_SPLITS = ("iid", "ood")  # what `load_articulated` tests on
SIZES = (28, 32, 64)  # the usual canvas sides; any integer >= MIN_SIZE works
MIN_SIZE = 16
SHADINGS = ("silhouette", "grey", "colour")
MIN_MOVE_DEGREES = 15.0  # pair mode: a joint that moves turns at least this far
CACHE_VERSION = 1  # bump when the generator's output changes, so old caches are not reused

_STREAMS = {"train": (), "val": (1,), "test": (2,), "ood": (3,)}
_MAX_INDEX = 2**32  # seeds and sample indices are single 32-bit words of the seed sequence
_GREY = tuple(1.0 - 0.06 * k for k in range(10))
_COLOURS = (  # the tab10 palette
    (0.122, 0.467, 0.706),
    (1.000, 0.498, 0.055),
    (0.173, 0.627, 0.173),
    (0.839, 0.153, 0.157),
    (0.580, 0.404, 0.741),
    (0.549, 0.337, 0.294),
    (0.890, 0.467, 0.761),
    (0.498, 0.498, 0.498),
    (0.737, 0.741, 0.133),
    (0.090, 0.745, 0.812),
)


# -- families ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Joint:
    """A joint's name and angle ranges."""

    name: str
    full: tuple[float, float]  # degrees
    train: tuple[float, float]  # degrees: the in-distribution range

    def intervals(self, split: str) -> tuple[tuple[float, float], ...]:
        """The degree intervals a split draws this joint's angle from."""
        if split != "ood":
            return (self.train,)
        bands = [(self.full[0], self.train[0]), (self.train[1], self.full[1])]
        return tuple((lo, hi) for lo, hi in bands if hi > lo) or (self.full,)


@dataclass(frozen=True)
class FamilyInfo:
    """A family's parts (bottom to top), joints and their ranges in degrees."""

    name: str
    parts: tuple[str, ...]
    joints: tuple[str, ...]
    ranges: tuple[tuple[float, float], ...]  # full range of each joint
    train_ranges: tuple[tuple[float, float], ...]  # train, val and test splits
    ood_ranges: tuple[tuple[tuple[float, float], ...], ...]  # ood split: one or two bands per joint

    @property
    def num_parts(self) -> int:
        return len(self.parts)

    @property
    def num_joints(self) -> int:
        return len(self.joints)


@dataclass(frozen=True)
class _Family:
    name: str
    parts: tuple[str, ...]
    joints: tuple[Joint, ...]
    sizes: tuple[float, ...]  # the constants L_k, as fractions of the scale s
    build: Callable


_SHOULDER = (-180.0, 180.0)
_ELBOW = ((-150.0, 150.0), (-100.0, 100.0))
_TILT = ((-60.0, 60.0), (-40.0, 40.0))  # the lamp's base and the hips


# A primitive: (kind, points, radius). A capsule is the segment between its two points thickened by
# the radius, a disc its one point and radius, a polygon its convex hull (radius 0).
Primitive = tuple[str, list[tuple[float, float]], float]


def _direction(angle: float) -> tuple[float, float]:
    return math.cos(angle), math.sin(angle)


def _wrap(angle: float) -> float:
    """An angle in radians brought into [-pi, pi)."""
    return (angle + math.pi) % (2 * math.pi) - math.pi


def _chain(start, phi, angles, lengths, widths, prims, pivots, poses) -> None:
    """Append capsules along a kinematic chain: phi_k = phi + sum of angles up to k."""
    x, y = start
    for q, length, width in zip(angles, lengths, widths):
        phi += q
        dx, dy = _direction(phi)
        end = (x + length * dx, y + length * dy)
        prims.append(("capsule", [(x, y), end], width / 2))
        pivots.append((x, y))
        poses.append(((x + end[0]) / 2, (y + end[1]) / 2, phi))
        x, y = end


def _build_arm(theta0, angles, sizes, widths):
    base_radius, *lengths = sizes
    prims: list[Primitive] = [("disc", [(0.0, 0.0)], base_radius + widths[1] / 2)]  # a rim around link 1
    pivots: list = []
    poses: list = [(0.0, 0.0, theta0)]
    _chain((0.0, 0.0), theta0, angles, lengths, widths[1:], prims, pivots, poses)
    return prims, pivots, poses


def _build_lamp(theta0, angles, sizes, widths):
    plate_width, link1, link2, shade_length, shade_width = sizes
    up = theta0 - math.pi / 2
    rx, ry = _direction(theta0)
    ux, uy = _direction(up)
    half, height = plate_width / 2, widths[0]
    plate = [
        (-half * rx, -half * ry),
        (half * rx, half * ry),
        (half * rx - height * ux, half * ry - height * uy),
        (-half * rx - height * ux, -half * ry - height * uy),
    ]
    prims: list[Primitive] = [("polygon", plate, 0.0)]
    pivots: list = []
    poses: list = [(-height * ux / 2, -height * uy / 2, theta0)]
    _chain((0.0, 0.0), up, angles[:2], (link1, link2), widths[1:3], prims, pivots, poses)
    apex = prims[-1][1][1]
    phi = poses[-1][2] + angles[2]
    dx, dy = _direction(phi)
    cx, cy = apex[0] + shade_length * dx, apex[1] + shade_length * dy
    w = shade_width / 2
    shade = [apex, (cx - w * dy, cy + w * dx), (cx + w * dy, cy - w * dx)]
    prims.append(("polygon", shade, 0.0))
    pivots.append(apex)
    poses.append((sum(p[0] for p in shade) / 3, sum(p[1] for p in shade) / 3, phi))
    return prims, pivots, poses


def _build_scissors(theta0, angles, sizes, widths):
    blade, handle = sizes
    prims: list[Primitive] = []
    poses: list = []
    for phi, width in ((theta0, widths[0]), (theta0 + angles[0], widths[1])):
        dx, dy = _direction(phi)
        prims.append(("capsule", [(-handle * dx, -handle * dy), (blade * dx, blade * dy)], width / 2))
        poses.append(((blade - handle) / 2 * dx, (blade - handle) / 2 * dy, phi))
    return prims, [(0.0, 0.0)], poses


def _build_stick(theta0, angles, sizes, widths):
    """Torso from the hip up to the neck, head above; limbs hang off the neck and the hip."""
    torso, head, *limbs = sizes
    up, down = theta0 - math.pi / 2, theta0 + math.pi / 2
    ux, uy = _direction(up)
    neck = (torso * ux, torso * uy)
    head_centre = (neck[0] + head * ux, neck[1] + head * uy)
    prims: list[Primitive] = [("capsule", [(0.0, 0.0), neck], widths[0] / 2), ("disc", [head_centre], head)]
    poses: list = [(neck[0] / 2, neck[1] / 2, up), (*head_centre, up)]
    pivots: list = []
    segments = len(limbs) // 2  # 1 (stick) or 2 (stick_full) links per limb
    for limb, start in enumerate((neck, neck, (0.0, 0.0), (0.0, 0.0))):  # arms, then legs
        links = slice(limb * segments, (limb + 1) * segments)
        lengths = limbs[(limb // 2) * segments : (limb // 2 + 1) * segments]
        _chain(start, down, angles[links], lengths, widths[2 + limb * segments :], prims, pivots, poses)
    return prims, pivots, poses


_FAMILIES = {
    f.name: f
    for f in (
        _Family(
            "arm2",
            ("base", "link1", "link2"),
            (Joint("shoulder", _SHOULDER, _SHOULDER), Joint("elbow", *_ELBOW)),
            (0.08, 0.34, 0.29),
            _build_arm,
        ),
        _Family(
            "arm3",
            ("base", "link1", "link2", "link3"),
            (Joint("shoulder", _SHOULDER, _SHOULDER), Joint("elbow1", *_ELBOW), Joint("elbow2", *_ELBOW)),
            (0.08, 0.28, 0.24, 0.20),
            _build_arm,
        ),
        _Family(
            "lamp",
            ("base_plate", "link1", "link2", "shade"),
            (Joint("base", *_TILT), Joint("elbow", *_ELBOW), Joint("shade", (-90.0, 90.0), (-60.0, 60.0))),
            (0.36, 0.30, 0.27, 0.16, 0.22),
            _build_lamp,
        ),
        _Family(
            "scissors",
            ("blade1", "blade2"),
            (Joint("opening", (5.0, 80.0), (5.0, 50.0)),),
            (0.50, 0.20),
            _build_scissors,
        ),
        _Family(
            "stick",
            ("torso", "head", "left_arm", "right_arm", "left_leg", "right_leg"),
            (
                Joint("left_shoulder", _SHOULDER, _SHOULDER),
                Joint("right_shoulder", _SHOULDER, _SHOULDER),
                Joint("left_hip", *_TILT),
                Joint("right_hip", *_TILT),
            ),
            (0.28, 0.09, 0.26, 0.30),
            _build_stick,
        ),
        _Family(
            "stick_full",
            (
                "torso",
                "head",
                "left_upper_arm",
                "left_forearm",
                "right_upper_arm",
                "right_forearm",
                "left_thigh",
                "left_shin",
                "right_thigh",
                "right_shin",
            ),
            (
                Joint("left_shoulder", _SHOULDER, _SHOULDER),
                Joint("left_elbow", *_ELBOW),
                Joint("right_shoulder", _SHOULDER, _SHOULDER),
                Joint("right_elbow", *_ELBOW),
                Joint("left_hip", *_TILT),
                Joint("left_knee", *_ELBOW),
                Joint("right_hip", *_TILT),
                Joint("right_knee", *_ELBOW),
            ),
            (0.28, 0.09, 0.15, 0.14, 0.17, 0.16),
            _build_stick,
        ),
    )
}


def family_info(name: str) -> FamilyInfo:
    """Parts, joints and joint ranges (degrees) of a family: one of `ALL_FAMILIES`."""
    if name not in _FAMILIES:
        raise ValueError(f"unknown articulated family {name!r}; choose from: {', '.join(ALL_FAMILIES)}")
    f = _FAMILIES[name]
    return FamilyInfo(
        name,
        f.parts,
        tuple(j.name for j in f.joints),
        tuple(j.full for j in f.joints),
        tuple(j.train for j in f.joints),
        tuple(j.intervals("ood") for j in f.joints),
    )


# Joints an image cannot show: an arm's shoulder is measured from the global rotation theta0,
# which its base, a disc, does not reveal (with rotation on, it is uniform over the circle
# whatever the image).
HIDDEN_JOINTS = {"arm2": (0,), "arm3": (0,)}

# Joint relabellings an image cannot tell apart: the stick figure's two arms hang off the neck and
# its two legs off the hip, each pair with equal lengths and with widths drawn alike, so "left"
# and "right" are names, not something the image shows. Each entry swaps two groups of joints.
_JOINT_SWAPS = {
    "stick": (((0,), (1,)), ((2,), (3,))),
    "stick_full": (((0, 1), (2, 3)), ((4, 5), (6, 7))),
}


def joint_symmetries(name: str) -> tuple[tuple[int, ...], ...]:
    """The permutations p of a family's joints (identity first) such that the angles
    (q[p[0]], q[p[1]], ...) are as likely as q for every image: the angles are defined only up to
    them, so a prediction is scored against the best of them (`joint_permutations`)."""
    joints = family_info(name).num_joints
    perms = [tuple(range(joints))]
    for first, second in _JOINT_SWAPS.get(name, ()):
        swapped = []
        for p in perms:
            q = list(p)
            for a, b in zip(first, second):
                q[a], q[b] = p[b], p[a]
            swapped.append(tuple(q))
        perms += swapped
    return tuple(perms)


def joint_permutations(families: Sequence[str]) -> torch.Tensor:
    """`joint_symmetries` of every family as one int64 tensor (F, G, J_max), rows padded with
    the identity: index it with the labels to get each sample's permutations."""
    families = _check_families(families)
    joints = max_parts_and_joints(families)[1]
    per_family = [joint_symmetries(f) for f in families]
    group = max(len(p) for p in per_family)
    identity = list(range(joints))
    rows = []
    for perms in per_family:
        padded = [list(p) + identity[len(p) :] for p in perms]
        rows.append(padded + [identity] * (group - len(padded)))
    return torch.tensor(rows, dtype=torch.int64)


def visible_joints(valid: torch.Tensor, labels: torch.Tensor, families: Sequence[str]) -> torch.Tensor:
    """`valid` (B, J) less the joints the image cannot show (`HIDDEN_JOINTS`)."""
    visible = valid.clone()
    for f, name in enumerate(families):
        for j in HIDDEN_JOINTS.get(name, ()):
            visible[labels == f, j] = False
    return visible


def max_parts_and_joints(families: Sequence[str]) -> tuple[int, int]:
    """(P_max, J_max): padded part and joint counts of a set of families."""
    return (10, 8) if "stick_full" in families else (6, 4)


# -- sampling ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Shape:
    """Everything random about one sample, in canvas-independent units."""

    family: str
    scale: float  # s / S
    theta0: float  # radians
    sizes: tuple[float, ...]  # L_k * U(0.85, 1.15), fractions of s
    widths: tuple[float, ...]  # thickness per part, in units of S/32 px
    angles: tuple[float, ...]  # radians
    angles_b: tuple[float, ...] | None  # pair mode: the second joint state
    jitter: tuple[float, float]  # U(0, 1) each: where in the free margin the box lands


def _sample_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, index, *_STREAMS[split]])


def _angle(u: float, intervals: tuple[tuple[float, float], ...]) -> float:
    """The point at fraction u of the union of degree intervals, in radians."""
    t = u * sum(hi - lo for lo, hi in intervals)
    for lo, hi in intervals:
        if t < hi - lo:
            return math.radians(lo + t)
        t -= hi - lo
    return math.radians(intervals[-1][1])


def _draw_shape(family: str, rng: np.random.Generator, split: str, pairs: bool, rotate: bool) -> _Shape:
    f = _FAMILIES[family]
    n_sizes, n_parts, n_joints = len(f.sizes), len(f.parts), len(f.joints)
    u = rng.random(2 + n_sizes + n_parts + n_joints + 2).tolist()  # one call: the draws are scalars
    scale = 0.7 + 0.3 * u[0]
    theta0 = -math.pi + 2 * math.pi * u[1] if rotate else 0.0
    u = u[2:]
    sizes = tuple(length * (0.85 + 0.3 * v) for length, v in zip(f.sizes, u[:n_sizes]))
    u = u[n_sizes:]
    widths = tuple(1.5 + 1.5 * v for v in u[:n_parts])
    u = u[n_parts:]
    angles = tuple(_angle(v, j.intervals(split)) for v, j in zip(u[:n_joints], f.joints))
    jitter = (u[n_joints], u[n_joints + 1])
    angles_b = _second_state(f.joints, angles, rng, split) if pairs else None
    return _Shape(family, scale, theta0, sizes, widths, angles, angles_b, jitter)


def _second_state(joints, angles, rng, split) -> tuple[float, ...]:
    """Pair mode: each joint moves with probability 1/2 (at least one does), by >= MIN_MOVE_DEGREES."""
    moved = (rng.random(len(joints)) < 0.5).tolist()
    if not any(moved):
        moved[int(rng.integers(len(joints)))] = True
    result = list(angles)
    for j, joint in enumerate(joints):
        if moved[j]:
            away = _away(joint.intervals(split), math.degrees(angles[j]), MIN_MOVE_DEGREES)
            result[j] = _angle(float(rng.random()), away)
    return tuple(result)


def _away(intervals, centre: float, gap: float) -> tuple[tuple[float, float], ...]:
    """The degree intervals less the open interval (centre - gap, centre + gap), on the circle:
    what is left is at least `gap` from `centre`. Every split's range of every joint is at least
    2 * gap wide (the narrowest, the scissors' ood band, is 30 degrees), so something is left,
    if only an end point."""
    cuts = [(centre - gap + shift, centre + gap + shift) for shift in (-360.0, 0.0, 360.0)]
    left = []
    for interval in intervals:
        pieces = [interval]
        for c0, c1 in cuts:
            kept = []
            for p0, p1 in pieces:
                if c1 <= p0 or c0 >= p1:
                    kept.append((p0, p1))
                    continue
                if c0 >= p0:
                    kept.append((p0, c0))
                if c1 <= p1:
                    kept.append((c1, p1))
            pieces = kept
        left += pieces
    if not left:
        raise ValueError(f"no angle in {intervals} is {gap} degrees away from {centre:.1f}")
    return tuple(left)


# -- layout -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Layout:
    """One joint state placed on the canvas, in pixels."""

    prims: list[Primitive]
    pivots: list[tuple[float, float]]
    poses: list[tuple[float, float, float]]


def _bbox(prims: list[Primitive]) -> tuple[float, float, float, float]:
    x0 = y0 = math.inf
    x1 = y1 = -math.inf
    for _, points, radius in prims:
        for x, y in points:
            x0, y0 = min(x0, x - radius), min(y0, y - radius)
            x1, y1 = max(x1, x + radius), max(y1, y + radius)
    return x0, y0, x1, y1


def _place(shape: _Shape, size: int, jitter: bool) -> list[_Layout]:
    """Build each joint state, shrink s until every state fits, centre the union box, jitter it."""
    f = _FAMILIES[shape.family]
    states = [shape.angles] if shape.angles_b is None else [shape.angles, shape.angles_b]
    widths = [w * size / 32 for w in shape.widths]
    margin = size / 32
    room = size - 2 * margin
    factor = 1.0
    while True:
        unit = shape.scale * size * factor
        built = [f.build(shape.theta0, angles, [unit * s for s in shape.sizes], widths) for angles in states]
        boxes = [_bbox(prims) for prims, _, _ in built]
        x0, y0 = min(b[0] for b in boxes), min(b[1] for b in boxes)
        x1, y1 = max(b[2] for b in boxes), max(b[3] for b in boxes)
        extent = max(x1 - x0, y1 - y0)
        if extent <= room:
            break
        factor *= max(0.5, 0.98 * room / extent)  # thickness does not shrink: may take a few rounds
    tx, ty = size / 2 - (x0 + x1) / 2, size / 2 - (y0 + y1) / 2
    if jitter:
        tx += (shape.jitter[0] - 0.5) * (room - (x1 - x0))
        ty += (shape.jitter[1] - 0.5) * (room - (y1 - y0))
    return [
        _Layout(
            [(kind, [(x + tx, y + ty) for x, y in points], radius) for kind, points, radius in prims],
            [(x + tx, y + ty) for x, y in pivots],
            [(x + tx, y + ty, _wrap(a)) for x, y, a in poses],
        )
        for prims, pivots, poses in built
    ]


# -- rasterisation ----------------------------------------------------------------------------


def _prepare(kind: str, rows: list[list[float]]) -> tuple[str, list[np.ndarray]]:
    """Per-sample parameter columns of one part's primitive, ready for `_distance`."""
    p = np.asarray(rows, dtype=np.float64)
    if kind == "disc":
        return kind, [p[:, 0], p[:, 1], p[:, 2]]
    if kind == "capsule":
        dx, dy = p[:, 2] - p[:, 0], p[:, 3] - p[:, 1]
        inverse = 1.0 / np.maximum(dx * dx + dy * dy, 1e-12)
        return kind, [p[:, 0], p[:, 1], dx, dy, inverse, p[:, 4]]
    xs, ys = p[:, 0:-1:2], p[:, 1:-1:2]  # polygon: vertices (x, y), then radius 0
    ex, ey = np.roll(xs, -1, axis=1) - xs, np.roll(ys, -1, axis=1) - ys
    orientation = np.sign((xs * np.roll(ys, -1, axis=1) - np.roll(xs, -1, axis=1) * ys).sum(1, keepdims=True))
    length = np.sqrt(ex * ex + ey * ey)
    nx, ny = orientation * ey / length, -orientation * ex / length  # outward unit normals
    offset = nx * xs + ny * ys
    return kind, [c for v in range(xs.shape[1]) for c in (nx[:, v], ny[:, v], offset[:, v])]


def _distance(kind: str, columns: list[np.ndarray], x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Signed distance (negative inside) of points (x, y); the columns broadcast against them.

    Exact for discs and capsules; for polygons the largest edge-line distance, exact inside and
    a lower bound outside. All are 1-Lipschitz, which `_rasterise` relies on. Only correctly
    rounded operations are used, so a value never depends on how samples are batched."""
    if kind == "disc":
        cx, cy, r = columns
        dx, dy = x - cx, y - cy
        return np.sqrt(dx * dx + dy * dy) - r
    if kind == "capsule":
        ax, ay, dx, dy, inverse, r = columns
        px, py = x - ax, y - ay
        t = np.clip((px * dx + py * dy) * inverse, 0.0, 1.0)
        qx, qy = px - t * dx, py - t * dy
        return np.sqrt(qx * qx + qy * qy) - r
    result = None
    for v in range(0, len(columns), 3):
        nx, ny, offset = columns[v : v + 3]
        d = nx * x + ny * y - offset
        result = d if result is None else np.maximum(result, d)
    return result


def _rasterise(parts: list[tuple[str, list[np.ndarray]]], size: int, supersample: int) -> np.ndarray:
    """Subsample counts (n, P+1, S, S) uint8 of each label, the top-most covering part winning.

    Pixel centres first, in float32: a part whose distance there is beyond the reach of the
    subsamples (plus a guard far above float32 error) covers all of them or none. Then, in
    float64, only the parts still undecided above the top-most part that surely covers a pixel
    are evaluated at its subsamples; so the result is that of evaluating every subsample."""
    n = len(parts[0][1][0])
    ss = supersample
    band = (ss - 1) / (2 * ss) * math.sqrt(2) + 1e-3  # the farthest subsample from its centre, + guard
    centres = np.arange(size, dtype=np.float32) + np.float32(0.5)
    x, y = centres[None, None, :], centres[None, :, None]
    inside = np.zeros((n, size, size), np.uint8)  # top-most part covering the whole pixel
    undecided = np.zeros((len(parts), n, size, size), bool)
    for k, (kind, columns) in enumerate(parts):
        d = _distance(kind, [c.astype(np.float32)[:, None, None] for c in columns], x, y)
        np.copyto(inside, k + 1, where=d <= -band)
        np.less(np.abs(d), band, out=undecided[k])
    labels = np.arange(len(parts) + 1, dtype=np.uint8)
    counts = (inside[:, None] == labels[None, :, None, None]).astype(np.uint8) * np.uint8(ss * ss)
    above = undecided & (labels[1:, None, None, None] > inside[None])
    b, r, c = np.nonzero(above.any(axis=0))
    if b.size:
        steps = np.arange(ss)
        sx = np.broadcast_to(((c[:, None, None] * ss + steps[None, None, :]) + 0.5) / ss, (b.size, ss, ss))
        sy = np.broadcast_to(((r[:, None, None] * ss + steps[None, :, None]) + 0.5) / ss, (b.size, ss, ss))
        sx, sy = sx.reshape(-1, ss * ss), sy.reshape(-1, ss * ss)
        top = np.repeat(inside[b, r, c][:, None], ss * ss, axis=1)
        for k, (kind, columns) in enumerate(parts):
            rows = np.flatnonzero(above[k, b, r, c])
            if rows.size:
                d = _distance(kind, [col[b[rows]][:, None] for col in columns], sx[rows], sy[rows])
                top[rows] = np.where(d <= 0, np.uint8(k + 1), top[rows])
        flat = (np.arange(b.size)[:, None] * len(labels) + top).ravel()
        counts[b, :, r, c] = np.bincount(flat, minlength=b.size * len(labels)).reshape(b.size, len(labels))
    return counts


def _hard_labels(counts: np.ndarray) -> np.ndarray:
    """argmax over the label axis (ties to the lower label), faster than np.argmax on axis 1."""
    best = counts[:, 0].copy()
    result = np.zeros(best.shape, np.int64)
    for k in range(1, counts.shape[1]):
        better = counts[:, k] > best
        result[better] = k
        np.maximum(best, counts[:, k], out=best)
    return result


def _palette(shading: str, max_parts: int) -> np.ndarray:
    """gamma: (P_max, C) float32, the value each part paints."""
    if shading == "silhouette":
        return np.ones((max_parts, 1), np.float32)
    if shading == "grey":
        return np.asarray(_GREY[:max_parts], np.float32)[:, None]
    return np.asarray(_COLOURS[:max_parts], np.float32)


def _render_states(layouts: list[_Layout], family_of: list[str], size, supersample, max_parts, max_joints, gamma):
    """The per-state fields of one joint state of every sample."""
    n = len(layouts)
    counts = np.zeros((n, max_parts + 1, size, size), np.uint8)
    by_family: dict[str, list[int]] = {}
    for i, family in enumerate(family_of):
        by_family.setdefault(family, []).append(i)
    chunk = max(16, 2**17 // (size * size))  # keep the temporaries small enough for the caches
    for family, indices in by_family.items():
        count = len(_FAMILIES[family].parts)
        for begin in range(0, len(indices), chunk):
            group = indices[begin : begin + chunk]
            parts = [
                _prepare(layouts[group[0]].prims[k][0], [_flat(layouts[i].prims[k]) for i in group])
                for k in range(count)
            ]
            counts[group, : count + 1] = _rasterise(parts, size, supersample)
    masks = counts.astype(np.float32) / np.float32(supersample * supersample)
    part_labels = _hard_labels(counts)
    visible = np.stack([(part_labels == k).any(axis=(1, 2)) for k in range(1, max_parts + 1)], axis=1)
    image = np.zeros((n, gamma.shape[1], size, size), np.float32)
    for k in range(max_parts):  # a fixed order of elementwise sums: the same bytes in any batch
        image += masks[:, k + 1, None] * gamma[k][None, :, None, None]
    joint_pos = np.zeros((n, max_joints, 2), np.float32)
    part_pose = np.zeros((n, max_parts, 3), np.float32)
    for i, layout in enumerate(layouts):
        joint_pos[i, : len(layout.pivots)] = layout.pivots
        part_pose[i, : len(layout.poses)] = layout.poses
    return {
        "image": image,
        "part_masks": masks,
        "part_labels": part_labels,
        "part_visible": visible,
        "joint_pos": joint_pos,
        "part_pose": part_pose,
    }


def _flat(prim: Primitive) -> list[float]:
    _, points, radius = prim
    return [v for point in points for v in point] + [radius]


def _render(
    shapes: list[_Shape],
    size: int,
    families: Sequence[str],
    jitter: bool = True,
    shading: str = "silhouette",
    supersample: int = 4,
) -> dict[str, np.ndarray]:
    """The fields of drawn shapes (no noise); pair fields when the shapes carry two states."""
    max_parts, max_joints = max_parts_and_joints(families)
    gamma = _palette(shading, max_parts)
    pairs = shapes[0].angles_b is not None
    placed = [_place(shape, size, jitter) for shape in shapes]
    family_of = [shape.family for shape in shapes]
    n = len(shapes)
    out: dict[str, np.ndarray] = {
        "label": np.asarray([families.index(f) for f in family_of], np.int64),
        "num_parts": np.asarray([len(_FAMILIES[f].parts) for f in family_of], np.int64),
        "theta0": np.asarray([shape.theta0 for shape in shapes], np.float32),
    }
    valid = np.zeros((n, max_joints), bool)
    for i, shape in enumerate(shapes):
        valid[i, : len(shape.angles)] = True
    out["joint_valid"] = valid
    states = ("_a", "_b") if pairs else ("",)
    for s, suffix in enumerate(states):
        fields = _render_states(
            [layouts[s] for layouts in placed], family_of, size, supersample, max_parts, max_joints, gamma
        )
        angles = np.zeros((n, max_joints), np.float32)
        for i, shape in enumerate(shapes):
            state = shape.angles if s == 0 else shape.angles_b
            angles[i, : len(state)] = state
        fields["joint_angles"] = angles
        out.update({key + suffix: value for key, value in fields.items()})
    if pairs:
        delta = np.zeros((n, max_joints), np.float32)
        for i, shape in enumerate(shapes):
            delta[i, : len(shape.angles)] = [_wrap(b - a) for a, b in zip(shape.angles, shape.angles_b)]
        out["delta_q"] = delta
        out["moved"] = delta != 0
    return out


# -- public API -------------------------------------------------------------------------------


def _check_families(families: Sequence[str] | str) -> tuple[str, ...]:
    families = (families,) if isinstance(families, str) else tuple(families)
    if not families:
        raise ValueError(f"families is empty; choose one or more of: {', '.join(ALL_FAMILIES)}")
    for name in families:
        if name not in _FAMILIES:
            raise ValueError(f"unknown articulated family {name!r}; choose from: {', '.join(ALL_FAMILIES)}")
    if len(set(families)) != len(families):
        raise ValueError(f"families {families!r} names a family twice; give each once")
    return families


def _check_int(name: str, value, low: int, high: int | None = None, hint: str = "") -> None:
    ok = isinstance(value, int | np.integer) and not isinstance(value, bool) and value >= low
    if not ok or (high is not None and value > high):
        bound = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
        raise ValueError(f"{name} {value!r} is not valid; choose {hint or bound}")


def _check_size(size) -> None:
    hint = f"one of {', '.join(map(str, SIZES))} (or another integer >= {MIN_SIZE})"
    _check_int("size", size, MIN_SIZE, hint=hint)


def generate(
    count: int,
    seed: int = 0,
    size: int = 32,
    families: Sequence[str] = FAMILIES,
    split: str = "train",
    pairs: bool = False,
    jitter: bool = True,
    rotate: bool = True,
    noise: float = 0.0,
    shading: str = "silhouette",
    supersample: int = 4,
    start: int = 0,
) -> dict[str, np.ndarray]:
    """Samples start .. start+count-1 of a split as batched arrays (first axis = sample).

    Sample i is of family families[i % len(families)] (balanced classes), label its position in
    `families`. See the module docstring for the fields, the pair fields and the ranges."""
    families = _check_families(families)
    _check_int("count", count, 1)
    _check_int("seed", seed, 0, _MAX_INDEX - 1)
    _check_int("start", start, 0, _MAX_INDEX - count)
    _check_size(size)
    _check_int("supersample", supersample, 1, 15)  # ss*ss subsample counts are kept in uint8
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from: {', '.join(SPLITS)}")
    if shading not in SHADINGS:
        raise ValueError(f"unknown shading {shading!r}; choose from: {', '.join(SHADINGS)}")
    if not (isinstance(noise, int | float | np.floating) and math.isfinite(noise) and noise >= 0):
        raise ValueError(f"noise {noise!r} is not valid; choose a standard deviation >= 0, e.g. 0.05")
    shapes, rngs = [], []
    for i in range(start, start + count):
        rng = _sample_rng(seed, split, i)
        shapes.append(_draw_shape(families[i % len(families)], rng, split, pairs, rotate))
        rngs.append(rng)
    out = _render(shapes, size, families, jitter, shading, supersample)
    if noise > 0:  # drawn after the shape, from the sample's own stream
        for key in ("image_a", "image_b") if pairs else ("image",):
            images = out[key]
            for j, rng in enumerate(rngs):
                images[j] += (noise * rng.standard_normal(images.shape[1:])).astype(np.float32)
    return out


# -- the Dataset, cached ----------------------------------------------------------------------

_KEPT = ("image", "label", "part_masks", "part_labels", "joint_angles", "joint_valid", "joint_pos")
_SUPERSAMPLE = 4  # load_articulated's default rendering: masks are multiples of 1/16


def _cache_path(size: int, families: tuple[str, ...], split: str, count: int, seed: int) -> Path:
    name = f"{split}-n{count}-s{size}-seed{seed}-{'+'.join(families)}-v{CACHE_VERSION}.npz"
    return data_root() / "articulated" / name


def _generate_split(size, families, split, count, seed, progress) -> dict[str, np.ndarray]:
    """The fields `load_articulated` keeps, generated in chunks (same bytes as one call)."""
    chunk = 2000
    parts: list[dict[str, np.ndarray]] = []
    bar = task = None
    if progress:
        from rich.progress import Progress

        bar = Progress()
        bar.start()
        task = bar.add_task(f"generate articulated {split}", total=count)
    try:
        for begin in range(0, count, chunk):
            n = min(chunk, count - begin)
            arrays = generate(n, seed=seed, size=size, families=families, split=split, start=begin)
            parts.append({key: arrays[key] for key in _KEPT})
            if bar is not None:
                bar.advance(task, n)
    finally:
        if bar is not None:
            bar.stop()
    return {key: np.concatenate([p[key] for p in parts]) for key in _KEPT}


def _save(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write compactly (masks as uint8 subsample counts, labels as uint8), atomically."""
    compact = dict(arrays)
    compact["part_masks"] = np.rint(arrays["part_masks"] * _SUPERSAMPLE**2).astype(np.uint8)
    compact["part_labels"] = arrays["part_labels"].astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.stem, suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(f, **compact)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _load(path: Path, count: int, size: int) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in _KEPT}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path} is truncated or corrupt ({exc}); delete it and try again") from exc
    if arrays["image"].shape[0] != count or arrays["image"].shape[-1] != size:
        raise DataError(f"{path} holds {arrays['image'].shape}, not {count} images of side {size}; delete it")
    arrays["part_masks"] = arrays["part_masks"].astype(np.float32) / np.float32(_SUPERSAMPLE**2)
    arrays["part_labels"] = arrays["part_labels"].astype(np.int64)
    return arrays


def _split_arrays(size, families, split, count, seed, cache, progress) -> tuple[dict[str, np.ndarray], str]:
    path = _cache_path(size, families, split, count, seed)
    if cache and path.is_file():
        return _load(path, count, size), str(path)
    arrays = _generate_split(size, families, split, count, seed, progress)
    if cache:
        _save(path, arrays)
    return arrays, "generated"


def load_articulated(
    size: int = 32,
    families: Sequence[str] = FAMILIES,
    split: str = "iid",
    train: int = 20000,
    test: int = 4000,
    seed: int = 0,
    cache: bool = True,
    progress: bool = False,
    flatten: bool = False,
) -> Dataset:
    """The articulated shapes as a `Dataset`, with part masks and joints in `extras`.

    Train = the train stream; test = the in-distribution test stream (split "iid") or the ood
    stream (split "ood"). Images are standardised with train channel statistics, like the other
    datasets. `extras` holds train_/test_ part_masks, part_labels, joint_angles, joint_valid and
    joint_pos as tensors. Each stream is cached as one .npz under `data_root() / "articulated"`."""
    families = _check_families(families)
    _check_size(size)
    _check_int("train", train, 1)
    _check_int("test", test, 1)
    _check_int("seed", seed, 0, _MAX_INDEX - 1)
    if split not in TEST_SPLITS:
        raise ValueError(f"unknown articulated split {split!r}; choose from: {', '.join(TEST_SPLITS)}")
    train_arrays, train_origin = _split_arrays(size, families, "train", train, seed, cache, progress)
    test_split = "test" if split == "iid" else "ood"
    test_arrays, test_origin = _split_arrays(size, families, test_split, test, seed, cache, progress)
    arrays = (train_arrays["image"], train_arrays["label"], test_arrays["image"], test_arrays["label"])
    origin = "generated" if train_origin == test_origin == "generated" else f"{train_origin}; {test_origin}"
    data = to_dataset("articulated", arrays, origin, flatten)
    data.num_classes = len(families)
    for prefix, source in (("train", train_arrays), ("test", test_arrays)):
        for key in _KEPT[2:]:
            data.extras[f"{prefix}_{key}"] = torch.from_numpy(source[key])
    return data
