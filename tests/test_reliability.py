"""Faults a user causes at the workflow level (issue 27): each gets one line naming the
problem, Snakemake stops with exit status 1 before any job, and finished files stay."""

from __future__ import annotations

import pytest
from conftest import copy_workflow, run_snakemake

from loupe.config import check_yaml
from loupe.errors import LoupeError

DEMO = ("--profile", "profiles/demo", "--configfile", "profiles/demo/demo-config.yaml")


@pytest.fixture()
def checkout(tmp_path):
    """A user's checkout with one finished result in it (which nothing may touch)."""
    work = copy_workflow(tmp_path / "work")
    done = work / "results/tokens/manifest.json"
    done.parent.mkdir(parents=True)
    done.write_text('{"done": true}\n')
    return work


def stops_before_any_job(work, *args) -> str:
    """Run Snakemake for real; assert it failed (1) with the finished file untouched; returns
    what it printed."""
    before = (work / "results/tokens/manifest.json").stat()
    proc = run_snakemake(work, *DEMO, *args, check=False)
    after = (work / "results/tokens/manifest.json").stat()
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert (before.st_ino, before.st_mtime_ns) == (after.st_ino, after.st_mtime_ns)
    assert "Traceback" not in proc.stderr and "rule " not in proc.stdout  # no job started
    return proc.stderr


def test_a_yaml_mistake_in_config_yaml_names_the_file_and_line(checkout):
    text = (checkout / "config.yaml").read_text()
    (checkout / "config.yaml").write_text(text + "extra:\n\tindented: with a tab\n")
    line = len(text.splitlines()) + 2
    err = stops_before_any_job(checkout)
    assert (
        f"config file config.yaml, line {line}, column 1 is not valid YAML: found character" in err
    )


def test_check_yaml_names_file_line_and_problem(tmp_path):
    bad = tmp_path / "over.yaml"
    bad.write_text("sae:\n  k: 4\n\tfoo: 1\n")
    with pytest.raises(LoupeError) as e:
        check_yaml(bad)
    assert str(e.value) == (
        f"config file {bad}, line 3, column 1 is not valid YAML:"
        " found character '\\t' that cannot start any token"
    )
    (tmp_path / "ok.yaml").write_text("sae:\n  k: 4\n")
    check_yaml(tmp_path / "ok.yaml")


@pytest.mark.parametrize("key", ["model.name", "model.tokenizer", "dataset.path"])
def test_a_missing_local_folder_is_not_found_at_workflow_start(checkout, key):
    """Issue 27 #3: `results/no_such_model` was taken for a hub id; the tokenize job then
    removed the token links and blamed the network."""
    section, name = key.split(".")
    (checkout / "override.yaml").write_text(f"{section}:\n  {name}: results/no_such_model\n")
    err = stops_before_any_job(checkout, "override.yaml")
    assert f"{key}: not found: results/no_such_model (no such local file or folder)" in err


@pytest.mark.parametrize("key", ["repo", "space"])
def test_an_invalid_hub_id_stops_the_workflow_at_start(checkout, key):
    """Not yet tried in issue 27: invalid hub.repo / hub.space ids passed the schema's
    owner/name pattern; the upload, after every other stage, could not create them."""
    (checkout / "override.yaml").write_text(f"hub:\n  {key}: me/gemma--loupe\n")
    err = stops_before_any_job(checkout, "override.yaml")
    assert f"config error at hub/{key}: Cannot have -- or .. in repo_id: 'me/gemma--loupe'" in err
