"""Parts studies: model variants x datasets x seeds from one TOML file, with part and articulation
metrics on top of accuracy.

Every cell is one `neuroplast train` run in `<out>/<dataset>/<variant>/seed<seed>`, run through the
grid runner every study uses (finished cells are never re-run, interrupted ones resume). After
training, a cell scores its final model once more and writes `parts_metrics.json`: parameters,
training seconds per epoch, test accuracy, and on the articulated set the out-of-distribution
accuracy (joint angles outside the training ranges); for part-query models also part mIoU and
foreground ARI against the true parts, joint-angle error, and the equivariance error of the masks
under 90° rotations and flips.

Config format:

    [study]
    variants = ["cnn", "vit", "parts"]     # names of [variants.NAME] tables
    datasets = ["articulated", "digits"]
    seeds = [0, 1, 2]
    workers = 1
    out = "runs/parts"

    [variants.cnn]                         # RunConfig keys; `datasets` limits where it runs
    model = "cnn"
    cnn_hidden = 32

    [datasets.fashion-mnist]               # RunConfig keys for one dataset (e.g. fewer epochs)
    epochs = 5

    [run]                                  # RunConfig keys shared by every cell
    method = "dense"
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from neuroplast.data import Dataset
from neuroplast.experiments.runner import cached_dataset, run_cells, study_table, workers_setting
from neuroplast.experiments.study import list_setting
from neuroplast.train.checkpoint import find_checkpoint, load_checkpoint
from neuroplast.train.config import ConfigError, RunConfig, load_toml
from neuroplast.train.trainer import Run, evaluate, model_for, read_metrics, train, write_atomic

STUDY_KEYS = ("variants", "datasets", "seeds", "workers", "out")
DEFAULT_OUT = "runs/parts"
PART_MODELS = ("parts", "moba-parts")
METRIC_SAMPLES = 1000  # test images scored for masks and angles
EQUIVARIANCE_SAMPLES = 256


@dataclass
class Cell:
    variant: str
    dataset: str
    config: RunConfig
    folder: Path
    name: str


@dataclass
class PartsStudy:
    out: Path
    workers: int
    variants: list[str]
    datasets: list[str]
    cells: list[Cell]


def _run_table(table, where: str, extra: tuple[str, ...] = ()) -> dict:
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table of RunConfig keys, not {table!r}")
    for key in ("dataset", "seed"):
        if key in table:
            raise ConfigError(f"{where} sets {key!r}; a study sets it per cell from [study]")
    RunConfig.from_dict({k: v for k, v in table.items() if k not in extra}, where)
    return table


def parse_parts_study(
    values: dict, source: str = "config", out: str | Path | None = None, workers: int | None = None
) -> PartsStudy:
    table = study_table(
        values, source, ("study", "variants.NAME", "datasets.NAME", "run"), STUDY_KEYS, "variants, datasets, seeds"
    )
    variants = list_setting(table, "variants", "[study]", str, '["cnn", "parts"]')
    datasets = list_setting(table, "datasets", "[study]", str, '["articulated", "digits"]')
    seeds = list_setting(table, "seeds", "[study]", int, "[0, 1, 2]")
    variant_tables = values.get("variants", {})
    for name in variants:
        if name not in variant_tables:
            raise ConfigError(
                f"[study] variants names {name!r} but {source} has no [variants.{name}] table; "
                f"tables: {', '.join(variant_tables) or 'none'}"
            )
        _run_table(variant_tables[name], f"[variants.{name}]", extra=("datasets",))
    for name in variants:
        only = variant_tables[name].get("datasets")
        if only is not None:
            only = list_setting(variant_tables[name], "datasets", f"[variants.{name}]", str, '["articulated"]')
            for dataset in only:
                if dataset not in datasets:
                    raise ConfigError(
                        f"[variants.{name}] datasets names {dataset!r}, which [study] datasets does not list: "
                        f"{', '.join(datasets)}"
                    )
    dataset_tables = values.get("datasets", {})
    for name, overrides in dataset_tables.items():
        if name not in datasets:
            raise ConfigError(f"[datasets.{name}] is not one of [study] datasets: {', '.join(datasets)}")
        _run_table(overrides, f"[datasets.{name}]")
    run = _run_table(values.get("run", {}), "[run]")
    workers_value = workers_setting(table, workers, 1)
    out_path = Path(out if out is not None else table.get("out", DEFAULT_OUT))
    cells = []
    for seed in seeds:  # seed-major: a study stopped early has every cell at the first seeds
        for dataset in datasets:
            for variant in variants:
                values_ = dict(variant_tables[variant])
                only = values_.pop("datasets", None)
                if only is not None and dataset not in only:
                    continue
                merged = {**run, **dataset_tables.get(dataset, {}), **values_, "dataset": dataset, "seed": seed}
                folder = Path(dataset) / variant / f"seed{seed}"
                config = RunConfig.from_dict(merged, f"cell {folder.as_posix()}").validate()
                check_buildable(config, f"cell {folder.as_posix()}")
                cells.append(Cell(variant, dataset, config, out_path / folder, folder.as_posix()))
    return PartsStudy(out_path, workers_value, variants, datasets, cells)


IMAGE_SHAPES = {"digits": (1, 8, 8), "mnist": (1, 28, 28), "fashion-mnist": (1, 28, 28), "cifar10": (3, 32, 32)}


def check_buildable(config: RunConfig, where: str) -> None:
    """Build the cell's model once (without data) so that a patch or MoBA block that does not fit
    the images fails when the study is read, not hours into it."""
    shape = (1, config.articulated_size, config.articulated_size)
    shape = shape if config.dataset == "articulated" else IMAGE_SHAPES[config.dataset]
    try:
        model_for(config, shape, 10)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def load_parts_study(path: str | Path, out: str | Path | None = None, workers: int | None = None) -> PartsStudy:
    return parse_parts_study(load_toml(path), f"config file {str(path)!r}", out, workers)


# -- one cell -------------------------------------------------------------------------------------


def cell_dataset(config: RunConfig, split: str | None = None) -> Dataset:
    """The cell's dataset, loaded once per process (`split` overrides the articulated test split)."""
    options = config.dataset_options()
    if split is not None and "articulated" in options:
        options = {"articulated": {**options["articulated"], "split": split}}
    return cached_dataset(config.dataset, config.model == "mlp", **options)


