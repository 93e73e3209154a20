"""Publishing the staged repo: create the hub repo, send only the files the remote lacks or holds
in another version (with the hub client's resumable uploader), read the remote file list back,
check it against the manifest, and only then write a receipt. With hub.space set, the feature
browser then goes the same way to a static Space that reads the model repo.

The token comes from HF_TOKEN or the user's login (huggingface_hub.get_token) and goes nowhere
but the client: never into a log line, an error message, the plan or the receipt."""

from __future__ import annotations

import datetime
import glob
import hashlib
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from . import number_format
from .atomic import write_json
from .browse import space_folder
from .config import Config, HubConfig
from .errors import LoupeError
from .layout import REPO_MANIFEST
from .stage import build_manifest, read_repo_manifest, sha256_file

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Target:
    """A hub repo to publish a folder to: the model repo, or the browser's static Space."""

    repo: str
    revision: str
    private: bool
    repo_type: str = "model"
    space_sdk: str | None = None

    @classmethod
    def model(cls, hub: HubConfig) -> Target:
        return cls(hub.repo, hub.revision, hub.private)

    @classmethod
    def space(cls, hub: HubConfig) -> Target:
        return cls(hub.space, "main", hub.private, "space", "static")  # a Space serves main

    @property
    def url(self) -> str:
        kind = "spaces/" if self.repo_type == "space" else ""
        return f"https://huggingface.co/{kind}{self.repo}"


def hub_client(token: str):
    """The one place the hub client is built (tests replace this boundary)."""
    from huggingface_hub import HfApi

    return HfApi(token=token)


def find_token() -> str | None:
    """HF_TOKEN, else the token `hf auth login` stored; None when neither is there."""
    from huggingface_hub import get_token

    return get_token()


def token_source() -> str | None:
    """Where a token would come from, without reading or refreshing it (for the dry run)."""
    from huggingface_hub import constants

    if os.environ.get("HF_TOKEN"):
        return "HF_TOKEN"
    if Path(constants.HF_TOKEN_PATH).is_file():
        return "login"
    return None


def local_files(staged: Path) -> list[dict]:
    """The manifest's files plus the manifest itself, each checked present with its size."""
    staged = Path(staged)
    files = list(read_repo_manifest(staged)["files"])
    manifest = staged / REPO_MANIFEST
    files.append(
        {"path": REPO_MANIFEST, "size": manifest.stat().st_size, "sha256": sha256_file(manifest)}
    )
    for f in files:
        path = staged / f["path"]
        if not path.is_file() or path.stat().st_size != f["size"]:
            raise LoupeError(f"{path} does not match {REPO_MANIFEST}: stage the repo again")
    return files


def _git_blob_sha1(data_size: int, chunks) -> str:
    h = hashlib.sha1(f"blob {data_size}\0".encode())
    for chunk in chunks:
        h.update(chunk)
    return h.hexdigest()


def _file_blob_sha1(path: Path) -> str:
    def chunks():
        with open(path, "rb") as f:
            while chunk := f.read(8 << 20):
                yield chunk

    return _git_blob_sha1(path.stat().st_size, chunks())


def _lfs_pointer_sha1(sha256: str, size: int) -> str:
    """Git oid of the LFS pointer file the Hub commits in place of a large file."""
    pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n"
    return _git_blob_sha1(len(pointer), [pointer.encode()])


def same_content(remote, local: dict, staged: Path) -> bool:
    """Whether a remote file (huggingface_hub's RepoFile) holds exactly the local file: LFS
    sha256 where the Hub gives it, else the git oid of the content or of its LFS pointer."""
    if remote is None or remote.size != local["size"]:
        return False
    if remote.lfs is not None:
        return remote.lfs.sha256 == local["sha256"]
    if remote.blob_id == _lfs_pointer_sha1(local["sha256"], local["size"]):
        return True
    return remote.blob_id == _file_blob_sha1(Path(staged) / local["path"])


def remote_files(api, t: Target, revision: str) -> dict:
    """Path -> RepoFile for every file of the repo at `revision`."""
    tree = api.list_repo_tree(t.repo, recursive=True, revision=revision, repo_type=t.repo_type)
    return {f.path: f for f in tree if hasattr(f, "blob_id")}  # folders have no blob


def differences(remote: dict, files: list[dict], staged: Path) -> list[str]:
    return [f["path"] for f in files if not same_content(remote.get(f["path"]), f, staged)]


def dry_run(config: Config, repo: Path, plan: Path) -> dict:
    """Write to `plan` (and log) what `upload` would send from the staged `repo` (and to the
    Space, with hub.space set); send nothing."""
    hub, staged, token = config.hub, Path(repo), token_source()
    result, lines = dry_run_plan(Target.model(hub), local_files(staged))
    result = {"dry_run": True, **result, "token_source": token}
    if hub.space:
        with tempfile.TemporaryDirectory() as tmp:
            folder = space_folder(staged, Path(tmp), hub.repo, hub.revision)
            # The Space has no manifest of its own: its files are listed as staging lists them.
            files = build_manifest(folder)["files"]
            result["space"], more = dry_run_plan(Target.space(hub), files)
        lines += more
    lines += [
        f"token: from {token}"
        if token
        else "token: none (a real upload would stop: set HF_TOKEN or run `hf auth login`)",
        "nothing was sent",
    ]
    write_json(plan, result)
    log.info("%s", "\n".join(lines))
    return result


