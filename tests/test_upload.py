"""Uploading the staged repo, with the hub client replaced at its boundary by a fake that keeps
a remote file tree: what is created and sent, the check of the remote against the manifest,
the receipt, resuming, the dry run, the no-token and failure paths, and that the token is
never written anywhere."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import demo_config

from loupe import cli
from loupe.layout import REPO_MANIFEST
from loupe.stage import build_manifest

FAKE_TOKEN = "hf_FAKEtokenNeverWrittenAnywhere0123456789"
LFS_SUFFIXES = {".safetensors", ".parquet", ".png"}


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    """Stands in for huggingface_hub.HfApi: records every call and keeps each repo's files
    (path -> bytes) per commit. Files the Hub stores with LFS report their sha256."""

    def __init__(self, token: str, fail_after: int | None = None, corrupt: str | None = None):
        self.token = token
        self.calls: list[tuple] = []
        self.repos: dict[str, dict] = {}
        self.fail_after = fail_after  # files stored before the upload "drops"
        self.corrupt = corrupt  # a path whose bytes the "server" mangles

    # --- the HfApi methods loupe uses --------------------------------------------------
    def create_repo(
        self, repo_id, *, repo_type=None, private=False, exist_ok=False, space_sdk=None
    ):
        self.calls.append(("create_repo", repo_id, repo_type, private, exist_ok, space_sdk))
        if repo_id in self.repos and not exist_ok:
            raise RuntimeError("409 repo exists")
        self.repos.setdefault(
            repo_id, {"files": {".gitattributes": b"*.bin filter=lfs\n"}, "commits": ["c0" * 20]}
        )

    def create_branch(self, repo_id, *, branch, repo_type=None, exist_ok=False):
        self.calls.append(("create_branch", repo_id, branch))

    def list_repo_tree(self, repo_id, *, recursive=False, revision=None, repo_type=None):
        from huggingface_hub.hf_api import RepoFile, RepoFolder

        self.calls.append(("list_repo_tree", repo_id, revision))
        files = self.repos[repo_id]["files"]
        folders = {str(Path(p).parent) for p in files if "/" in p}
        yield from (RepoFolder(path=f, oid="t" * 40) for f in sorted(folders))
        for path, data in sorted(files.items()):
            lfs = None
            if Path(path).suffix in LFS_SUFFIXES:
                sha = hashlib.sha256(data).hexdigest()
                lfs = {"size": len(data), "oid": sha, "pointerSize": 134}
            yield RepoFile(path=path, size=len(data), oid=git_blob_sha1(data), lfs=lfs)

    def upload_folder(
        self,
        *,
        repo_id,
        folder_path,
        repo_type=None,
        revision=None,
        allow_patterns=None,
        commit_message=None,
    ):
        from huggingface_hub.utils import filter_repo_objects

        root = Path(folder_path)
        local = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
        sent = list(filter_repo_objects(local, allow_patterns=allow_patterns))
        self.calls.append(("upload", repo_id, repo_type, revision, sorted(sent)))
        repo = self.repos[repo_id]
        for i, rel in enumerate(sent):
            if self.fail_after is not None and i >= self.fail_after:
                raise ConnectionError(f"connection reset while sending {rel} (token {self.token})")
            data = (root / rel).read_bytes()
            repo["files"][rel] = data[:-1] + b"!" if rel == self.corrupt else data
        repo["commits"].append(
            hashlib.sha1(repr(sorted(repo["files"].items())).encode()).hexdigest()
        )

    def repo_info(self, repo_id, *, revision=None, repo_type=None):
        self.calls.append(("repo_info", repo_id, revision))
        return SimpleNamespace(sha=self.repos[repo_id]["commits"][-1])

    # --- for the tests ------------------------------------------------------------------
    def uploads(self) -> list[list[str]]:
        return [c[4] for c in self.calls if c[0] == "upload"]


class LargeFolderHub(FakeHub):
    """huggingface_hub < 2, where upload_large_folder is the resumable uploader."""

    def upload_large_folder(
        self, *, repo_id, folder_path, repo_type, revision=None, allow_patterns=None
    ):
        assert repo_type == "model"
        self.upload_folder(
            repo_id=repo_id,
            folder_path=folder_path,
            repo_type=repo_type,
            revision=revision,
            allow_patterns=allow_patterns,
        )


@pytest.fixture()
def hub(monkeypatch):
    """Install a fake client at loupe's boundary; returns a holder the test can reconfigure."""
    holder = SimpleNamespace(cls=FakeHub, kwargs={}, clients=[], remote={})

    def hub_client(token):
        client = holder.cls(token, **holder.kwargs)
        client.repos = holder.remote  # the "remote" outlives each client, like the Hub
        holder.clients.append(client)
        return client

    monkeypatch.setattr("loupe.upload.hub_client", hub_client)
    return holder


