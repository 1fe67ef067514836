"""Studies: config validation, resumable cells, the worker pool, the report and its parts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from neuroplast import cli
from neuroplast.experiments.report import (
    CellResult,
    connectivity_image,
    epochs_to_reach,
    input_connectivity,
    load_cell,
    study_markdown,
    study_rows,
)
from neuroplast.experiments.study import density_folder, parse_study, run_study, write_report
from neuroplast.sparse import sparsify
from neuroplast.train import ConfigError, train


def config(**study) -> dict:
    """A tiny study: 2 methods x 1 density x 2 seeds on digits, 2 epochs each."""
    values = {
        "study": {
            "methods": ["static", "set"],
            "densities": [0.2],
            "seeds": [0, 1],
            "workers": 1,
            "report_epochs": [1],
            "heatmap_methods": ["set"],
            "baseline": "static",
        },
        "run": {"dataset": "digits", "hidden": [32], "epochs": 2, "batch_size": 64},
    }
    values["study"].update(study)
    return values


def metrics(folder: Path) -> list[dict]:
    records = [json.loads(l) for l in (folder / "metrics.jsonl").read_text().splitlines()]
    for r in records:  # wall-clock times differ between any two runs
        r.pop("seconds")
        r.pop("train_seconds")
    return records


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """The tiny study, trained once in this process."""
    study = parse_study(config(), out=tmp_path_factory.mktemp("study"))
    run_study(study, progress=False, log=None)
    return study


# -- config ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change,expected",
    [
        ({"study": {"methods": ["set", "magic"]}}, "unknown method 'magic' in [study] methods; choose from: dense,"),
        ({"study": {"densities": [0.2, 1.5]}}, "density 1.5 in [study] densities is outside (0, 1]"),
        ({"study": {"densities": [0]}}, "density 0.0 in [study] densities is outside (0, 1]"),
        ({"study": {"seeds": []}}, "[study] seeds is empty"),
        ({"study": {"seeds": [0, 0]}}, "[study] seeds lists 0 more than once"),
        ({"study": {"methods": "set"}}, "[study] methods 'set' must be a list"),
        ({"study": {"epochs": 3}}, "unknown key 'epochs' in [study]; valid keys: methods, densities, seeds,"),
        ({"study": {"workers": 0}}, "workers 0 must be a positive integer"),
        ({"study": {"heatmap_methods": ["rigl"]}}, "heatmap method 'rigl' in [study] is not one of its methods"),
        ({"study": {"heatmap_density": 0.5}}, "heatmap_density 0.5 in [study] is not one of the densities: 0.2"),
        ({"study": {"baseline": "rigl"}}, "baseline 'rigl' in [study] is not one of its methods: static, set"),
        ({"study": {"report_epochs": [3]}}, "report_epochs 3 in [study] is not an epoch of every cell (1 to 2)"),
        ({"ablation": {"methods": ["set"], "densities": [0.2], "seeds": [0], "x": 1}}, "unknown key 'x' in [ablation]"),
        ({"ablation": {"methods": ["nope"], "densities": [0.2], "seeds": [0]}}, "unknown method 'nope' in [ablation]"),
        ({"runs": {}}, "unknown table [runs] in config; valid tables: [study], [ablation], [run], [method.NAME]"),
        ({"epochs": 3}, "unknown top-level key 'epochs' in config"),
        ({"run": {"learning_rate": 0.1}}, "unknown key 'learning_rate' in [run]; valid keys: dataset, model"),
        ({"run": {"method": "set"}}, "[run] sets 'method'; a study sets method, density and seed per cell"),
        ({"run": {"epochs": 0}}, "epochs 0 must be a positive integer"),
        ({"method": {"rigl": {"lr": 0.1}}}, "[method.rigl] names a method in neither grid; methods of the study:"),
        ({"method": {"set": {"drop_fraction": 2.0}}}, "drop_fraction 2.0 must be in [0, 1]"),
    ],
)
def test_bad_study_configs(change, expected):
    values = config()
    for key, value in change.items():
        if key == "study":
            values["study"].update(value)
        elif key == "run":
            values["run"].update(value)
        else:
            values[key] = value
    with pytest.raises(ConfigError) as info:
        parse_study(values)
    assert expected in str(info.value)
    assert "\n" not in str(info.value)


def test_cells_and_overrides(tmp_path):
    values = config()
    values["ablation"] = {"methods": ["set", "rigl"], "densities": [0.2], "seeds": [0]}
    values["method"] = {"set": {"drop_fraction": 0.1}}
    study = parse_study(values, out=tmp_path, workers=3)
    assert study.workers == 3 and study.heatmap_density == 0.2
    names = [cell.name for cell in study.cells]
    # seed-major: a study stopped early holds every method at its first seeds
    assert names[:4] == ["static/d0.2/seed0", "set/d0.2/seed0", "static/d0.2/seed1", "set/d0.2/seed1"]
    assert names[-2:] == ["ablation/set/d0.2/seed0", "ablation/rigl/d0.2/seed0"]
    assert study.cells[-1].folder == tmp_path / "ablation" / "rigl" / "d0.2" / "seed0"
    for cell in study.cells:
        assert cell.config.dst.get("drop_fraction") == (0.1 if cell.method == "set" else None)
        assert (cell.config.hidden, cell.config.density, cell.config.seed) == ([32], 0.2, cell.seed)
    assert study.grids[1].baseline == "set"  # default: the first method
    assert density_folder(0.05) == "d0.05" and density_folder(0.1) == "d0.1" and density_folder(1) == "d1.0"


# -- running ----------------------------------------------------------------------------------------


def test_finished_cells_are_skipped(finished):
    cells = finished.cells
    assert all((cell.folder / "summary.json").is_file() for cell in cells)
    mtimes = [(cell.folder / "summary.json").stat().st_mtime_ns for cell in cells]
    lines = []
    assert run_study(finished, progress=False, log=lines.append) == []
    assert lines == [f"4 of 4 cells already finished in {finished.out}; skipping them"]
    assert [(cell.folder / "summary.json").stat().st_mtime_ns for cell in cells] == mtimes


class Stop(Exception):
    pass


def test_partial_cell_resumes(tmp_path):
    study = parse_study(config(seeds=[0]), out=tmp_path)
    cell = study.cells[1]  # set, seed 0

    def stop_after_first_epoch(record):
        raise Stop

    with pytest.raises(Stop):
        train(cell.config, cell.folder, resume=True, progress=False, log=None, on_epoch_end=stop_after_first_epoch)
    first = json.loads((cell.folder / "metrics.jsonl").read_text().splitlines()[0])
    assert not (cell.folder / "summary.json").exists()
    lines = []
    trained = run_study(study, progress=False, log=lines.append)
    assert [c.name for c in trained] == ["static/d0.2/seed0", "set/d0.2/seed0"]
    assert "training 2 cells in this process (1 resume)" in lines
    assert any(line.startswith("set/d0.2/seed0") and line.endswith("(resumed)") for line in lines)
    records = [json.loads(l) for l in (cell.folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert records[0] == first  # epoch 1 was not trained again
    uninterrupted = tmp_path / "uninterrupted"
    train(cell.config, uninterrupted, progress=False, log=None)
    assert metrics(cell.folder) == metrics(uninterrupted)


def test_worker_pool_gives_the_same_metrics(finished, tmp_path):
    study = parse_study(config(), out=tmp_path, workers=2)
    lines = []
    trained = run_study(study, progress=False, log=lines.append)
    assert len(trained) == 4 and "training 4 cells in 2 worker processes" in lines
    assert sum("final test accuracy" in line for line in lines) == 4
    for pooled, local in zip(study.cells, finished.cells):
        assert pooled.name == local.name
        assert metrics(pooled.folder) == metrics(local.folder)


# -- report -----------------------------------------------------------------------------------------


def test_report_files(finished, capsys):
    written = write_report(finished, show=True, log=print)
    assert {p.name for p in written} == {"study.md", "curves.png", "connectivity.png"}
    text = (finished.out / "study.md").read_text()
    assert "4 of 4 cells finished" in text
    header = next(line for line in text.splitlines() if line.startswith("| sparsity"))
    assert header == (
        "| sparsity | method | seeds | acc@1 (%) | final acc (%) | R_s | survival | s/epoch | epochs to static |"
    )
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| 80%")]
    assert [r[1] for r in rows] == ["static", "set"]
    assert all(r[2] == "2" and "±" in r[4] for r in rows)
    static = [load_cell(cell.folder) for cell in finished.cells if cell.method == "static"]
    final = sum(c.test_accuracy[-1] for c in static) / 2
    assert f"{100 * final:.2f} ±" in rows[0][4]
    assert rows[0][3] != "—" and rows[0][6] == "—"  # static: nothing ever regrown
    assert rows[0][-1].rstrip(" |") in ("1", "2")  # static reaches its own final accuracy
    out = capsys.readouterr().out
    assert "wrote" in out and "study.md" in out and "static" in out


def test_report_only_with_missing_cells(tmp_path, capsys):
    values = config()
    values["ablation"] = {"methods": ["set"], "densities": [0.2], "seeds": [0]}
    study = parse_study(values, out=tmp_path)
    lines = []
    written = write_report(study, show=False, log=lines.append)
    assert [p.name for p in written] == ["study.md", "ablation.md"]
    assert "0 of 4 cells finished" in (tmp_path / "study.md").read_text()
    assert "connectivity: skipping set (set/d0.2/seed0 is not finished)" in lines


def test_cli_study(finished, tmp_path, capsys):
    path = tmp_path / "study.toml"
    path.write_text(
        '[study]\nmethods = ["static", "set"]\ndensities = [0.2]\nseeds = [0, 1]\nworkers = 1\n'
        'report_epochs = [1]\nheatmap_methods = ["set"]\nbaseline = "static"\n'
        '[run]\ndataset = "digits"\nhidden = [32]\nepochs = 2\nbatch_size = 64\n'
    )
    code = cli.main(["study", "--config", str(path), "--out", str(finished.out), "--quiet"])
    out = capsys.readouterr().out
    assert code == 0 and "4 of 4 cells already finished" in out and "study.md" in out
    path.write_text('[study]\nmethods = ["set", "magic"]\ndensities = [0.2]\nseeds = [0]\n')
    code = cli.main(["study", "--config", str(path), "--report-only"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "neuroplast study: error: unknown method 'magic' in [study] methods; choose from: dense," in err


def cell(method, seed, accuracy, survival=(), density=0.1) -> CellResult:
    return CellResult(
        folder=Path("."),
        method=method,
        density=density,
        seed=seed,
        epochs=list(range(1, len(accuracy) + 1)),
        test_accuracy=list(accuracy),
        train_seconds=[1.0] * len(accuracy),
        survival=list(survival),
        r_s=0.5,
        seconds=float(len(accuracy)),
        layers=[],
    )


def test_epochs_to_reach_the_baseline():
    assert epochs_to_reach([(1, 0.5), (2, 0.7), (3, 0.9)], 0.7) == 2
    assert epochs_to_reach([(1, 0.5), (2, 0.7)], 0.71) is None
    assert epochs_to_reach([(1, 0.5)], None) is None
    cells = [
        cell("set", 0, [0.50, 0.70, 0.80]),
        cell("set", 1, [0.60, 0.70, 0.82]),  # final mean 0.81
        cell("rigl", 0, [0.70, 0.80, 0.90], survival=[0.5, 1.0]),
        cell("rigl", 1, [0.70, 0.84, 0.90], survival=[0.0]),  # mean curve 0.70, 0.82, 0.90
        cell("snfs", 0, [0.10, 0.20, 0.30]),
        cell("set", 0, [0.9, 0.9, 0.9], density=0.05),  # another sparsity: no rigl there
    ]
    rows = study_rows(cells, [2], "set", densities=[0.1, 0.05], methods=["set", "rigl", "snfs", "mest"])
    assert [(r.density, r.method) for r in rows] == [(0.1, "set"), (0.1, "rigl"), (0.1, "snfs"), (0.05, "set")]
    assert [r.epochs_to_baseline for r in rows] == [3, 2, None, 1]
    assert rows[1].survival == pytest.approx(0.5) and rows[0].survival is None
    assert rows[1].accuracy[2].mean == pytest.approx(0.82) and rows[1].accuracy[2].n == 2
    assert rows[2].seeds == 1 and rows[2].final.std == 0.0
    table = study_markdown(rows, [2], "set")
    assert "| 90% | rigl | 2 | 82.00 ± 2.83 | 90.00 ± 0.00 | 0.500 | 0.500 | 1.00 | 2 |" in table
    assert "| 90% | snfs | 1 | 20.00 | 30.00 | 0.500 | — | 1.00 | — |" in table
    assert "| 95% | set |" in table


# -- connectivity -----------------------------------------------------------------------------------


class Net(nn.Module):
    """16 -> 8 -> 16 -> 4; the last layer also reads 16 features and sorts first by name."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.features, self.middle, self.classifier = nn.Linear(16, 8), nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.classifier(torch.relu(self.middle(torch.relu(self.features(x)))))