def trained_run(config: RunConfig, folder: Path) -> Run:
    """The cell's model as its last checkpoint left it."""
    run = Run(config, cell_dataset(config))
    tensors, state = load_checkpoint(find_checkpoint(folder))
    run.restore(tensors, state)
    run.model.eval()
    return run


def _square(data: Dataset) -> bool:
    return data.image_shape[1] == data.image_shape[2]


@torch.no_grad()
def part_scores(run: Run, data: Dataset, joints: bool) -> dict:
    """mIoU and FG-ARI of the predicted masks against the true parts; joint-angle error over the
    joints an image can show (`visible_joints`) and over all of them, each sample up to the
    relabellings of its joints that it cannot tell apart (`joint_permutations`)."""
    from neuroplast.data.articulated import joint_permutations, visible_joints
    from neuroplast.models.parts import angle_error_degrees, foreground_ari, part_miou

    count = min(METRIC_SAMPLES, len(data.y_test))
    x = data.x_test[:count].to(run.device)
    out = run.model.parts(x)
    masks = out.masks.cpu()
    scores = {
        "part_miou": float(part_miou(masks, data.extras["test_part_masks"][:count]).mean()),
        "foreground_ari": float(foreground_ari(masks, data.extras["test_part_labels"][:count]).nanmean()),
    }
    if joints and out.angles is not None:
        angles, valid = data.extras["test_joint_angles"][:count], data.extras["test_joint_valid"][:count]
        families = run.config.families()
        visible = visible_joints(valid, data.y_test[:count], families)
        perms = joint_permutations(families)[data.y_test[:count]]
        scores["angle_error_degrees"] = float(angle_error_degrees(out.angles.cpu(), angles, visible, perms))
        scores["angle_error_all_joints_degrees"] = float(angle_error_degrees(out.angles.cpu(), angles, valid, perms))
    return scores