@pytest.fixture()
def no_login(monkeypatch, tmp_path):
    """No stored login: the token can only come from HF_TOKEN."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-login" / "token"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)


@pytest.fixture()
def token(monkeypatch, no_login):
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    return FAKE_TOKEN


def make_staged(root: Path) -> Path:
    """A small staged repo: the layout's kinds of files, and its manifest."""
    files = {
        "README.md": b"---\nlicense: apache-2.0\n---\n# demo\n",
        "config.json": b'{"model": "m"}\n',
        "sfx/config.json": b'{"model": "m"}\n',
        "sfx/language_model.layers.0/cfg.json": b'{"k": 8, "d_in": 64}\n',
        "sfx/language_model.layers.0/sae.safetensors": os.urandom(5000),
        "sfx/language_model.layers.1/cfg.json": b'{"k": 8, "d_in": 64}\n',
        "sfx/language_model.layers.1/sae.safetensors": os.urandom(5000),
        "sfx/max_activations/layer_0.parquet": os.urandom(3000),
        "sfx/max_activations/layer_1.parquet": os.urandom(3000),
        "sfx/plots/fvu [by layer].png": os.urandom(700),  # glob characters in a name
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    restage(root)
    return root


def restage(root: Path) -> None:
    (root / REPO_MANIFEST).write_text(json.dumps(build_manifest(root), indent=2) + "\n")


def hub_config(**overrides) -> dict:
    """The demo's whole config (what --config carries), with the hub section overridden."""
    config = demo_config()
    config["hub"].update(
        {"repo": "someone/demo-sae", "revision": "main", "private": False, "prefix": "sfx"},
        **overrides,
    )
    return config


def _run_cli(args: list[str]) -> int:
    # --log points the root logger's handlers at a file that closes when the command ends.
    handlers = logging.root.handlers[:]
    try:
        return cli.main(args)
    finally:
        logging.root.handlers[:] = handlers


def run_upload(tmp_path: Path, staged: Path, config: dict, receipt: Path) -> int:
    """`loupe upload` as the rule runs it."""
    return _run_cli(
        [
            "--log",
            str(tmp_path / "upload.log"),
            "upload",
            "--config",
            json.dumps(config),
            "--repo",
            str(staged),
            "--receipt",
            str(receipt),
        ]
    )


def run_dry_run(tmp_path: Path, staged: Path, config: dict, plan: Path, log: Path) -> int:
    """`loupe upload-dry-run` as the rule runs it, its output in `log`."""
    return _run_cli(
        [
            "--log",
            str(log),
            "upload-dry-run",
            "--config",
            json.dumps(config),
            "--repo",
            str(staged),
            "--plan",
            str(plan),
        ]
    )


@pytest.fixture()
def staged(tmp_path) -> Path:
    return make_staged(tmp_path / "hub")


def all_paths(staged: Path) -> list[str]:
    return sorted(
        [
            *(f["path"] for f in json.loads((staged / REPO_MANIFEST).read_text())["files"]),
            REPO_MANIFEST,
        ]
    )


def assert_token_nowhere(tmp_path: Path, *texts: str) -> None:
    for text in texts:
        assert FAKE_TOKEN not in text
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert FAKE_TOKEN.encode() not in path.read_bytes(), path


def test_upload_sends_everything_then_verifies_and_writes_receipt(
    tmp_path, staged, hub, token, capfd
):
    receipt = tmp_path / "upload.json"
    assert run_upload(tmp_path, staged, hub_config(), receipt) == 0
    (client,) = hub.clients
    assert client.token == FAKE_TOKEN  # the token reached the client, and nothing else
    assert client.calls[0] == ("create_repo", "someone/demo-sae", "model", False, True, None)
    assert client.uploads() == [all_paths(staged)]
    r = json.loads(receipt.read_text())
    remote = hub.remote["someone/demo-sae"]
    assert r["repo"] == "someone/demo-sae" and r["revision"] == "main"
    assert r["commit"] == remote["commits"][-1]
    assert sorted(f["path"] for f in r["files"]) == all_paths(staged)
    for f in r["files"]:
        assert remote["files"][f["path"]] == (staged / f["path"]).read_bytes()
        assert f["sha256"] == hashlib.sha256(remote["files"][f["path"]]).hexdigest()
    assert sorted(r["uploaded"]) == all_paths(staged)
    assert "T" in r["time"] and r["time"].endswith("+00:00")
    out, err = capfd.readouterr()
    assert_token_nowhere(tmp_path, out, err)


def test_second_run_sends_nothing_and_a_change_sends_only_it(tmp_path, staged, hub, token):
    receipt = tmp_path / "upload.json"
    assert run_upload(tmp_path, staged, hub_config(), receipt) == 0
    first = json.loads(receipt.read_text())
    assert run_upload(tmp_path, staged, hub_config(), receipt) == 0
    assert hub.clients[1].uploads() == []  # nothing unchanged is sent again
    second = json.loads(receipt.read_text())
    assert second["commit"] == first["commit"] and second["uploaded"] == []

    (staged / "README.md").write_text("# demo, revised\n")
    restage(staged)
    assert run_upload(tmp_path, staged, hub_config(), receipt) == 0
    assert hub.clients[2].uploads() == [["README.md", REPO_MANIFEST]]
    assert json.loads(receipt.read_text())["commit"] != first["commit"]


def test_interrupted_upload_leaves_no_receipt_and_resumes(tmp_path, staged, hub, token, capfd):
    receipt = tmp_path / "upload.json"
    receipt.write_text("{}")  # a receipt from an earlier upload: no longer true
    hub.kwargs = {"fail_after": 4}
    assert run_upload(tmp_path, staged, hub_config(), receipt) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        "loupe upload: error: upload to someone/demo-sae failed: ConnectionError: connection reset"
    )
    assert "***" in err[0]  # the server echoed the token; the message masks it
    assert not receipt.exists()
    sent_before = set(hub.remote["someone/demo-sae"]["files"]) - {".gitattributes"}
    assert len(sent_before) == 4

    hub.kwargs = {}
    assert run_upload(tmp_path, staged, hub_config(), receipt) == 0
    (resumed,) = hub.clients[1].uploads()
    assert sorted(resumed) == sorted(set(all_paths(staged)) - sent_before)
    assert json.loads(receipt.read_text())["files"]
    assert_token_nowhere(tmp_path, *capfd.readouterr())


