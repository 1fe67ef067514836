"""The `neuroplast` command line: parses, validates, calls one function per command."""

from __future__ import annotations

import argparse
import sys
import time
import typing
from dataclasses import fields
from pathlib import Path

from neuroplast import __version__
from neuroplast.data import DataError, is_available_offline
from neuroplast.dst import METHODS, knob_fields
from neuroplast.federated.config import FederatedConfig
from neuroplast.train import ConfigError, RunConfig, load_toml
from neuroplast.train.config import field_kind

DEMO_METHODS = ("dense", "static", "set", "rigl", "dast")


class OneLineParser(argparse.ArgumentParser):
    """Report bad arguments on one line (bad value and valid choices), exit code 2."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None


HELP = {
    "dataset": "digits (offline), mnist, fashion-mnist, cifar10, articulated (generated shapes with parts and joints)",
    "model": "linear (softmax regression), mlp, cnn, vit, parts (part-query encoder) or moba-parts "
    "(the part-query encoder with MoBA over pixel tokens)",
    "attention": "vit and parts: dense or moba (Mixture of Block Attention)",
    "patch_size": "vit and parts: patch side in pixels, 1 = one token per pixel (default: 4; 1 for moba-parts)",
    "vit_dim": "vit and parts: token width",
    "vit_depth": "vit and parts: transformer blocks (default: 4 for vit, 2 for parts)",
    "vit_heads": "vit and parts: attention heads",
    "block_size": "moba: tokens per block, a square tile of the patch grid",
    "top_k": "moba: blocks each query attends to, its own block included",
    "parts": "parts models: K learned part queries, the background included",
    "part_iterations": "parts models: rounds of part-query refinement",
    "part_supervision": "parts models on articulated data: learn the true part masks (Hungarian-matched)",
    "joint_head": "parts models on articulated data: also predict the joint angles",
    "articulated_size": "articulated: canvas side, 28, 32 or 64",
    "articulated_families": "articulated: comma-separated families (arm2, arm3, lamp, scissors, stick, stick_full)",
    "articulated_split": "articulated: test on in-distribution (iid) or out-of-distribution (ood) joint angles",
    "articulated_train": "articulated: training samples",
    "articulated_test": "articulated: test samples",
    "standardize": "images: standardise with one mean/std per channel (channel) or per pixel (feature, a pixel "
    "that never varies becomes 0); generated tabular sets are always per feature",
    "validation": "N > 0: hold out the last N training samples and evaluate on them instead of the test set "
    "(for choosing settings; the test set is never read)",
    "own_block": "vit with moba: always attend to the query's own block",
    "full_layers": "vit with moba: the last N layers use dense attention",
    "key_conv": "vit with moba: width of a depthwise convolution on the keys (default: off)",
    "routing": "vit with moba: token (each query picks its blocks, as in the MoBA paper) or block "
    "(each tile of queries picks its blocks by its mean query)",
    "hidden": "MLP hidden widths, comma-separated",
    "cnn_hidden": "cnn: width of the dense head",
    "method": f"DST method: {', '.join(METHODS)}",
    "density": "fraction of live weights in the sparse layers, in (0, 1] (0.05 = 95%% sparsity)",
    "distribution": "how density is spread over layers: uniform, er, erk",
    "epsilon": "with --distribution er: SET's epsilon, no global budget (default: none, ER scaled to --density)",
    "dense_first": "keep the first layer dense",
    "dense_last": "keep the last layer dense",
    "backend": "masked (dense weight x mask, any layer) or csr (truly sparse Linear layers)",
    "precision": "float32, or bfloat16 activations (torch.autocast; weights and their optimizer state stay float32)",
    "lr_schedule": "cosine, step or constant (stepped per epoch)",
    "device": "cpu, cuda or auto",
}


FEDERATE_HELP = {
    "dataset": "digits (offline), mnist, fashion-mnist, cifar10",
    "model": "linear (softmax regression, 7,850 parameters on 28x28), mlp or cnn",
    "hidden": "mlp hidden widths, comma-separated",
    "cnn_hidden": "cnn: width of the dense head",
    "devices": "n: number of devices",
    "components": "C: disconnected D2D components of n/C devices each",
    "alpha_inter": "Dirichlet concentration of labels across components (0.1: skewed, 100: about IID)",
    "alpha_intra": "Dirichlet concentration of labels across the devices of a component",
    "min_size": "samples per device at least (the split is redrawn until every device has them)",
    "local_test_fraction": "share of each device's samples held out as its own local test set",
    "topology": "D2D graph per component: ring, grid, complete, erdos-renyi, dynamic (random regular, "
    "new every round) or none",
    "edge_probability": "erdos-renyi: edge probability (redrawn until connected)",
    "degree": "dynamic: degree of the random regular graphs",
    "algorithm": "s2s (server average back to the sampled), s2a (to all), fedavg (no D2D), dsgd (no server)",
    "sampled": "K: devices the server samples (uniform, without replacement)",
    "period": "H: rounds between server rounds",
    "density": "sparse devices: live share of the sparse layers' weights on every device; only live weights go on "
    "the wire (1: dense devices)",
    "sparse_distribution": "sparse devices: density per layer: uniform, er or erk",
    "masks": "sparse devices: per-device (each device rewires its own mask) or shared (only the server changes it)",
    "dst_method": "sparse devices: the DST preset that rewires (any method but dense: set, rigl, snfs, mest, ctre, "
    "wast, dast, dast2, ...; static never rewires)",
    "dst_every": "sparse devices with per-device masks: rounds between a device's topology updates",
    "rounds": "communication rounds",
    "local_steps": "SGD steps per device per round",
    "batch_size": "mini-batch per device per step",
    "lr": "SGD learning rate (plain SGD, no momentum)",
    "weight_decay": "SGD weight decay",
    "eval_every": "rounds between evaluations (one metrics.jsonl line each)",
    "device_eval_samples": "global test images each device model is scored on (0: all)",
    "checkpoint_every": "rounds between checkpoints (the last round is always saved)",
    "device": "cpu, cuda or auto",
}


def _add_flag(group, name: str, kind: type, help_text: str) -> None:
    flag = "--" + name.replace("_", "-")
    if kind is bool:
        group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
    elif kind is list:
        group.add_argument(flag, type=_int_list, default=None, metavar="N,N,...", help=help_text)
    else:
        group.add_argument(flag, type=kind, default=None, metavar=name.upper(), help=help_text)


def dst_flags(config_class) -> dict[str, type]:
    """The DST knobs a config class takes as flags (its `dst` table), with their types."""
    if "dst" not in config_class.keys():
        return {}
    kinds = {}
    for name, f in knob_fields().items():
        try:
            kinds[name] = field_kind(f.type)
        except TypeError:  # not a plain value (e.g. MEST's milestones): set it in Python
            continue
    return kinds


def add_config_flags(parser: argparse.ArgumentParser, config_class=RunConfig, helps: dict | None = None) -> None:
    """One flag per field of `config_class`, and one per DST knob of its `dst` table (help from
    the knob's part); defaults are None so only given flags override the file."""
    group = parser.add_argument_group("run configuration (override --config)")
    group.add_argument("--config", metavar="FILE", help="TOML file with any of the keys below")
    for f in fields(config_class):
        kind = field_kind(f.type)
        if kind is dict:
            continue
        default = f.default if not callable(f.default_factory) else f.default_factory()
        shown = ",".join(map(str, default)) if isinstance(default, list) else default
        help_text = (helps or HELP).get(f.name, f.name.replace("_", " "))
        if default is not None:
            help_text += f" (default: {shown})"
        _add_flag(group, f.name, kind, help_text)
    knobs = dst_flags(config_class)
    if knobs:
        dst = parser.add_argument_group("DST knobs: the [dst] table of a config file (default: the method's)")
        for name, kind in knobs.items():
            _add_flag(dst, name, kind, knob_fields()[name].metadata["help"])


def config_from_args(args: argparse.Namespace, config_class=RunConfig):
    values = load_toml(args.config) if args.config else {}
    source = f"config file {args.config!r}" if args.config else "config"
    given = [f.name for f in fields(config_class)] + list(dst_flags(config_class))
    values.update({name: getattr(args, name) for name in given if getattr(args, name, None) is not None})
    return config_class.from_dict(values, source).validate()


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="neuroplast",
        description="Sparse neural networks in PyTorch: dynamic sparse training (SET, RigL, SNFS, MEST, CTRE, WAST, "
        "randomized attention), truly sparse layers, studies.",
        epilog="Run `neuroplast COMMAND --help` for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"neuroplast {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)

    train = commands.add_parser(
        "train",
        help="train one model with any method (dense, static, DST)",
        description="Train one model. Writes config.toml, metrics.jsonl, summary.json and a checkpoint to --out.",
    )
    train.add_argument("--out", required=True, metavar="DIR", help="run folder")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.add_argument(
        "--log",
        choices=("tensorboard",),
        default=None,
        help="also write the per-epoch metrics and per-layer densities as TensorBoard scalars into --out "
        '(needs pip install "neuroplast[tensorboard]")',
    )
    add_config_flags(train)

    compare = commands.add_parser(
        "compare",
        help="train methods x seeds and tabulate mean ± std test accuracy",
        description=(
            "A study of one density: train every method for every seed, several at a time, each in its own "
            "folder <out>/<method>/d<density>/seed<seed> (finished cells are skipped, interrupted ones "
            "resume), then write results.md and learning_curves.png to --out."
        ),
    )
    compare.add_argument("--methods", default="dense,static,set,rigl", help="comma-separated methods")
    compare.add_argument("--seeds", type=_int_list, default=[0, 1, 2], metavar="N,N,...", help="seeds (default 0,1,2)")
    compare.add_argument("--out", default="runs/compare", metavar="DIR", help="grid folder (default runs/compare)")
    compare.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="runs trained at a time, each in its own process; 1 trains in this process (default: 2 on CPU, 1 on CUDA)",
    )
    compare.add_argument("--quiet", action="store_true", help="no progress bar")
    add_config_flags(compare)

    study = commands.add_parser(
        "study",
        help="methods x densities x seeds from a TOML file, in parallel, with a report",
        description=(
            "Train every cell of a study (methods x densities x seeds, and an optional ablation grid) "
            "configured in a TOML file, several cells at a time, each in its own folder "
            "<out>/<method>/d<density>/seed<seed>. Finished cells are never re-run and interrupted ones "
            "resume, so a study can be stopped with Ctrl-C and started again. Then write study.md, "
            "curves.png, connectivity.png (and ablation.md) to the study folder. "
            "See configs/study_fashion_mnist.toml for the format."
        ),
    )
    study.add_argument("--config", required=True, metavar="FILE", help="study TOML file ([study], [run], ...)")
    study.add_argument("--out", default=None, metavar="DIR", help="study folder (default: [study] out)")
    study.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="cells trained at a time, each in its own process; 1 trains in this process "
        "(default: [study] workers, else 2 on CPU and 1 on CUDA)",
    )
    study.add_argument("--report-only", action="store_true", help="train nothing; report the cells finished so far")
    study.add_argument("--quiet", action="store_true", help="no progress bar")

    federate = commands.add_parser(
        "federate",
        help="semi-decentralized learning: D2D clusters and a sampling server (S2S, S2A, FedAvg, D-SGD)",
        description=(
            "Train n device models that mix with their D2D neighbours every round while a server, every H "
            "rounds, averages K sampled devices and sends the average back to the sampled (s2s) or to all "
            "(s2a). Writes config.toml, partition.json, metrics.jsonl, summary.json and checkpoints to --out. "
            "The simulator holds every device in this process; --engine distributed runs the same rounds "
            "under torchrun: torchrun --standalone --nproc-per-node P -m neuroplast.federated ARGS."
        ),
    )
    federate.add_argument("--out", required=True, metavar="DIR", help="run folder")
    federate.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    federate.add_argument("--quiet", action="store_true", help="no progress bar")
    federate.add_argument(
        "--engine",
        choices=("simulator", "distributed"),
        default="simulator",
        help="simulator: every device in this process (default); distributed: n/P devices per torchrun process",
    )
    federate.add_argument(
        "--exchange",
        choices=("auto", "all_gather", "p2p"),
        default="auto",
        help="distributed D2D: all_gather of whole blocks, or point-to-point rows (default: by model size)",
    )
    federate.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        metavar="S",
        help="distributed: seconds a collective may wait for a peer before the job stops (default 300)",
    )
    add_config_flags(federate, FederatedConfig, FEDERATE_HELP)

    fstudy = commands.add_parser(
        "federate-study",
        help="semi-decentralized regimes x topologies x K x H x algorithms x seeds, in parallel, with a report",
        description=(
            "Run every cell of a semi-decentralized study configured in a TOML file, several at a time, each "
            "in its own folder <out>/<regime>/<topology>/K<k>-H<h>/<algorithm>/seed<seed>. Finished cells are "
            "never re-run and interrupted ones resume. Then write semidec.md and its figures to the study "
            "folder. See configs/semidec_study.toml for the format."
        ),
    )
    fstudy.add_argument("--config", required=True, metavar="FILE", help="study TOML file ([study], [regimes.*], [run])")
    fstudy.add_argument("--out", default=None, metavar="DIR", help="study folder (default: [study] out)")
    fstudy.add_argument("--workers", type=int, default=None, metavar="N", help="cells at a time (default: 2)")
    fstudy.add_argument("--report-only", action="store_true", help="run nothing; report the cells finished so far")
    fstudy.add_argument("--quiet", action="store_true", help="no progress bar")

    pstudy = commands.add_parser(
        "parts-study",
        help="part-query encoders vs CNN and ViT: variants x datasets x seeds, with part and articulation metrics",
        description=(
            "Run every cell of a parts study configured in a TOML file, each in its own folder "
            "<out>/<dataset>/<variant>/seed<seed>; finished cells are never re-run and interrupted ones resume. "
            "Each cell is scored for accuracy, out-of-distribution accuracy on articulated shapes, part mIoU, "
            "FG-ARI, joint-angle error and equivariance. Then write parts.md and its figures to the study "
            "folder. See configs/parts_study.toml for the format."
        ),
    )
    pstudy.add_argument(
        "--config", required=True, metavar="FILE", help="study TOML file ([study], [variants.*], [run])"
    )
    pstudy.add_argument("--out", default=None, metavar="DIR", help="study folder (default: [study] out)")
    pstudy.add_argument("--workers", type=int, default=None, metavar="N", help="cells at a time (default: 1)")
    pstudy.add_argument("--report-only", action="store_true", help="run nothing; report the cells finished so far")
    pstudy.add_argument("--quiet", action="store_true", help="no progress bar")

    select = commands.add_parser(
        "select",
        help="feature selection by sparse training (WAST, QuickSelection, DAST, NeuroFS) vs baselines",
        description=(
            "Rank the features of a dataset with each method and seed, each cell in its own folder "
            "<out>/<dataset>/<method>/seed<seed> (finished cells are skipped), evaluate SVM, 1-NN and "
            "ExtraTrees on the K selected features (scaler fitted on the training split), then write "
            "select.md, accuracy_vs_k.png and masks.png to <out>/<dataset>. See configs/select_fashion_mnist.toml."
        ),
    )
    select.add_argument(
        "--config", default=None, metavar="FILE", help="study TOML file ([select], [data], [options.METHOD])"
    )
    select.add_argument(
        "--dataset",
        default=None,
        help="dataset (default: fashion-mnist); synthetic and fashion-mnist-noise have known informative features",
    )
    select.add_argument(
        "--method", default=None, metavar="M,M,...", help="comma-separated methods (see docs/select.md)"
    )
    select.add_argument("--k", type=_int_list, default=None, metavar="K,K,...", help="features to select (default 50)")
    select.add_argument("--seeds", type=_int_list, default=None, metavar="N,N,...", help="seeds (default 0)")
    select.add_argument("--classifiers", default=None, help="comma-separated: svm, knn, extra-trees (default: all)")
    select.add_argument(
        "--select-samples", type=int, default=None, metavar="N", help="training rows the selectors see (0: all)"
    )
    select.add_argument(
        "--eval-samples",
        type=int,
        default=None,
        metavar="N",
        help="training rows the classifiers are fitted on (0: all); the test set is always whole",
    )
    select.add_argument(
        "--validation",
        type=int,
        default=None,
        metavar="N",
        help="hold out N training rows and score on them instead of the test set (tuning; default 0)",
    )
    select.add_argument("--epochs", type=int, default=None, metavar="N", help="epochs of the sparse-training methods")
    select.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="METHOD.KEY=VALUE",
        help="a method's own setting, VALUE in TOML (e.g. neurofs.lr=0.1, neurofs.hidden=[1000]); repeatable",
    )
    select.add_argument("--out", default=None, metavar="DIR", help="study folder (default runs/select)")
    select.add_argument("--workers", type=int, default=None, metavar="N", help="cells at a time (default 1)")
    select.add_argument("--report-only", action="store_true", help="run nothing; report the cells finished so far")
    select.add_argument("--quiet", action="store_true", help="no progress bar")

    demo = commands.add_parser(
        "demo",
        help="dense vs static vs SET vs RigL vs DAST at 95%% sparsity, in about 1.5 minutes on 2 CPU cores",
        description=(
            "Train dense, static, SET, RigL and DAST (neuroplast's own method) MLPs at 95% sparsity (ERK) on "
            "Fashion-MNIST when it is available offline, else on scikit-learn's digits; print a comparison "
            "table and write a learning-curve PNG."
        ),
    )
    demo.add_argument("--out", default="runs/demo", metavar="DIR", help="folder for the runs (default runs/demo)")
    demo.add_argument(
        "--epochs", type=int, default=None, help="epochs per run (default: 5 on Fashion-MNIST, 30 on digits)"
    )
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def cmd_train(args) -> int:
    from neuroplast.train import train

    config = config_from_args(args)
    tensorboard = None
    if args.log == "tensorboard":
        from neuroplast.train.tensorboard import TensorBoardLog

        tensorboard = TensorBoardLog(args.out)
    try:
        train(config, args.out, resume=args.resume, progress=not args.quiet, on_epoch_end=tensorboard)
    finally:
        if tensorboard is not None:
            tensorboard.close()
    return 0