@torch.no_grad()
def equivariance_scores(run: Run, data: Dataset) -> dict:
    from neuroplast.models.parts import equivariance_error

    x = data.x_test[: min(EQUIVARIANCE_SAMPLES, len(data.y_test))].to(run.device)
    transforms = ["hflip", "rot90"] if _square(data) else ["hflip"]
    return {f"equivariance_{name}": float(equivariance_error(run.model, x, name)) for name in transforms}


def cell_metrics(config: RunConfig, folder: Path) -> dict:
    run = trained_run(config, folder)
    data = run.data
    history = read_metrics(folder / "metrics.jsonl")
    metrics = {
        "parameters": sum(p.numel() for p in run.model.parameters()),
        "train_seconds_per_epoch": statistics.fmean(r["train_seconds"] for r in history),
        "test_accuracy": history[-1]["test_accuracy"],
    }
    if config.dataset == "articulated":
        ood = cell_dataset(config, split="ood")
        metrics["ood_accuracy"] = evaluate(run.model, ood.x_test, ood.y_test, run.device)[1]
    if config.model in PART_MODELS:
        metrics.update(equivariance_scores(run, data))
        if config.dataset == "articulated":
            metrics.update(part_scores(run, data, config.joint_head))
            metrics.update(pair_scores(run, config)[0])
            if config.joint_head:
                metrics["ood_angle_error_degrees"] = part_scores(run, cell_dataset(config, "ood"), True)[
                    "angle_error_degrees"
                ]
    return metrics


def run_parts_cell(config: RunConfig, folder: str | Path) -> dict:
    """Train (or resume) one cell quietly, then score it; return its summary with the metrics."""
    folder = Path(folder)
    summary = train(config, folder, resume=True, progress=False, log=None, dataset=cell_dataset(config))
    path = folder / "parts_metrics.json"
    if not path.is_file():
        write_atomic(path, json.dumps(cell_metrics(config, folder), indent=2))
    return {**summary, "metrics": json.loads(path.read_text())}


def is_finished(cell: Cell) -> bool:
    path = cell.folder / "summary.json"
    if not path.is_file() or not (cell.folder / "parts_metrics.json").is_file():
        return False
    saved = json.loads(path.read_text()).get("config")
    return isinstance(saved, dict) and not cell.config.changed_from(saved)


def run_parts_study(study: PartsStudy, progress: bool = True, log=print) -> list[Cell]:
    todo = [cell for cell in study.cells if not is_finished(cell)]
    if log and len(todo) < len(study.cells):
        log(f"{len(study.cells) - len(todo)} of {len(study.cells)} cells already finished in {study.out}")
    if not todo:
        return []
    if log:
        where = "in this process" if study.workers == 1 else f"in {min(study.workers, len(todo))} worker processes"
        log(f"running {len(todo)} cells {where}")
    width = max(len(cell.name) for cell in todo)

    def done(cell: Cell, summary: dict) -> None:
        if log:
            m = summary["metrics"]
            ood = f"  ood {100 * m['ood_accuracy']:.2f}%" if "ood_accuracy" in m else ""
            log(f"{cell.name:<{width}}  test {100 * m['test_accuracy']:.2f}%{ood}  {summary['seconds']:.1f}s")

    run_cells(todo, run_parts_cell, study.workers, len(study.cells), progress, done)
    return todo


# -- report ---------------------------------------------------------------------------------------