def test_remote_that_differs_from_the_manifest_fails_verification(
    tmp_path, staged, hub, token, capfd
):
    receipt = tmp_path / "upload.json"
    hub.kwargs = {"corrupt": "sfx/language_model.layers.1/sae.safetensors"}
    assert run_upload(tmp_path, staged, hub_config(), receipt) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "upload to someone/demo-sae incomplete: 1 files missing or different" in err[0]
    assert "sfx/language_model.layers.1/sae.safetensors" in err[0]
    assert not receipt.exists()


def test_small_files_are_verified_by_git_oid(tmp_path, staged, hub, token, capfd):
    receipt = tmp_path / "upload.json"
    hub.kwargs = {"corrupt": "sfx/config.json"}  # no LFS: same size, other bytes
    assert run_upload(tmp_path, staged, hub_config(), receipt) == 2
    assert "sfx/config.json" in capfd.readouterr().err
    assert not receipt.exists()


def test_branch_private_and_large_folder_uploader(tmp_path, staged, hub, token):
    hub.cls = LargeFolderHub
    receipt = tmp_path / "upload.json"
    assert run_upload(tmp_path, staged, hub_config(revision="v1", private=True), receipt) == 0
    (client,) = hub.clients
    assert client.calls[0] == ("create_repo", "someone/demo-sae", "model", True, True, None)
    assert client.calls[1] == ("create_branch", "someone/demo-sae", "v1")
    assert client.calls[3][:4] == ("upload", "someone/demo-sae", "model", "v1")
    assert json.loads(receipt.read_text())["revision"] == "v1"


def test_no_token_is_one_line_and_sends_nothing(tmp_path, staged, hub, no_login, capfd):
    receipt = tmp_path / "upload.json"
    assert run_upload(tmp_path, staged, hub_config(), receipt) == 2
    out, err = capfd.readouterr()
    assert err.strip().splitlines() == [
        "loupe upload: error: no Hugging Face token: set HF_TOKEN or run `hf auth login`"
        " (nothing was sent to someone/demo-sae)"
    ]
    assert hub.clients == []  # no client was even built
    assert not receipt.exists()