def cmd_compare(args) -> int:
    from neuroplast.experiments.study import compare_study, run_study, write_report

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    study = compare_study(config_from_args(args), methods, args.seeds, args.out, args.workers)
    return _run_and_report(study, run_study, write_report, args.quiet)


def cmd_demo(args) -> int:
    from neuroplast.experiments.study import compare_study, run_study, write_report

    if args.epochs is not None and args.epochs < 1:
        raise ConfigError(f"epochs {args.epochs!r} must be a positive integer")
    if is_available_offline("fashion-mnist"):
        base = RunConfig(dataset="fashion-mnist", density=0.05, epochs=args.epochs or 5, backend="csr")
        print("Fashion-MNIST found locally: training on it (60,000 train / 10,000 test images).")
    else:
        base = RunConfig(
            dataset="digits", density=0.05, epochs=args.epochs or 30, batch_size=32, hidden=[256, 256], backend="csr"
        )
        print(
            "Fashion-MNIST is not available offline (apt-get install dataset-fashion-mnist, or set "
            "NEUROPLAST_DATA): training on scikit-learn's 8x8 digits instead."
        )
    start = time.perf_counter()
    print("Sparse models use the truly sparse csr backend (their cost follows the live weights).")
    study = compare_study(base, DEMO_METHODS, [0], Path(args.out) / base.dataset)
    code = _run_and_report(study, run_study, write_report, args.quiet)
    if code == 0:
        print(f"demo finished in {time.perf_counter() - start:.0f}s")
        print(
            "Read more: docs/dst.md (the methods, DAST, the study behind these numbers) and README.md "
            "(what else neuroplast does), in the neuroplast repository."
        )
    return code


