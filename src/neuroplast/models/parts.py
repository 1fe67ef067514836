"""Part-query articulation encoder (PQAE): a small transformer over patches of the image and its
coordinate channels, K learned part queries that compete for its tokens (softmax over the
queries), soft pixel masks that sum to one at every pixel, pose descriptors computed from the
masks, a class readout, optional joint angles and a spatial-broadcast reconstruction. Metrics
for parts (Hungarian mIoU, foreground ARI), joints (angular error) and equivariance.

Attention: every block is a `MoBAttention` (dense with full=True, MoBA otherwise) whose query and
key projections are followed by a per-head RMSNorm (`HeadRMSNorm`), so QK normalisation holds
for both kinds. With attention="moba" the tokens run through the blocks in tile order, so each
MoBA block is a square tile of the patch grid (as in the ViT), and are put back in raster order
for the part queries.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from neuroplast.attention import ATTENTIONS, MoBAttention, TileOrder, square_tile
from neuroplast.models.vit import Block, patchify

TRANSFORMS = ("rot90", "rot180", "rot270", "hflip", "vflip")
# how mask supervision pairs queries with true part channels: the best matching per sample, or
# query k always with channel k (measured worse: part mIoU 0.37 against 0.50, docs/parts.md)
MASK_MATCHINGS = ("hungarian", "fixed")


@dataclass
class PartsOutput:
    logits: torch.Tensor  # (B, classes)
    masks: torch.Tensor  # (B, K, H, W), sums to one over K
    descriptors: torch.Tensor  # (B, K, 6): area, centroid (u, v), cos 2θ, sin 2θ, elongation
    assignment: torch.Tensor  # (B, K, N): the last competition's softmax over K, tokens in raster order
    reconstruction: torch.Tensor | None  # (B, C, H, W)
    angles: torch.Tensor | None  # (B, J, 2): unit (sin, cos) per joint


def pixel_coordinates(height: int, width: int) -> torch.Tensor:
    """(3, H, W): u (along the columns), v (along the rows, downward) at the pixel centres in
    [-1, 1], and rho = sqrt(u^2 + v^2)."""
    v, u = torch.meshgrid(
        (torch.arange(height) + 0.5) / height * 2 - 1, (torch.arange(width) + 0.5) / width * 2 - 1, indexing="ij"
    )
    return torch.stack([u, v, (u * u + v * v).sqrt()])


def pose_descriptors(masks: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """(B, K, H, W) soft masks -> (B, K, 6) descriptors [area, mu_u, mu_v, cos 2θ, sin 2θ, e] in
    pixel-centre coordinates u, v in [-1, 1] (v downward): area = mass / (H W); mu the centroid;
    θ = ½ atan2(2 Σ_uv, Σ_uu - Σ_vv) the axis of the covariance Σ, encoded by (cos 2θ, sin 2θ)
    (an axis is π-periodic); e = log((λ1 + eps) / (λ2 + eps)) with λ1 >= λ2 the eigenvalues of Σ.
    The orientation is (Σ_uu - Σ_vv, 2 Σ_uv) / sqrt(r^2 + eps^2), r its norm, so it is smooth
    everywhere and fades to (0, 0) as a part becomes isotropic, where the axis is undefined."""
    *_, height, width = masks.shape
    u, v, _ = pixel_coordinates(height, width).to(masks)
    mass = masks.sum((-2, -1))
    weights = masks / (mass[..., None, None] + 1e-8)
    mu_u, mu_v = (weights * u).sum((-2, -1)), (weights * v).sum((-2, -1))
    du, dv = u - mu_u[..., None, None], v - mu_v[..., None, None]
    s_uu, s_vv, s_uv = (
        (weights * du * du).sum((-2, -1)),
        (weights * dv * dv).sum((-2, -1)),
        (weights * du * dv).sum((-2, -1)),
    )
    difference, twice_uv = s_uu - s_vv, 2 * s_uv
    spread = (difference.square() + twice_uv.square() + eps * eps).sqrt()  # smooth, for the axis
    exact = (difference.square() + twice_uv.square()).clamp_min(1e-20).sqrt()  # for the eigenvalues
    trace = s_uu + s_vv
    major = (trace + exact) / 2
    minor = ((trace - exact) / 2).clamp_min(0)
    elongation = torch.log((major + eps) / (minor + eps))
    area = mass / (height * width)
    return torch.stack([area, mu_u, mu_v, difference / spread, twice_uv / spread, elongation], -1)


class HeadRMSNorm(nn.Module):
    """A projection, then RMSNorm over each of its first `heads` head_dim-wide chunks; the rest
    passes through. It replaces MoBAttention's `q` (all chunks are query heads) and `kv` (the key
    heads come first, then the values) to give QK-RMSNorm without changing the attention."""

    def __init__(self, projection: nn.Linear, head_dim: int, heads: int):
        super().__init__()
        self.projection, self.head_dim, self.heads = projection, head_dim, heads
        self.norm = nn.RMSNorm(head_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.projection(x)
        split = self.heads * self.head_dim
        normed = self.norm(y[..., :split].unflatten(-1, (self.heads, self.head_dim))).flatten(-2)
        return torch.cat([normed, y[..., split:]], -1) if split < y.shape[-1] else normed


def qk_normed_attention(dim: int, heads: int, full: bool, block_size: int, top_k: int) -> MoBAttention:
    attention = MoBAttention(
        dim, heads, block_size=block_size, top_k=top_k, causal=False, force_own_block=True, full=full
    )
    attention.q = HeadRMSNorm(attention.q, attention.head_dim, attention.heads)
    attention.kv = HeadRMSNorm(attention.kv, attention.head_dim, attention.kv_heads)
    return attention


def mlp(n_in: int, hidden: int, n_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_in, hidden), nn.GELU(), nn.Linear(hidden, n_out))


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


class PartQueryEncoder(nn.Module):
    """The part-query articulation encoder, a classifier (`forward` gives logits) whose `parts`
    gives the masks, descriptors and the rest (`PartsOutput`).

    Tokens: the image and its coordinate channels (u, v, rho) cut into patch_size x patch_size
    patches, a Linear to `dim`, learned positions (`positions`), `depth` pre-LN blocks with
    QK-RMSNorm (attention "dense", or "moba": `block_size` tokens a square tile, `top_k` blocks
    per query). Part queries: `parts` learned queries, `iterations` rounds of competition (softmax
    over the queries, weights normalised per query, q <- q + MLP(LN(u))). Masks: per pixel,
    softmax over the queries of (W_m q_k) . t_patch / sqrt(dim) + (W_p q_k) . phi(p) / sqrt(r),
    phi(p) = S(t_patch)[p] + C([u, v, x])(p) in R^r (r = `pixel_rank`): S a Linear from a token to
    r features at each of its patch's pixels (LARM's per-patch pixel head), C two 3x3 convolutions
    of the image and its coordinates. Readout:
    MLP([u_k; descriptors_k]) averaged over k, LN, Linear. `joints` > 0 adds a head of unit (sin,
    cos) per joint on the pooled feature; `reconstruction` a spatial-broadcast decoder
    c_k(p) = A(q_k) psi(u, v) + b(q_k) (psi: `decoder_width` learned functions of position shared by
    the parts) composited by the masks. The loss weights are those of
    `training_loss`.
    """

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        num_classes: int,
        patch_size: int = 4,
        dim: int = 64,
        depth: int = 2,
        heads: int = 4,
        mlp_ratio: int = 2,
        parts: int = 8,
        iterations: int = 3,
        attention: str = "dense",
        block_size: int = 16,
        top_k: int = 3,
        joints: int = 0,
        reconstruction: bool = True,
        dropout: float = 0.0,
        positions: bool = True,
        decoder_width: int = 32,
        pixel_rank: int = 8,
        rec_weight: float = 1.0,
        entropy_weight: float = 0.01,
        balance_weight: float = 0.01,
        mask_weight: float = 1.0,
        angle_weight: float = 1.0,
        mask_matching: str = "hungarian",
    ):
        super().__init__()
        channels, height, width = image_shape
        if attention not in ATTENTIONS:
            raise ValueError(f"unknown attention {attention!r}; choose from: {', '.join(ATTENTIONS)}")
        if height % patch_size or width % patch_size:
            valid = sorted(set(divisors(height)) & set(divisors(width)))
            raise ValueError(
                f"patch_size {patch_size} does not divide the {height}x{width} image; "
                f"choose from: {', '.join(map(str, valid))}"
            )
        if parts < 2:
            raise ValueError(f"parts must be at least 2 (queries compete for the tokens), got {parts}")
        if iterations < 1:
            raise ValueError(f"iterations must be at least 1, got {iterations}")
        if mask_matching not in MASK_MATCHINGS:
            raise ValueError(f"unknown mask_matching {mask_matching!r}; choose from: {', '.join(MASK_MATCHINGS)}")
        if pixel_rank < 1:
            raise ValueError(f"pixel_rank must be at least 1, got {pixel_rank}")
        if joints < 0:
            raise ValueError(f"joints must be 0 (no joint head) or more, got {joints}")
        self.image_shape, self.patch_size, self.dim = (channels, height, width), patch_size, dim
        self.num_parts, self.iterations, self.num_joints = parts, iterations, joints
        self.rec_weight, self.entropy_weight, self.balance_weight = rec_weight, entropy_weight, balance_weight
        self.mask_weight, self.angle_weight, self.mask_matching = mask_weight, angle_weight, mask_matching
        self.grid = (height // patch_size, width // patch_size)
        tokens = self.grid[0] * self.grid[1]
        self.register_buffer("coordinates", pixel_coordinates(height, width), persistent=False)

        self.embed = nn.Linear((channels + 3) * patch_size * patch_size, dim)
        self.position = nn.Parameter(torch.randn(1, tokens, dim) * 0.02) if positions else None
        self.tiles = TileOrder(self.grid, square_tile(*self.grid, block_size)) if attention == "moba" else None
        self.blocks = nn.Sequential(
            *[
                Block(dim, qk_normed_attention(dim, heads, attention == "dense", block_size, top_k), mlp_ratio, dropout)
                for _ in range(depth)
            ]
        )
        self.norm = nn.LayerNorm(dim)

        self.queries = nn.Parameter(torch.randn(parts, dim))
        self.norm_tokens, self.norm_queries, self.norm_update = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.to_query, self.to_key, self.to_value = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.update = mlp(dim, mlp_ratio * dim, dim)

        # pixel-resolution masks: a token's logit is shared by its patch's pixels (at 4x4 patches
        # that caps the part mIoU of the thin links at 0.35, measured on the true masks pooled to
        # patches), so every pixel adds a logit of its own from r features: a per-patch linear
        # head gives each pixel of the patch its own features from the token, and two 3x3
        # convolutions of [u, v, x] add the local image. With mask supervision (5 epochs, 10k
        # shapes) the mIoU went from 0.50 (a Linear of [u, v, x] per pixel instead) to 0.57.
        self.to_mask = nn.Linear(dim, dim, bias=False)
        self.pixel_rank = pixel_rank
        self.to_pixel_query = nn.Linear(dim, pixel_rank, bias=False)
        self.subpixel = nn.Linear(dim, patch_size * patch_size * pixel_rank)
        self.local = nn.Sequential(
            nn.Conv2d(channels + 2, 16, 3, padding=1), nn.GELU(), nn.Conv2d(16, pixel_rank, 3, padding=1)
        )

        self.readout = mlp(dim + 6, mlp_ratio * dim, dim)
        self.norm_pooled = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self.joint_head = nn.Linear(dim, 2 * joints) if joints else None
        if reconstruction:
            # a factorised spatial-broadcast decoder: c_k(p) = A(q_k) psi(p) + b(q_k), with psi a
            # learned basis of `decoder_width` functions of (u, v) shared by all parts. Its cost
            # per part and pixel is one dot product; an MLP on [q_k, u, v] evaluated at every part
            # and pixel made a training step 4.6x slower (2.9 vs 0.63 s without a decoder, batch
            # 128 at 32x32, 2 threads)
            self.decode_basis = nn.Sequential(
                nn.Linear(2, decoder_width), nn.GELU(), nn.Linear(decoder_width, decoder_width), nn.GELU()
            )
            self.decode_query = nn.Linear(dim, (decoder_width + 1) * channels)
        else:
            self.decode_basis = self.decode_query = None

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, N, dim), raster order."""
        coordinates = self.coordinates.to(x.dtype).expand(x.shape[0], -1, -1, -1)
        patches = patchify(torch.cat([x, coordinates], 1), self.patch_size)
        if self.tiles is not None:
            patches = self.tiles.tiled(patches)
        t = self.embed(patches)
        if self.position is not None:
            t = t + (self.position if self.tiles is None else self.tiles.tiled(self.position))
        t = self.norm(self.blocks(t))
        return t if self.tiles is None else self.tiles.raster(t)

    def parts(self, x: torch.Tensor) -> PartsOutput:
        self._check_input(x)
        batch, p = x.shape[0], self.patch_size
        t = self.tokens(x)
        keys, values = self.to_key(self.norm_tokens(t)), self.to_value(t)
        q = self.queries.expand(batch, -1, -1)
        for _ in range(self.iterations):
            scores = self.to_query(self.norm_queries(q)) @ keys.transpose(1, 2) / math.sqrt(self.dim)
            assignment = scores.softmax(1)  # each token's weights over the K queries sum to one
            weights = assignment / (assignment.sum(-1, keepdim=True) + 1e-8)
            summary = weights @ values  # u_k
            q = q + self.update(self.norm_update(summary))

        # (W_m q_k) . t_patch(p) per token, upsampled, plus (W_p q_k) . phi(p) per pixel
        token_logits = (self.to_mask(q) @ t.transpose(1, 2)).unflatten(-1, self.grid)
        token_logits = token_logits.repeat_interleave(p, -2).repeat_interleave(p, -1)
        (rows, columns), rank = self.grid, self.pixel_rank
        subpixel = self.subpixel(t).view(batch, rows, columns, p, p, rank)
        subpixel = subpixel.permute(0, 5, 1, 3, 2, 4).reshape(batch, rank, rows * p, columns * p)
        coordinates = self.coordinates[:2].to(x.dtype).expand(batch, -1, -1, -1)
        pixels = subpixel + self.local(torch.cat([coordinates, x], 1))  # (B, r, H, W)
        pixel_logits = torch.einsum("bkr,brhw->bkhw", self.to_pixel_query(q), pixels)
        masks = (token_logits / math.sqrt(self.dim) + pixel_logits / math.sqrt(rank)).softmax(1)

        descriptors = pose_descriptors(masks)
        pooled = self.readout(torch.cat([summary, descriptors], -1)).mean(1)
        feature = self.norm_pooled(pooled)
        angles = None
        if self.joint_head is not None:
            angles = F.normalize(self.joint_head(feature).view(batch, self.num_joints, 2), dim=-1)
        reconstruction = None
        if self.decode_query is not None:
            channels, height, width = self.image_shape
            basis = self.decode_basis(coordinates[0, :2].flatten(1).T)  # (HW, w)
            basis = torch.cat([basis, torch.ones_like(basis[:, :1])], 1)  # the bias as one more function
            coefficients = self.decode_query(q).view(batch, self.num_parts, channels, -1)  # (B, K, C, w + 1)
            colours = coefficients @ basis.T  # (B, K, C, HW)
            reconstruction = torch.einsum("bkp,bkcp->bcp", masks.flatten(2), colours).view(
                batch, channels, height, width
            )
        return PartsOutput(self.head(feature), masks, descriptors, assignment, reconstruction, angles)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.parts(x).logits

    def training_loss(
        self, x: torch.Tensor, y: torch.Tensor, targets: dict | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, logits): cross-entropy + rec_weight * MSE(reconstruction, x) + entropy_weight *
        mean per-pixel entropy of the masks + balance_weight * KL(mask usage over the batch ||
        uniform); with targets["part_masks"] (B, P+1, H, W; channel 0 the background) +
        mask_weight * (Dice + BCE) of the Hungarian-matched masks; with targets["joint_angles"]
        and targets["joint_valid"] (B, J) and a joint head + angle_weight * squared error of
        (sin, cos) over the valid joints."""
        targets = targets or {}
        out = self.parts(x)
        loss = F.cross_entropy(out.logits, y)
        if out.reconstruction is not None and self.rec_weight:
            loss = loss + self.rec_weight * F.mse_loss(out.reconstruction, x)
        masks = out.masks
        if self.entropy_weight:
            entropy = -(masks * masks.clamp_min(1e-12).log()).sum(1).mean()
            loss = loss + self.entropy_weight * entropy
        if self.balance_weight:
            # over the whole batch, not per image: one image may use a few parts, the queries
            # as a whole should not collapse onto a few
            usage = masks.mean((0, 2, 3))
            loss = loss + self.balance_weight * (usage * (usage * self.num_parts).clamp_min(1e-12).log()).sum()
        if "part_masks" in targets and self.mask_weight:
            loss = loss + self.mask_weight * self.mask_loss(masks, targets["part_masks"])
        if "joint_angles" in targets and "joint_valid" in targets and out.angles is not None:
            loss = loss + self.angle_weight * self.angle_loss(
                out.angles, targets["joint_angles"], targets["joint_valid"], targets.get("joint_perms")
            )
        return loss, out.logits

    def mask_loss(self, masks: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
        """Dice + BCE between each non-empty ground-truth channel and its matched mask (Hungarian,
        or query k for channel k with mask_matching="fixed")."""
        if true.shape[1] > self.num_parts:
            raise ValueError(
                f"mask supervision needs parts >= {true.shape[1]} (one query per ground-truth channel, "
                f"background included), got parts={self.num_parts}"
            )
        if true.shape[0] != masks.shape[0] or true.shape[2:] != masks.shape[2:]:
            raise ValueError(f"part_masks {tuple(true.shape)} do not fit the masks {tuple(masks.shape)}")
        true = true.to(masks.dtype)
        if self.mask_matching == "fixed":
            present = true.flatten(2).sum(-1) > 0
            match = torch.arange(true.shape[1], device=masks.device).expand(len(true), -1)
            match = torch.where(present, match, -1)
        else:
            match = hungarian_match(masks.detach(), true).to(masks.device)
        sample, channel = (match >= 0).nonzero(as_tuple=True)
        if not len(sample):  # no part in any sample
            return masks.sum() * 0
        predicted = masks[sample, match[sample, channel]].flatten(1)
        wanted = true[sample, channel].flatten(1)
        dice = 1 - (2 * (predicted * wanted).sum(1) + 1) / (predicted.sum(1) + wanted.sum(1) + 1)
        # written out: F.binary_cross_entropy refuses to run under autocast
        bce = -(wanted * predicted.clamp_min(1e-6).log() + (1 - wanted) * (1 - predicted).clamp_min(1e-6).log())
        return dice.mean() + bce.mean()

    def angle_loss(
        self, angles: torch.Tensor, true: torch.Tensor, valid: torch.Tensor, perms: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Squared error of the unit (sin, cos) over the valid joints; with `perms` (B, G, J),
        each sample's joints relabelled by the permutation that fits it best (the angles of
        joints an image cannot tell apart, such as a stick figure's left and right arm, are
        defined only up to swapping them)."""
        if true.shape != angles.shape[:2] or valid.shape != true.shape:
            raise ValueError(
                f"joint_angles {tuple(true.shape)} and joint_valid {tuple(valid.shape)} must both be "
                f"(B, J) = {tuple(angles.shape[:2])}"
            )
        true, valid = permuted_joints(true, valid, perms)
        wanted = torch.stack([true.sin(), true.cos()], -1).to(angles.dtype)
        valid = valid.to(angles.dtype)
        error = ((angles[:, None] - wanted).square().sum(-1) * valid).sum(-1).min(1).values
        return error.sum() / valid[:, 0].sum().clamp_min(1)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or tuple(x.shape[1:]) != self.image_shape:
            expected = ", ".join(map(str, self.image_shape))
            raise ValueError(f"expected images of shape (B, {expected}), got {tuple(x.shape)}")