def test_dry_run_lists_files_with_sizes_and_sends_nothing(tmp_path, staged, hub, token, capfd):
    plan_path = tmp_path / "upload_dry_run.json"
    log_path = tmp_path / "logs" / "upload_dry_run.log"
    assert run_dry_run(tmp_path, staged, hub_config(), plan_path, log_path) == 0
    assert hub.clients == []
    out, err = capfd.readouterr()
    # The plan text is in the rule's log (the terminal gets nothing but errors).
    log = log_path.read_text()
    manifest = json.loads((staged / REPO_MANIFEST).read_text())
    assert "dry run: would upload to https://huggingface.co/someone/demo-sae" in log
    assert f"{len(manifest['files']) + 1} files" in log
    assert "5.0 KB  sfx/language_model.layers.0/sae.safetensors" in log
    assert "token: from HF_TOKEN" in log and "nothing was sent" in log
    plan = json.loads(plan_path.read_text())
    assert plan["dry_run"] is True and sorted(f["path"] for f in plan["files"]) == all_paths(staged)
    assert {f["path"]: f["size"] for f in plan["files"]}[
        "sfx/language_model.layers.0/sae.safetensors"
    ] == 5000
    assert not (tmp_path / "upload.json").exists()
    assert_token_nowhere(tmp_path, out, err)


def test_stale_staging_is_refused(tmp_path, staged, hub, token, capfd):
    (staged / "sfx/language_model.layers.0/cfg.json").write_text("{}")  # manifest not rebuilt
    assert run_upload(tmp_path, staged, hub_config(), tmp_path / "upload.json") == 2
    assert "does not match manifest.json: stage the repo again" in capfd.readouterr().err
    assert hub.clients == []


def test_config_dump_carries_no_token(tmp_path, staged, hub, token):
    """Jobs get the whole config as JSON (--config, LOUPE_CONFIG): it cannot hold the token."""
    config = copy.deepcopy(hub_config())
    assert run_upload(tmp_path, staged, config, tmp_path / "upload.json") == 0
    assert FAKE_TOKEN not in json.dumps(config)
    assert_token_nowhere(tmp_path)


# --- the rule, for real, on the demo ------------------------------------------------------


@pytest.fixture()
def demo_copy(demo_run, tmp_path) -> Path:
    """A copy of the finished demo (mtimes kept, so only `upload` is left to run)."""
    import shutil

    return Path(shutil.copytree(demo_run, tmp_path / "demo", symlinks=True))


def _snakemake_upload(workdir: Path, env: dict, target: str = "upload"):
    import subprocess
    import sys

    from helpers import snakemake_env

    return subprocess.run(
        [sys.executable, "-m", "snakemake", target, "--profile", "profiles/demo"],
        cwd=workdir,
        env={**snakemake_env(), **env},
        capture_output=True,
        text=True,
        timeout=600,
    )