def cmd_federate(args) -> int:
    from neuroplast.federated.run import federate

    config = config_from_args(args, FederatedConfig)
    if args.engine == "simulator":
        federate(config, args.out, resume=args.resume, progress=not args.quiet)
        return 0
    import os

    import torch.distributed as dist

    from neuroplast.federated.distributed import TorchComm, init

    init(args.timeout, config.device)
    try:
        comm = TorchComm(config.devices, config.components, args.exchange)
        # torchrun restarts every worker after a failure: a restarted run resumes from its checkpoint
        resume = args.resume or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
        log = print if comm.rank == 0 else None
        federate(config, args.out, resume=resume, progress=not args.quiet and comm.rank == 0, log=log, comm=comm)
        # every process has finished its last collective and file before any tears its group down:
        # a process leaving early made gloo abort a peer at exit now and then
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return 0


def _run_and_report(study, run, report, quiet: bool, report_only: bool = False) -> int:
    """Run a study's unfinished cells (unless `report_only`), then write its report."""
    if not report_only:
        try:
            run(study, progress=not quiet)
        except KeyboardInterrupt:
            print(
                "interrupted; finished cells are kept and the others resume from their last checkpoint "
                "when this study is run again",
                file=sys.stderr,
            )
            return 130
    report(study)
    return 0