COLUMNS = (  # key, header, scale, digits
    ("test_accuracy", "test acc. (%)", 100, 2),
    ("ood_accuracy", "OOD acc. (%)", 100, 2),
    ("ood_drop", "OOD drop (pp)", 100, 2),
    ("part_miou", "part mIoU", 1, 3),
    ("foreground_ari", "FG-ARI", 1, 3),
    ("angle_error_degrees", "angle err. (°)", 1, 1),
    ("angle_error_all_joints_degrees", "angle err., arm shoulders too (°)", 1, 1),
    ("ood_angle_error_degrees", "OOD angle err. (°)", 1, 1),
    ("moved_joint_accuracy", "moved joint found (%)", 100, 1),
    ("pivot_found", "pivot found (%)", 100, 1),
    ("pivot_error_px", "pivot err. (px)", 1, 2),
    ("pivot_error_true_rotation_px", "pivot err., true rotation (px)", 1, 2),
    ("equivariance_rot90", "equiv. err. rot90", 1, 3),
    ("equivariance_hflip", "equiv. err. flip", 1, 3),
    ("train_seconds_per_epoch", "s / epoch", 1, 1),
)


def _cell_metrics(cell: Cell) -> dict | None:
    path = cell.folder / "parts_metrics.json"
    if not path.is_file():
        return None
    m = json.loads(path.read_text())
    if "ood_accuracy" in m:
        m["ood_drop"] = m["test_accuracy"] - m["ood_accuracy"]
    return m


def _pm(values: list[float], scale: float, digits: int) -> str:
    if not values:
        return "–"
    mean = scale * statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {scale * statistics.stdev(values):.{digits}f}"


def summary_rows(study: PartsStudy) -> list[dict]:
    """One row per (dataset, variant): every metric's values over the finished seeds."""
    rows = []
    for dataset in study.datasets:
        for variant in study.variants:
            cells = [c for c in study.cells if c.dataset == dataset and c.variant == variant]
            found = [m for m in map(_cell_metrics, cells) if m is not None]
            if not found:
                continue
            values = {key: [m[key] for m in found if key in m and not math.isnan(m[key])] for key, *_ in COLUMNS}
            rows.append(
                {
                    "dataset": dataset,
                    "variant": variant,
                    "model": cells[0].config.model,
                    "parameters": found[0]["parameters"],
                    "seeds": len(found),
                    "values": values,
                }
            )
    return rows


def write_parts_report(study: PartsStudy, log=print) -> list[Path]:
    rows = summary_rows(study)
    if not rows:
        raise ConfigError(f"no finished cells in {study.out}; run the study first")
    lines = [f"Mean ± std over seeds; `neuroplast parts-study` cells in {study.out.as_posix()}.", ""]
    for dataset in study.datasets:
        mine = [r for r in rows if r["dataset"] == dataset]
        if not mine:
            continue
        keys = [c for c in COLUMNS if any(r["values"][c[0]] for r in mine)]
        lines += [f"### {dataset}", ""]
        lines.append("| variant | model | parameters | seeds | " + " | ".join(c[1] for c in keys) + " |")
        lines.append("|---|---|---|---|" + "---|" * len(keys))
        for r in mine:
            cells = [_pm(r["values"][key], scale, digits) for key, _, scale, digits in keys]
            lines.append(
                f"| {r['variant']} | {r['model']} | {r['parameters']:,} | {r['seeds']} | " + " | ".join(cells) + " |"
            )
        lines.append("")
    study.out.mkdir(parents=True, exist_ok=True)
    path = study.out / "parts.md"
    write_atomic(path, "\n".join(lines))
    write_atomic(study.out / "parts.json", json.dumps(rows, indent=2))
    if log:
        log("\n".join(lines))
    return [path, study.out / "parts.json", *write_parts_figures(study, log)]


# -- pairs: the moving part and the pivot -----------------------------------------------------------

PAIR_SAMPLES = 500