def _clean_env(tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    return {**env, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_OFFLINE": "1"}


def with_browser(staged: Path) -> Path:
    """The staged repo with loupe's browser page in browser/ (what staging installs)."""
    from loupe.browse import ASSETS

    shutil.copytree(ASSETS, staged / "browser")
    (staged / "browser/suite.json").write_text('{"prefix": "sfx"}\n')
    restage(staged)
    return staged


def test_space_publishes_the_page_set_to_read_the_model_repo(tmp_path, staged, hub, token, capfd):
    staged, space = with_browser(staged), "someone/demo-browser"
    config, receipt = hub_config(space=space, revision="v1"), tmp_path / "upload.json"
    assert run_upload(tmp_path, staged, config, receipt) == 0
    assert ("create_repo", space, "space", False, True, "static") in hub.clients[0].calls
    files = hub.remote[space]["files"]
    page = sorted(
        p.relative_to(staged / "browser").as_posix()
        for p in (staged / "browser").rglob("*")
        if p.is_file()
    )
    assert sorted(set(files) - {".gitattributes"}) == sorted({*page, "README.md"} - {"suite.json"})
    html = files["index.html"].decode()
    assert '<meta name="loupe-repo" content="someone/demo-sae">' in html
    assert '<meta name="loupe-revision" content="v1">' in html
    assert (
        html.replace(
            '<meta name="loupe-repo" content="someone/demo-sae">\n  '
            '<meta name="loupe-revision" content="v1">\n  ',
            "",
        )
        == (staged / "browser/index.html").read_text()
    )
    assert files["app.js"] == (staged / "browser/app.js").read_bytes()
    front = files["README.md"].decode().split("---")[1]
    assert "sdk: static" in front and "- someone/demo-sae" in front
    r = json.loads(receipt.read_text())
    assert r["space"]["commit"] == hub.remote[space]["commits"][-1]
    assert r["space"]["app"] == f"https://huggingface.co/spaces/{space}"
    assert r["commit"] == hub.remote["someone/demo-sae"]["commits"][-1]
    # Again: nothing to send to either repo.
    assert run_upload(tmp_path, staged, config, receipt) == 0
    assert len(hub.clients[1].uploads()) == 0

    # A plan lists the Space's files too, and sends nothing.
    plan_path = tmp_path / "plan.json"
    assert run_dry_run(tmp_path, staged, config, plan_path, tmp_path / "plan.log") == 0
    plan = json.loads(plan_path.read_text())
    assert plan["space"]["repo"] == space and "README.md" in [
        f["path"] for f in plan["space"]["files"]
    ]
    assert (
        f"would upload to https://huggingface.co/spaces/{space}"
        in (tmp_path / "plan.log").read_text()
    )
    assert len(hub.clients) == 2
    # Token hygiene with a Space too (issue 27): not in any file written here, any output, or
    # anything either repo received.
    assert_token_nowhere(tmp_path, *capfd.readouterr())
    for name, remote in hub.remote.items():
        for path, data in remote["files"].items():
            assert FAKE_TOKEN.encode() not in data, (name, path)


def test_a_space_that_differs_after_upload_fails_with_no_receipt(
    tmp_path, staged, hub, token, capfd
):
    hub.kwargs = {"corrupt": "index.html"}  # only the Space has it at its root
    receipt = tmp_path / "upload.json"
    config, staged = hub_config(space="someone/demo-browser"), with_browser(staged)
    capfd.readouterr()  # staging's progress bar
    assert run_upload(tmp_path, staged, config, receipt) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert err == [
        "loupe upload: error: upload to someone/demo-browser incomplete: 1 files missing or"
        f" different at commit {hub.remote['someone/demo-browser']['commits'][-1][:12]}:"
        " index.html (run again to resume)"
    ]
    assert not receipt.exists()


@pytest.mark.e2e
def test_snakemake_upload_dry_run(demo_copy, tmp_path):
    # (A config with the old switch, hub.dry_run, is refused: tests/test_workflow.py.)
    env = {**_clean_env(tmp_path), "HF_TOKEN": FAKE_TOKEN}
    proc = _snakemake_upload(demo_copy, env, target="upload_dry_run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (demo_copy / "results/logs/upload_dry_run.log").read_text()
    assert "dry run: would upload to https://huggingface.co/loupe-demo/tiny-gemma4-loupe" in log
    assert "sae-tiny-gemma-4-8x/language_model.layers.5/sae.safetensors" in log
    assert "token: from HF_TOKEN" in log and "nothing was sent" in log
    plan = json.loads((demo_copy / "results/upload_dry_run.json").read_text())
    hub = demo_copy / "results/hub"
    assert plan["dry_run"] is True and plan["repo"] == "loupe-demo/tiny-gemma4-loupe"
    assert sorted(f["path"] for f in plan["files"]) == all_paths(hub)
    assert {f["path"]: f["size"] for f in plan["files"]} == {
        p: (hub / p).stat().st_size for p in all_paths(hub)
    }
    assert not (demo_copy / "results/upload.json").exists()
    # A dry run never re-stages the repo (it only reads the staged one).
    assert "rule stage" not in proc.stdout + proc.stderr
    assert_token_nowhere(demo_copy, proc.stdout, proc.stderr)


@pytest.mark.e2e
def test_snakemake_upload_without_token_or_hub(demo_copy, tmp_path):
    proc = _snakemake_upload(demo_copy, _clean_env(tmp_path))
    assert proc.returncode != 0
    ours = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.startswith("loupe upload")]
    assert ours == [
        "loupe upload: error: no Hugging Face token: set HF_TOKEN or run `hf auth login`"
        " (nothing was sent to loupe-demo/tiny-gemma4-loupe)"
    ]
    assert not (demo_copy / "results/upload.json").exists()

    # With a token but no network (offline here): the real client fails, one line, no receipt.
    proc = _snakemake_upload(demo_copy, {**_clean_env(tmp_path), "HF_TOKEN": FAKE_TOKEN})
    assert proc.returncode != 0
    ours = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.startswith("loupe upload")]
    assert len(ours) == 1 and "upload to loupe-demo/tiny-gemma4-loupe failed" in ours[0], ours
    assert not (demo_copy / "results/upload.json").exists()
    assert_token_nowhere(demo_copy, proc.stdout, proc.stderr)


def test_fake_accepts_only_what_the_real_client_takes():
    """The fake must not drift from huggingface_hub.HfApi: every argument it accepts (so every
    argument loupe passes) exists on the real method."""
    import inspect

    from huggingface_hub import HfApi

    for name in ("create_repo", "create_branch", "list_repo_tree", "upload_folder", "repo_info"):
        real = inspect.signature(getattr(HfApi, name)).parameters
        fake = inspect.signature(getattr(FakeHub, name)).parameters
        assert set(fake) - {"self"} <= set(real), name
