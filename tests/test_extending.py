"""The "Add your own criterion" page is real: its code runs, its criterion registers, and its
command trains with the new knob set from the command line and from a config's [dst] table."""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import torch

from neuroplast.cli import build_parser, main
from neuroplast.dst import DROP_CRITERIA, PRESETS, preset
from neuroplast.train import ConfigError, RunConfig

PAGE = Path(__file__).parents[1] / "docs" / "extending.md"


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", PAGE.read_text(), flags=re.DOTALL)


@pytest.fixture
def page_code():
    """The page's Python blocks run in one namespace; the registrations are undone afterwards."""
    namespace: dict = {}
    try:
        for code in blocks("python"):
            exec(compile(code, str(PAGE), "exec"), namespace)
        yield namespace
    finally:
        DROP_CRITERIA.pop("soft-magnitude", None)
        PRESETS.pop("soft-set", None)


def test_the_page_registers_a_criterion_its_knob_and_a_preset(page_code):
    assert DROP_CRITERIA["soft-magnitude"] is page_code["SoftMagnitudeDrop"]
    assert preset("soft-set", drop_temperature=0.2).drop.drop_temperature == 0.2
    assert build_parser().parse_args(["train", "--out", "x", "--drop-temperature", "0.3"]).drop_temperature == 0.3
    with pytest.raises(ValueError, match="drop_temperature -1.0 must be >= 0"):
        preset("soft-set", drop_temperature=-1.0)
    with pytest.raises(ConfigError, match="drop_temperature 'hot' must be of type float"):
        RunConfig(method="soft-set", dst={"drop_temperature": "hot"}).validate()


def test_the_pages_command_trains_with_the_new_criterion(page_code, tmp_path):
    torch.set_num_threads(1)
    (command,) = [line for line in blocks("bash")[0].splitlines() if line.startswith("neuroplast train")]
    argv = shlex.split(command)[1:]
    argv[argv.index("--out") + 1] = str(tmp_path / "flag")
    assert main([*argv, "--quiet"]) == 0
    records = [json.loads(line) for line in (tmp_path / "flag" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 3 and sum(len(r["updates"]) for r in records) == 2  # every epoch but the last
    assert records[-1]["test_accuracy"] > 0.5

    table = tomllib.loads(blocks("toml")[0])
    config = RunConfig.from_dict({**table, "dataset": "digits", "hidden": [64], "density": 0.3, "epochs": 3}).validate()
    assert config.dst == {"drop_temperature": 0.2}
    (tmp_path / "run.toml").write_text(config.to_toml())
    assert main(["train", "--config", str(tmp_path / "run.toml"), "--out", str(tmp_path / "file"), "--quiet"]) == 0
    from_file = (tmp_path / "file" / "metrics.jsonl").read_text().splitlines()
    for a, b in zip(records, map(json.loads, from_file), strict=True):  # the same run either way
        assert a["test_loss"] == b["test_loss"] and a["updates"] == b["updates"]
