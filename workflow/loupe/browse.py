"""The static feature browser: install its page into a staged hub repo, and serve a repo locally.

The page (assets/browser/) reads the repo's parquet files itself with HTTP Range requests, so
any static server that honours Range works, the Hugging Face Hub included. Python's own
http.server ignores Range, hence the small handler here."""

from __future__ import annotations

import email.utils
import json
import os
import re
import shutil
import threading
from collections.abc import Iterable
from functools import partial
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

from .errors import LoupeError
from .layout import BROWSER, PER_LAYER, per_layer_file

ASSETS = Path(__file__).parent / "assets" / "browser"
SUITE_FILE = "suite.json"

_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


def suite_manifest(
    root: Path, prefix: str, layers: Iterable[int], num_latents: int, model: str
) -> dict:
    """browser/suite.json: which parquet file of each kind holds each layer, its size, and
    each kind's columns with their descriptions (`columns`: kind -> column -> description,
    read from the schema of the kind's first file, where the writers put them).

    Only files present under root are listed, so the page can say what a repo lacks; sizes
    spare the page one HEAD request per file."""
    import pyarrow.parquet as pq

    from .examples import column_descriptions

    files: dict[str, dict[str, str]] = {}
    sizes: dict[str, int] = {}
    layers = [int(layer) for layer in layers]
    for layer in layers:
        found = {}
        for kind in PER_LAYER:
            rel = per_layer_file(prefix, kind, layer)
            if (root / rel).is_file():
                found[kind] = rel
                sizes[rel] = (root / rel).stat().st_size
        files[str(layer)] = found
    if not any("examples" in f for f in files.values()):
        raise LoupeError(f"no max_activations parquet under {root / prefix} for layers {layers}")
    columns = {}
    for kind in PER_LAYER:
        if first := next((f[kind] for f in files.values() if kind in f), None):
            columns[kind] = column_descriptions(pq.read_schema(root / first))
    return {
        "prefix": prefix,
        "model": model,
        "layers": layers,
        "num_latents": int(num_latents),
        "files": files,
        "bytes": sizes,
        "columns": columns,
    }


def install_browser(
    root: Path, prefix: str, layers: Iterable[int], num_latents: int, model: str
) -> dict:
    """Copy the page into root/browser/ and write its suite.json; returns the suite."""
    suite = suite_manifest(root, prefix, layers, num_latents, model)
    out = root / BROWSER
    shutil.copytree(ASSETS, out, dirs_exist_ok=True)
    (out / SUITE_FILE).write_text(json.dumps(suite, indent=1) + "\n")
    return suite


SPACE_README = """---
title: {title}
emoji: 🔍
colorFrom: indigo
colorTo: gray
sdk: static
app_file: index.html
pinned: false
models:
- {repo}
---

# {title}

The feature browser of [{repo}](https://huggingface.co/{repo}) (revision `{revision}`): pick a
layer and a feature, search features by a token or by explanation (where the repo has
explanations), or list a layer's features sorted by density, maximum activation or explanation
score. The page reads the model repo's parquet files directly with HTTP range requests,
fetching only what it shows; nothing is copied here.
`?repo=owner/name&revision=main` points it at another loupe repo. Published by loupe.
"""


def space_folder(staged: Path, out: Path, repo: str, revision: str) -> Path:
    """A static Hugging Face Space in `out`: the staged repo's page (without its suite.json,
    which the page reads from the model repo) set to read `repo` at `revision` on the Hub, and a
    README with the Space's front matter. Returns `out`."""
    page = Path(staged) / BROWSER
    if not (page / "index.html").is_file():
        raise LoupeError(f"{page / 'index.html'} not found: stage the repo first")
    out = Path(out)
    shutil.copytree(page, out, ignore=shutil.ignore_patterns(SUITE_FILE), dirs_exist_ok=True)
    index = out / "index.html"
    names = f'<meta name="loupe-repo" content="{repo}">\n  '
    names += f'<meta name="loupe-revision" content="{revision}">\n  '
    html = index.read_text()
    if '<meta name="viewport"' not in html:
        raise LoupeError(f"{page / 'index.html'} is not loupe's page: stage the repo again")
    index.write_text(html.replace('<meta name="viewport"', names + '<meta name="viewport"', 1))
    title = f"{repo.split('/')[-1]} feature browser"
    (out / "README.md").write_text(SPACE_README.format(title=title, repo=repo, revision=revision))
    return out


