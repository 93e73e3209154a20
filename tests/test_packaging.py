"""What ships beside the package: the conda env, the profiles and the CI script agree with the
project's own declarations."""

from __future__ import annotations

import re

import pytest
import tomllib
import yaml
from helpers import REPO

# What a site may set: where jobs run and who pays, never how big they are.
SITE_RESOURCES = {"slurm_partition", "slurm_account", "gpu_model", "constraint", "slurm_extra"}


def test_conda_env_lists_exactly_the_package_dependencies():
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    env = yaml.safe_load((REPO / "envs/loupe.yaml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    # The package itself is never installed into it: jobs run it from the workflow's folder.
    assert pip == deps


def test_cluster_profiles_add_only_site_settings():
    for name in ("slurm", "slurm-site-example"):
        profile = yaml.safe_load((REPO / "profiles" / name / "profile.yaml").read_text())
        assert "set-threads" not in profile, name
        for rule, resources in (profile.get("set-resources") or {}).items():
            assert set(resources) <= SITE_RESOURCES, (name, rule, set(resources))
        assert set(profile.get("default-resources") or {}) <= SITE_RESOURCES, name


def test_gpu_rules_declare_their_resources():
    # The training rules' resources are built in loupe.jobs (train_resources); their values
    # are checked in tests/test_jobs.py and by a dry run in tests/test_slurm.py.
    jobs = (REPO / "workflow/loupe/jobs.py").read_text()
    for rule in ("train", "maxact", "evaluate"):
        text = (REPO / f"workflow/rules/{rule}.smk").read_text() + (jobs if rule == "train" else "")
        for resource in ("gpu=1", "cpus_per_gpu=", "mem_mb=", "runtime="):
            assert resource in text, (rule, resource)


def test_ci_runs_exactly_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    command = re.search(r"\*\*Run the tests\*\*.*?```bash\n(.+?)\n```", readme, re.S).group(1)
    ci = (REPO / ".ci/run").read_text()
    assert command in ci
    for check in (
        "ruff check .",
        "ruff format --check .",
        "snakefmt --check .",
        "snakemake --lint",
        "@biomejs/biome@2.6.9 lint",  # the browser's JavaScript, biome from npm, pinned
    ):
        assert check in command


@pytest.mark.e2e
def test_jobs_run_the_workflows_own_package(demo_run):
    # demo_run is a copy of the workflow elsewhere; the package is also installed (editable)
    # from this checkout: the jobs must have imported the copy's.
    log = (demo_run / "results/layer_0/train.log").read_text()
    line = next(ln for ln in log.splitlines() if "INFO loupe: loupe " in ln)
    assert str(demo_run / "workflow" / "loupe") in line, line
