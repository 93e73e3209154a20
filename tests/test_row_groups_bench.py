"""benchmarks/row_groups.py on a small file: its reading of the footer and page index agrees
with pyarrow, the pages it counts hold the feature, and what it counts for a reader without
the page index is what polars fetched from the counting server. Benchmarks themselves run on
demand (`python benchmarks/row_groups.py`), never in the test command."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import row_groups  # noqa: E402

pytestmark = pytest.mark.slow  # the module's run: about 30 s on 2 shared cores

FEATURES = 2048
LAYOUTS = (64, 1024)


@pytest.fixture(scope="module")
def run(tmp_path_factory, small_corpus) -> tuple[dict, Path]:
    root = tmp_path_factory.mktemp("row_groups")
    layouts = ",".join(map(str, LAYOUTS))
    argv = ["--features", str(FEATURES), "--layouts", layouts, "--corpus", str(small_corpus)]
    argv += ["--work-dir", str(root / "work"), "--out-dir", str(root), "--keep", "--name", "rg"]
    assert row_groups.main(argv) == 0
    return json.loads((root / "rg.json").read_text()), root / "work" / "files"


def test_footer_reading_matches_pyarrow(run):
    _, files = run
    for g in LAYOUTS:
        path = files / f"max_activations-{g}.parquet"
        meta = pq.read_metadata(path)
        assert row_groups.footer(path)[0] == meta.serialized_size + 8
        groups = row_groups.column_chunks(path)
        assert len(groups) == meta.num_row_groups == FEATURES // g
        for i, chunks in enumerate(groups):
            for j, chunk in enumerate(chunks):
                column = meta.row_group(i).column(j)
                start = column.dictionary_page_offset or column.data_page_offset
                assert (chunk["start"], chunk["end"]) == (
                    start,
                    start + column.total_compressed_size,
                )
                assert chunk["name"] == column.path_in_schema
            lo, hi = chunks[0]["min_max"]
            assert (lo, hi) == (i * g, (i + 1) * g - 1)


def test_counted_pages_hold_the_feature(run):
    """The `feature` pages the column index admits span exactly the feature's rows' pages."""
    _, files = run
    path = files / f"max_activations-{LAYOUTS[-1]}.parquet"
    chunk = row_groups.column_chunks(path)[0][0]
    column = pq.read_table(path, columns=["feature"])["feature"].to_numpy()
    for feature in (0, 12, 13, row_groups.OTHER_PAGE, 1023):
        rows = (column == feature).nonzero()[0]
        want = {p for p in range(len(chunk["pages"])) for r in rows if _holds(chunk, p, r)}
        assert set(row_groups.feature_pages(path, chunk, feature)) == want


def _holds(chunk: dict, page: int, row: int) -> bool:
    first, end = row_groups._rows_of(chunk, page)
    return first <= row < end


def test_polars_fetched_the_footer_and_the_row_group_counted(run):
    result, _ = run
    footers = [row["footer_bytes"] for row in result["layouts"]]
    groups = [row["metadata"]["row_group"]["far"]["bytes"] for row in result["layouts"]]
    assert footers == sorted(footers, reverse=True) and groups == sorted(groups)
    for row in result["layouts"]:
        md = row["metadata"]
        for view in row_groups.VIEWS:
            pol = row["polars"][view]
            # Requests in the order they ended: the footer's is the suffix range.
            (tail,) = [int(r[11:]) for r in pol["ranges"] if r.startswith("GET bytes=-")]
            assert tail >= row["footer_bytes"]  # the footer in one request
            # A fresh scan: the footer, then the whole row group that holds the feature.
            group = md["row_group"]["far" if view == "far" else "first"]["bytes"]
            group -= 0 if view == "far" else row["footer_bytes"]
            assert pol["bytes"] == tail + group and pol["requests"] == 2
        # A page-index reader fetches less than the row group, more than the footer.
        pages = md["page_index"]["first"]["bytes"]
        assert row["footer_bytes"] < pages < md["row_group"]["first"]["bytes"]