def dry_run_plan(t: Target, files: list[dict]) -> tuple[dict, list[str]]:
    """What a real upload to `t` would consider sending (it skips what the remote already
    holds): the plan and its lines of text."""
    total = sum(f["size"] for f in files)
    lines = [
        f"dry run: would upload to {t.url} (revision {t.revision},"
        f" {'private' if t.private else 'public'} if created): {len(files)} files, {number_format.size(total)};"
        " files the remote already holds unchanged are skipped",
        *(f"  {number_format.size(f['size']):>10}  {f['path']}" for f in files),
    ]
    plan = {
        "repo": t.repo,
        "revision": t.revision,
        "total_size": total,
        "files": [{"path": f["path"], "size": f["size"]} for f in files],
    }
    return plan, lines


def _send(api, t: Target, staged: Path, paths: list[str]) -> None:
    where = dict(
        repo_id=t.repo,
        folder_path=str(staged),
        repo_type=t.repo_type,
        revision=t.revision,
        # Exact paths as patterns: escape the glob characters a file name may hold.
        allow_patterns=[glob.escape(p) for p in paths],
    )
    if hasattr(api, "upload_large_folder"):
        # huggingface_hub < 2: the resumable, multi-commit uploader.
        api.upload_large_folder(**where)
    else:
        # huggingface_hub >= 2 folded it into upload_folder (resumable with hf_xet).
        api.upload_folder(**where, commit_message=f"Upload {len(paths)} files with loupe")


def _hub_error(e: Exception, t: Target, token: str) -> LoupeError:
    message = (str(e).strip().splitlines() or [""])[0].replace(token, "***")
    return LoupeError(f"upload to {t.repo} failed: {type(e).__name__}: {message}")


def send_and_verify(api, t: Target, folder: Path, files: list[dict], token: str) -> dict:
    """Create `t` if missing, send the files of `folder` it lacks or holds in another version,
    then read it back: every file must be there with the same content. Returns what happened
    (commit, url, files sent) or raises one LoupeError line."""
    try:
        api.create_repo(
            t.repo,
            repo_type=t.repo_type,
            private=t.private,
            exist_ok=True,
            space_sdk=t.space_sdk,
        )
        if t.revision != "main":
            api.create_branch(t.repo, branch=t.revision, repo_type=t.repo_type, exist_ok=True)
        todo = differences(remote_files(api, t, t.revision), files, folder)
        log.info(
            "%s@%s: %d of %d files to send (%s)",
            t.url,
            t.revision,
            len(todo),
            len(files),
            number_format.size(sum(f["size"] for f in files if f["path"] in set(todo))),
        )
        if todo:
            _send(api, t, folder, todo)
        commit = api.repo_info(t.repo, revision=t.revision, repo_type=t.repo_type).sha
        remote = remote_files(api, t, commit)
    except LoupeError:
        raise
    except Exception as e:  # network, auth, server: one line, the token masked out of it
        raise _hub_error(e, t, token) from None

    wrong = differences(remote, files, folder)
    if wrong:
        shown = ", ".join(wrong[:5]) + (f" and {len(wrong) - 5} more" if len(wrong) > 5 else "")
        raise LoupeError(
            f"upload to {t.repo} incomplete: {len(wrong)} files missing or different at commit"
            f" {commit[:12]}: {shown} (run again to resume)"
        )
    stale = sorted(set(remote) - {f["path"] for f in files} - {".gitattributes"})
    if stale:
        log.warning("remote files not in this upload (left in place): %s", ", ".join(stale[:10]))
    log.info(
        "verified %d files at %s@%s (commit %s); %d sent, %d unchanged",
        len(files),
        t.url,
        t.revision,
        commit[:12],
        len(todo),
        len(files) - len(todo),
    )
    return {
        "repo": t.repo,
        "revision": t.revision,
        "commit": commit,
        "url": f"{t.url}/tree/{commit}",
        "uploaded": todo,
        "total_size": sum(f["size"] for f in files),
        "files": files,
    }


def upload(config: Config, repo: Path, receipt: Path) -> dict:
    """Publish the staged `repo` to config.hub.repo, and the browser to config.hub.space if
    set; returns the receipt written to `receipt` once both are verified."""
    hub = config.hub
    staged, receipt = Path(repo), Path(receipt)
    receipt.unlink(missing_ok=True)  # a receipt only ever describes a verified upload
    files = local_files(staged)
    token = find_token()
    if not token:
        raise LoupeError(
            f"no Hugging Face token: set HF_TOKEN or run `hf auth login` (nothing was sent to {hub.repo})"
        )
    api = hub_client(token)
    result = send_and_verify(api, Target.model(hub), staged, files, token)
    if hub.space:
        space = Target.space(hub)
        with tempfile.TemporaryDirectory() as tmp:
            folder = space_folder(staged, Path(tmp), hub.repo, hub.revision)
            files = build_manifest(folder)["files"]
            result["space"] = {
                **send_and_verify(api, space, folder, files, token),
                "app": space.url,
            }
    now = datetime.datetime.now(datetime.timezone.utc)
    result = {**result, "time": now.isoformat(timespec="seconds")}
    write_json(receipt, result)
    return result