def soft_iou(pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """(B, K, H, W), (B, P, H, W) -> (B, K, P): sum(a b) / (sum a + sum b - sum(a b))."""
    inter = torch.einsum("bkhw,bphw->bkp", pred, true)
    union = pred.sum((-2, -1))[:, :, None] + true.sum((-2, -1))[:, None, :] - inter
    return inter / union.clamp_min(1e-8)


@torch.no_grad()
def hungarian_match(pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """Per sample, the matching of predicted masks (B, K, H, W) to true masks (B, P, H, W) that
    minimises the total cost 1 - soft IoU: (B, P) long, the predicted index matched to each true
    channel, or -1 for an empty true channel (or an unmatched one, when K is smaller)."""
    from scipy.optimize import linear_sum_assignment  # here: importing it takes longer than all of neuroplast

    iou = soft_iou(pred.double(), true.double()).cpu().numpy()
    present = (true.flatten(2).sum(-1) > 0).cpu().numpy()
    match = np.full(true.shape[:2], -1, dtype=np.int64)
    for b in range(true.shape[0]):
        columns = np.flatnonzero(present[b])
        rows, picked = linear_sum_assignment(1 - iou[b][:, columns])
        match[b, columns[picked]] = rows
    return torch.from_numpy(match)


def _hard(masks: torch.Tensor) -> torch.Tensor:
    return F.one_hot(masks.argmax(1), masks.shape[1]).permute(0, 3, 1, 2).to(torch.float64)


@torch.no_grad()
def part_miou(pred_masks: torch.Tensor, true_masks: torch.Tensor) -> torch.Tensor:
    """(B,) float64: per sample, the mean IoU of hard masks (argmax) after Hungarian matching,
    over the true channels present (background included; an unmatched one scores 0)."""
    pred, true = _hard(pred_masks), _hard(true_masks)
    match = hungarian_match(pred, true).to(pred.device)
    iou = soft_iou(pred, true)  # exact IoU on hard masks
    present = match >= 0
    matched = iou.gather(1, match.clamp_min(0)[:, None]).squeeze(1) * present
    return matched.sum(1) / present.sum(1).clamp_min(1)


@torch.no_grad()
def foreground_ari(pred_masks: torch.Tensor, true_labels: torch.Tensor) -> torch.Tensor:
    """(B,) float64: per sample, the adjusted Rand index between the argmax of the masks (B, K, H,
    W) and the true labels (B, H, W; 0 = background) over the foreground pixels; nan for a sample
    without foreground. Agreement by chance is 0, identical partitions 1 (as in
    sklearn.metrics.adjusted_rand_score, also when the index is degenerate)."""
    pred = F.one_hot(pred_masks.argmax(1).flatten(1), pred_masks.shape[1]).double()
    labels = true_labels.flatten(1).long()
    true = F.one_hot(labels, int(labels.max()) + 1).double() * (labels > 0)[..., None]
    counts = torch.einsum("bnk,bnp->bkp", pred, true)  # contingency over the foreground pixels

    def pairs(n: torch.Tensor) -> torch.Tensor:
        return n * (n - 1) / 2

    n = counts.sum((1, 2))
    index = pairs(counts).sum((1, 2))
    pred_pairs, true_pairs = pairs(counts.sum(2)).sum(1), pairs(counts.sum(1)).sum(1)
    expected = pred_pairs * true_pairs / pairs(n).clamp_min(1)
    maximum = (pred_pairs + true_pairs) / 2
    denominator = maximum - expected
    ari = torch.where(
        denominator == 0, torch.ones_like(n), (index - expected) / torch.where(denominator == 0, 1, denominator)
    )
    return torch.where(n > 0, ari, torch.nan)


def permuted_joints(
    true: torch.Tensor, valid: torch.Tensor, perms: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, G, J) copies of the true angles and validity, joints relabelled by each of the sample's
    G permutations `perms` (B, G, J) (`neuroplast.data.articulated.joint_permutations` indexed
    by the labels); G = 1, unchanged, without them."""
    if perms is None:
        return true[:, None], valid[:, None]
    if perms.dim() != 3 or perms.shape[0] != true.shape[0] or perms.shape[2] != true.shape[1]:
        raise ValueError(f"joint_perms {tuple(perms.shape)} must be (B, G, J) with (B, J) = {tuple(true.shape)}")
    perms = perms.to(true.device)
    rows = torch.arange(len(true), device=true.device)[:, None, None]
    return true[rows, perms], valid[rows, perms]


def angle_error_degrees(
    pred_sincos: torch.Tensor, true_angles: torch.Tensor, valid: torch.Tensor, perms: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean absolute angular error in degrees, in [0, 180], of atan2(sin, cos) of the predictions
    (B, J, 2) against the true angles (B, J, radians) over the valid joints; a float64 scalar
    tensor, nan if no joint is valid. With `perms` (B, G, J), each sample is scored against the
    relabelling of its joints that fits it best (`permuted_joints`)."""
    true_angles, valid = permuted_joints(true_angles, valid.bool(), perms)
    predicted = torch.atan2(pred_sincos[..., 0], pred_sincos[..., 1]).double()[:, None]
    difference = torch.remainder(predicted - true_angles.double() + math.pi, 2 * math.pi) - math.pi
    errors = difference.abs() * valid
    best = errors.sum(-1).argmin(1)
    rows = torch.arange(len(best), device=best.device)
    return errors[rows, best][valid[rows, best]].mean().rad2deg()  # the mean of nothing is nan


def grid_transform(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """An exact transform of the last two (image) dimensions: rot90/180/270 (counter-clockwise as
    shown with rows downward, torch.rot90's sense), hflip (columns reversed), vflip (rows)."""
    if name not in TRANSFORMS:
        raise ValueError(f"unknown transform {name!r}; choose from: {', '.join(TRANSFORMS)}")
    if name.startswith("rot"):
        turns = int(name[3:]) // 90
        return lambda t: torch.rot90(t, turns, dims=(-2, -1))
    return lambda t: t.flip(-1 if name == "hflip" else -2)


@torch.no_grad()
def equivariance_error(
    model: PartQueryEncoder, x: torch.Tensor, transform: str | Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """How far the masks of T(x) are from T(masks of x), after a Hungarian matching of the queries
    per sample: the mean over samples and pixels of sum_k (M_k(T x) - T M(x)_matched)^2, 0 when
    equivariant, at most 2 (a scalar tensor). transform: a name in TRANSFORMS or a function of (..., H, W) tensors.
    Measured in eval mode; the model's mode is restored."""
    if isinstance(transform, str):
        if transform in ("rot90", "rot270") and x.shape[-1] != x.shape[-2]:
            raise ValueError(f"{transform} needs square images, got {x.shape[-2]}x{x.shape[-1]}")
        transform = grid_transform(transform)
    training = model.training
    model.eval()
    try:
        of_transformed = model.parts(transform(x)).masks
        transformed = transform(model.parts(x).masks)
    finally:
        model.train(training)
    match = hungarian_match(of_transformed, transformed).to(x.device)
    if (match < 0).any():
        raise ValueError("a transformed mask is empty everywhere; the masks cannot be matched")
    matched = of_transformed.gather(1, match[:, :, None, None].expand_as(transformed))
    return (matched - transformed).square().sum(1).mean()