def _study_command(args, load, run, report) -> int:
    """Load a study config, run its unfinished cells (unless --report-only), write its report."""
    study = load(args.config, out=args.out, workers=args.workers)
    return _run_and_report(study, run, report, args.quiet, args.report_only)


def cmd_federate_study(args) -> int:
    from neuroplast.experiments.semidec import load_semidec_study, run_semidec_study, write_semidec_report

    return _study_command(args, load_semidec_study, run_semidec_study, write_semidec_report)


def cmd_parts_study(args) -> int:
    from neuroplast.experiments.parts import load_parts_study, run_parts_study, write_parts_report

    return _study_command(args, load_parts_study, run_parts_study, write_parts_report)


def cmd_study(args) -> int:
    from neuroplast.experiments.study import load_study, run_study, write_report

    return _study_command(args, load_study, run_study, write_report)


def _method_option(text: str) -> tuple[str, str, object]:
    """`METHOD.KEY=VALUE` (VALUE in TOML) as (method, key, value), or a one-line error."""
    import tomllib

    from neuroplast.select import METHODS, SelectionError

    name, _, value = text.partition("=")
    method, _, key = name.strip().partition(".")
    if not value or not key:
        raise SelectionError(f"--option {text!r} must read METHOD.KEY=VALUE, e.g. neurofs.lr=0.1")
    if method not in METHODS:
        raise SelectionError(f"--option {text!r}: unknown method {method!r}; choose from: {', '.join(METHODS)}")
    if key not in METHODS[method].options:
        raise SelectionError(
            f"--option {text!r}: unknown option {key!r} for {method}; choose from: {', '.join(METHODS[method].options)}"
        )
    try:
        parsed = tomllib.loads(f"v = {value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value.strip()  # a bare word: a string
    return method, key, parsed


def cmd_select(args) -> int:
    from neuroplast.experiments.runner import run_cells
    from neuroplast.select.study import SelectStudy, cells, is_finished, run_cell, write_report

    def listed(text: str | None) -> list[str] | None:
        return [part.strip() for part in text.split(",") if part.strip()] if text else None

    overrides = {
        "out": args.out,
        "dataset": args.dataset,
        "methods": listed(args.method),
        "ks": args.k,
        "seeds": args.seeds,
        "classifiers": listed(args.classifiers),
        "select_samples": args.select_samples,
        "eval_samples": args.eval_samples,
        "validation": args.validation,
        "workers": args.workers,
    }
    if args.config:
        study = SelectStudy.from_toml(args.config, **overrides)
    else:
        study = SelectStudy(**{k: v for k, v in overrides.items() if v is not None})
    sparse = ("quickselection", "wast", "dast", "neurofs")
    settings = [(m, "epochs", args.epochs) for m in sparse] if args.epochs is not None else []
    for method, key, value in settings + [_method_option(text) for text in args.option]:
        study.options = {**study.options, method: {**study.options.get(method, {}), key: value}}
    study.validate()
    grid = cells(study)
    todo = [] if args.report_only else [c for c in grid if not is_finished(c)]

    def report(cell, result: dict) -> None:
        svm = result["accuracy"].get("50", next(iter(result["accuracy"].values())))
        shown = ", ".join(f"{name} {value * 100:.2f}" for name, value in svm.items())
        print(f"{cell.method} seed {cell.seed}: {result['seconds']:.1f}s selection; {shown}")

    print(f"{len(grid) - len(todo)} of {len(grid)} cells finished; running {len(todo)}")
    try:
        if todo:
            run_cells(todo, run_cell, study.workers, len(grid), progress=not args.quiet, done=report)
    except KeyboardInterrupt:
        print("interrupted; finished cells are kept, the others run when this command is run again", file=sys.stderr)
        return 130
    print(f"report: {write_report(study)}")
    return 0


COMMANDS = {
    "train": cmd_train,
    "select": cmd_select,
    "compare": cmd_compare,
    "study": cmd_study,
    "federate": cmd_federate,
    "federate-study": cmd_federate_study,
    "parts-study": cmd_parts_study,
    "demo": cmd_demo,
}


def _is_rank_zero() -> bool:
    """Under torchrun only rank 0 reports an error every rank hits."""
    import os

    return os.environ.get("RANK", "0") == "0"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return COMMANDS[args.command](args)
    except (ConfigError, DataError) as exc:
        if _is_rank_zero():
            print(f"neuroplast {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; the last finished epoch is checkpointed (continue with --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