class RangeRequestHandler(SimpleHTTPRequestHandler):
    """Static files with single-range requests (206 Partial Content) and module-script MIME
    types. Only regular files that resolve inside the served folder (a folder: its
    index.html), never a listing, and only to requests naming the server's own loopback host
    and port: a web page reaching it through DNS rebinding names its own host."""

    extensions_map = {
        **SimpleHTTPRequestHandler.extensions_map,
        # Browsers refuse ES modules served as anything but JavaScript.
        ".js": "text/javascript",
        ".mjs": "text/javascript",
        ".json": "application/json",
        ".parquet": "application/vnd.apache.parquet",
    }
    _remaining: int | None = None  # bytes of the file still to send, or None: send it all

    def __init__(self, *args, quiet: bool = True, **kwargs):
        self.quiet = quiet  # before super().__init__, which handles the request at once
        super().__init__(*args, **kwargs)

    def _host_allowed(self) -> bool:
        port = self.server.server_address[1]
        names = {"127.0.0.1", "localhost", "[::1]"}
        allowed = {f"{n}:{port}" for n in names} | (names if port == 80 else set())
        return (self.headers.get("Host") or "").strip().lower() in allowed

    def _served_file(self) -> Path | None:
        """The regular file inside the served folder the request names, or None."""
        root = Path(self.directory).resolve()
        path = Path(self.translate_path(self.path)).resolve()
        if path.is_dir():
            path = (path / "index.html").resolve()
        return path if path.is_relative_to(root) and path.is_file() else None

    def log_message(self, format, *args):
        if not self.quiet:
            super().log_message(format, *args)

    def _byte_range(self, size: int) -> tuple[int, int] | None | bool:
        """(first, last) byte asked for; None to send the whole file; False if unsatisfiable."""
        header = self.headers.get("Range")
        match = _RANGE.fullmatch(header.strip()) if header else None
        if match is None or not any(match.groups()):
            return None  # absent, several ranges or another unit: a full 200 is allowed
        first, last = match.groups()
        if not first:  # suffix: the last N bytes
            n = int(last)
            return (max(0, size - n), size - 1) if n and size else False
        first = int(first)
        last = min(int(last), size - 1) if last else size - 1
        if first >= size or last < first:
            return False
        return first, last

    def send_head(self):
        self._remaining = None
        if not self._host_allowed():
            self.send_error(HTTPStatus.FORBIDDEN, "Host not allowed")
            return None
        served = self._served_file()
        if served is None:
            self.send_error(HTTPStatus.NOT_FOUND, "File not found")
            return None
        if served.name == "index.html" and not urlsplit(self.path).path.endswith(("/", ".html")):
            return super().send_head()  # its redirect to the folder's URL with a slash
        path = str(served)
        try:
            f = open(path, "rb")  # the caller (do_GET, do_HEAD) copies and closes it
        except OSError:
            self.send_error(HTTPStatus.NOT_FOUND, "File not found")
            return None
        try:
            stat = os.fstat(f.fileno())
            size = stat.st_size
            span = self._byte_range(size)
            if span is False:
                f.close()
                self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return None
            if span is None:
                self.send_response(HTTPStatus.OK)
                length = size
            else:
                first, last = span
                f.seek(first)
                length = last - first + 1
                self.send_response(HTTPStatus.PARTIAL_CONTENT)
                self.send_header("Content-Range", f"bytes {first}-{last}/{size}")
            self._remaining = length
            self.send_header("Content-Type", self.guess_type(path))
            self.send_header("Content-Length", str(length))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Last-Modified", email.utils.formatdate(stat.st_mtime, usegmt=True))
            # Re-staging rewrites files in place: always revalidate.
            self.send_header("Cache-Control", "no-cache")
            self.end_headers()
            return f
        except BaseException:
            f.close()
            raise

    def copyfile(self, source, outputfile):
        remaining = self._remaining
        if remaining is None:
            return super().copyfile(source, outputfile)
        while remaining > 0:
            chunk = source.read(min(remaining, 1 << 16))
            if not chunk:
                break
            outputfile.write(chunk)
            remaining -= len(chunk)


def make_server(
    root: Path, host: str = "127.0.0.1", port: int = 0, quiet: bool = True
) -> tuple[ThreadingHTTPServer, str]:
    """A (not yet running) server of root and the URL of its browser page."""
    root = Path(root).resolve()
    if not (root / BROWSER / "index.html").is_file():
        raise LoupeError(
            f"no {BROWSER}/index.html in {root}: stage the hub repo first (it installs the browser)"
        )
    handler = partial(RangeRequestHandler, directory=str(root), quiet=quiet)
    try:
        server = ThreadingHTTPServer((host, port), handler)
    except OSError as e:
        raise LoupeError(f"cannot listen on {host}:{port}: {e.strerror or e}") from e
    server.daemon_threads = True
    name = f"[{host}]" if ":" in host else host
    return server, f"http://{name}:{server.server_address[1]}/{BROWSER}/index.html"


def serve(
    root: Path, host: str = "127.0.0.1", port: int = 0, quiet: bool = True
) -> tuple[ThreadingHTTPServer, str]:
    """Serve root in a background thread; returns the server (stop it with .shutdown() and
    .server_close()) and the URL of browser/index.html. Port 0 picks a free port."""
    server, url = make_server(root, host, port, quiet)
    threading.Thread(target=server.serve_forever, name="loupe-browse", daemon=True).start()
    return server, url


def browse(repo: Path, port: int) -> None:
    """Serve a staged repo on 127.0.0.1 in the foreground until Ctrl-C, printing the page's
    URL (`python -m loupe browse`, `snakemake browse`)."""
    server, url = make_server(Path(repo), "127.0.0.1", port, quiet=False)
    print(f"loupe browser: {url}  (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