def standardize_like(data: Dataset, raw: torch.Tensor) -> torch.Tensor:
    """Raw [0, 1] silhouettes standardised as `data` was: its smallest value is the background's
    (0) and its largest a fully covered pixel's (1), so the map is recovered from the data."""
    low, high = float(data.x_train.min()), float(data.x_train.max())
    return raw * (high - low) + low


def rotation(angle: torch.Tensor) -> torch.Tensor:
    """(B,) angles -> (B, 2, 2) rotations of (x, y) with y downward, as the generator's kinematics."""
    c, s = angle.cos(), angle.sin()
    return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)


def estimate_pivots(
    descriptors_a: torch.Tensor, descriptors_b: torch.Tensor, delta: torch.Tensor, size: int, min_shift: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The pivot of a rotation by `delta` (B,) that carries each moving part's centroid in state a
    to its centroid in state b: for part k, R(μ_a,k − p) + p = μ_b,k, so (I − R) p = μ_b,k − R μ_a,k,
    solved by least squares, weighted by area, over the parts that moved *as the rotation says*:
    the centroid shifted more than `min_shift` pixels and, for a part with an axis, the axis turned
    by delta rather than staying put (a part whose visible mask only changed because another part
    now hides less or more of it shifts its centroid without turning). The largest mask, the
    background, never counts. Descriptors (B, K, 6) as `pose_descriptors` gives; returns the
    pivots (B, 2) in pixel coordinates (x, y), NaN where no part moved, and which parts counted
    (B, K)."""

    def pixels(d: torch.Tensor) -> torch.Tensor:
        return (d[..., 1:3] + 1) / 2 * size

    mu_a, mu_b = pixels(descriptors_a), pixels(descriptors_b)
    area = (descriptors_a[..., 0] + descriptors_b[..., 0]) / 2
    moved = ((mu_b - mu_a).norm(dim=-1) > min_shift) & (area > 1e-3)
    moved &= torch.arange(area.shape[1]) != area.argmax(1, keepdim=True)
    # an axis (cos 2θ, sin 2θ) turns by 2·delta when its part turns by delta
    axis_a, axis_b = descriptors_a[..., 3:5], descriptors_b[..., 3:5]
    turned = axis_a @ rotation(2 * delta).transpose(1, 2)
    has_axis = (axis_a.norm(dim=-1) > 0.3) & (axis_b.norm(dim=-1) > 0.3)
    moved &= ~has_axis | ((axis_b - turned).norm(dim=-1) < (axis_b - axis_a).norm(dim=-1))
    r = rotation(delta)  # (B, 2, 2)
    rhs = mu_b - mu_a @ r.transpose(1, 2)  # (B, K, 2)
    w = area * moved
    # normal equations of Σ_k w_k ||(I − R) p − rhs_k||²: (I − R) is the same for every part
    target = (w[..., None] * rhs).sum(1) / w.sum(1, keepdim=True).clamp_min(1e-8)
    pivots = torch.linalg.solve(torch.eye(2) - r, target[..., None])[..., 0]
    pivots[~moved.any(1)] = math.nan
    return pivots, moved


@torch.no_grad()
def pair_scores(run: Run, config: RunConfig, count: int = PAIR_SAMPLES) -> tuple[dict, dict]:
    """Median pivot error (pixels) from pairs of joint states with exactly one moved joint: with
    the rotation the joint head predicts, and with the true rotation (what the masks alone get
    wrong); the share of pairs where a moving part was found; how often the joint head names the
    joint that moved. Also returns the arrays the pair figure draws."""
    from neuroplast.data.articulated import generate, joint_permutations

    pairs = generate(
        count * 3, seed=1, size=config.articulated_size, families=tuple(config.families()), split="test", pairs=True
    )
    single = np.flatnonzero(pairs["moved"].sum(1) == 1)[:count]
    joint = pairs["moved"][single].argmax(1)
    xa = standardize_like(run.data, torch.from_numpy(pairs["image_a"][single]))
    xb = standardize_like(run.data, torch.from_numpy(pairs["image_b"][single]))
    out_a, out_b = run.model.parts(xa.to(run.device)), run.model.parts(xb.to(run.device))
    rows = torch.arange(len(single))
    true_pivot = torch.from_numpy(pairs["joint_pos_a"][single])[rows, torch.from_numpy(joint)]
    true_delta = torch.from_numpy(pairs["delta_q"][single])[rows, torch.from_numpy(joint)]
    da, db = out_a.descriptors.cpu(), out_b.descriptors.cpu()
    scores, figure = {}, {}
    with_true, moved = estimate_pivots(da, db, true_delta, config.articulated_size)
    scores["pivot_error_true_rotation_px"] = float((with_true - true_pivot).norm(dim=-1).nanmedian())
    if out_a.angles is not None:
        predicted = torch.atan2(out_b.angles[..., 0], out_b.angles[..., 1]) - torch.atan2(
            out_a.angles[..., 0], out_a.angles[..., 1]
        )
        predicted = torch.remainder(predicted.cpu() + math.pi, 2 * math.pi) - math.pi
        valid = torch.from_numpy(pairs["joint_valid"][single])
        moved_joint = predicted.abs().masked_fill(~valid, -1).argmax(1)
        estimate, moved = estimate_pivots(da, db, predicted[rows, moved_joint], config.articulated_size)
        scores["pivot_error_px"] = float((estimate - true_pivot).norm(dim=-1).nanmedian())
        scores["pivot_found"] = float(estimate[:, 0].isfinite().double().mean())
        # named right when it is the moved joint up to the relabellings the image cannot tell apart
        perms = joint_permutations(config.families())[torch.from_numpy(pairs["label"][single])]
        named = (perms[rows, :, moved_joint] == torch.from_numpy(joint)[:, None]).any(1)
        scores["moved_joint_accuracy"] = float(named.double().mean())
        figure["estimate"] = estimate
    figure.update(
        image_a=pairs["image_a"][single],
        image_b=pairs["image_b"][single],
        label=pairs["label"][single],
        masks_a=out_a.masks.cpu(),
        moved=moved,
        true_pivot=true_pivot,
        with_true=with_true,
    )
    return scores, figure


# -- figures -------------------------------------------------------------------------------------


def _matched_labels(masks: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """Predicted hard labels (B, H, W) renumbered so that each query carries the number of the
    true part it is matched to (unmatched queries: beyond the true parts)."""
    from neuroplast.models.parts import hungarian_match

    match = hungarian_match(masks, true)  # (B, P): the query of each true channel, -1 if none
    hard = masks.argmax(1)
    out = torch.full_like(hard, true.shape[1])
    for b in range(len(hard)):
        for channel, query in enumerate(match[b].tolist()):
            if query >= 0:
                out[b][hard[b] == query] = channel
    return out


def plot_part_masks(run: Run, config: RunConfig, path: Path, per_family: int = 2) -> Path:
    """Rows: test samples, `per_family` of each family. Columns: the input, the true parts, the
    predicted parts (colours matched to the true ones), then each of the K soft masks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = run.data
    families = config.families()
    rows = [i for f in range(len(families)) for i in torch.nonzero(data.y_test == f)[:per_family, 0].tolist()]
    x = data.x_test[rows]
    with torch.no_grad():
        masks = run.model.parts(x.to(run.device)).masks.cpu()
    true = data.extras["test_part_masks"][rows]
    predicted = _matched_labels(masks, true).numpy()
    x, masks, true_labels = x.numpy(), masks.numpy(), data.extras["test_part_labels"].numpy()
    k = masks.shape[1]
    fig, axes = plt.subplots(len(rows), 3 + k, figsize=(1.3 * (3 + k), 1.3 * len(rows)), squeeze=False)
    colours = {"cmap": "tab20", "vmin": 0, "vmax": 19, "interpolation": "nearest"}
    for r, i in enumerate(rows):
        axes[r, 0].imshow(x[r, 0], cmap="gray")
        axes[r, 0].set_ylabel(families[int(data.y_test[i])], fontsize=8)
        axes[r, 1].imshow(true_labels[i], **colours)
        axes[r, 2].imshow(predicted[r], **colours)
        for q in range(k):
            axes[r, 3 + q].imshow(masks[r, q], cmap="magma", vmin=0, vmax=1)
    titles = ["input", "true parts", "predicted"] + [f"mask {q}" for q in range(k)]
    for c, title in enumerate(titles):
        axes[0, c].set_title(title, fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{config.model} on articulated shapes: part masks (K = {k})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_pairs(run: Run, config: RunConfig, path: Path, per_family: int = 2) -> Path:
    """Pairs of joint states: state a, state b, and state a with the parts the model sees moving
    (tinted), the true pivot (x), the pivot estimated with the predicted rotation (o) and with
    the true rotation (+)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _, fig_data = pair_scores(run, config, count=200)
    families = config.families()
    rows = [i for f in range(len(families)) for i in np.flatnonzero(fig_data["label"] == f)[:per_family]]
    fig, axes = plt.subplots(len(rows), 3, figsize=(4.2, 1.4 * len(rows)), squeeze=False)
    for r, i in enumerate(rows):
        axes[r, 0].imshow(fig_data["image_a"][i, 0], cmap="gray")
        axes[r, 1].imshow(fig_data["image_b"][i, 0], cmap="gray")
        moving = (fig_data["masks_a"][i] * fig_data["moved"][i][:, None, None]).sum(0).numpy()
        axes[r, 2].imshow(fig_data["image_a"][i, 0], cmap="gray")
        axes[r, 2].imshow(moving, cmap="autumn", alpha=0.5 * (moving > 0.3), vmin=0, vmax=1)
        px, py = (fig_data["true_pivot"][i] - 0.5).tolist()  # pixel (x, y) -> imshow coordinates
        axes[r, 2].plot(px, py, "x", color="cyan", markersize=7, mew=2)
        tx, ty = (fig_data["with_true"][i] - 0.5).tolist()
        axes[r, 2].plot(tx, ty, "+", color="lime", markersize=7, mew=1.5)
        if "estimate" in fig_data:
            ex, ey = (fig_data["estimate"][i] - 0.5).tolist()
            axes[r, 2].plot(ex, ey, "o", mfc="none", color="yellow", markersize=6)
        axes[r, 0].set_ylabel(families[int(fig_data["label"][i])], fontsize=8)
        for ax in axes[r]:
            ax.set_xlim(-0.5, config.articulated_size - 0.5)
            ax.set_ylim(config.articulated_size - 0.5, -0.5)
    for c, title in enumerate(["state a", "state b", "moving parts, pivot"]):
        axes[0, c].set_title(title, fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("pivot: true x, estimated o (+ with the true rotation)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_parts_figures(study: PartsStudy, log=print) -> list[Path]:
    """Masks of the first finished part-query cells on articulated shapes, and the pairs figure
    of the first finished cell with a joint head."""
    written = []
    cells = [c for c in study.cells if c.dataset == "articulated" and c.config.model in PART_MODELS]
    seen = set()
    for cell in cells:
        if cell.variant in seen or not is_finished(cell):
            continue
        seen.add(cell.variant)
        run = trained_run(cell.config, cell.folder)
        written.append(plot_part_masks(run, cell.config, study.out / f"masks_{cell.variant}.png"))
        if cell.config.joint_head:
            written.append(plot_pairs(run, cell.config, study.out / f"pairs_{cell.variant}.png"))
    if log and written:
        log("wrote " + ", ".join(p.as_posix() for p in written))
    return written