@pytest.mark.parametrize("backend", ["masked", "csr"])
def test_input_connectivity(backend, tmp_path):
    model = Net()
    sparsify(model, 0.3, distribution="uniform", backend=backend, generator=torch.Generator().manual_seed(1))
    reference = Net()
    sparsify(reference, 0.3, distribution="uniform", generator=torch.Generator().manual_seed(1))
    expected = reference.features.weight_mask.sum(0)  # the same positions as a mask, (out, in)
    assert expected.shape == (16,) and 0 < int(expected.sum()) < 128
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    counts = input_connectivity(tensors, 16)
    assert torch.equal(counts, expected)
    # Read back from a file, the tensors come sorted by name ("classifier" first): the layer
    # order recorded in metrics.jsonl tells which layer is the first.
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "t.safetensors"))
    loaded = load_file(str(tmp_path / "t.safetensors"))
    assert next(iter(loaded)).startswith("model.classifier.")
    assert torch.equal(input_connectivity(loaded, 16, layers=["features", "middle", "classifier"]), expected)
    assert input_connectivity(loaded, 16, layers=["middle"]) is None
    assert connectivity_image(counts).shape == (4, 4)
    assert connectivity_image(counts, (1, 2, 8)).shape == (2, 8)
    assert torch.equal(connectivity_image(torch.arange(12), (3, 2, 2)), torch.tensor([[12, 15], [18, 21]]))


def test_connectivity_of_a_trained_csr_cell(tmp_path):
    values = config(methods=["set"], seeds=[0], baseline="set")
    values["run"].update(backend="csr", epochs=1)
    values["study"]["report_epochs"] = []
    study = parse_study(values, out=tmp_path)
    run_study(study, progress=False, log=None)
    written = write_report(study, show=False, log=None)
    assert (tmp_path / "connectivity.png") in written
    from neuroplast.experiments.study import connectivity_maps

    ((name, image),) = connectivity_maps(study, log=None)
    record = json.loads((study.cells[0].folder / "metrics.jsonl").read_text().splitlines()[-1])
    first = record["layers"][0]
    assert name == "set" and image.shape == (8, 8) and int(image.sum()) == first["nnz"]
