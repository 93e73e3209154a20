"""loupe.number_format: values in, the exact strings people read out."""

from __future__ import annotations

import math

import pytest

from loupe.number_format import fixed, measured, size, tokens


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0.1234567, "0.1235"),
        ("0.1234567", "0.1235"),  # a metrics.csv cell
        (8.0, "8"),
        ("8.0", "8"),
        (262144, "262144"),
        (0.5, "0.5"),
        (0.0, "0"),
        (1.5e-05, "1.5e-05"),
        (-0.0421, "-0.0421"),
        (-3.0, "-3"),
        (12345.678, "1.235e+04"),
        (None, "n/a"),
        ("", "n/a"),
        (math.nan, "nan"),  # a NaN metric is not a missing one
        ("nan", "nan"),
        (math.inf, "inf"),
        ("topk", "topk"),  # text that is no number, as it is
    ],
)
def test_measured(value, text):
    assert measured(value) == text


def test_measured_missing_marker():
    assert measured(None, missing="-") == "-"
    assert measured("", missing="-") == "-"


@pytest.mark.parametrize(
    ("value", "digits", "text"),
    [
        (0.5, 3, "0.500"),
        (0.7, 2, "0.70"),
        (0.12345, 4, "0.1235"),
        ("0.25", 3, "0.250"),
        (-0.04215, 4, "-0.0421"),
        (None, 4, "n/a"),
        ("", 3, "n/a"),
        (math.nan, 3, "nan"),
    ],
)
def test_fixed(value, digits, text):
    assert fixed(value, digits) == text


def test_fixed_missing_marker_and_no_number():
    assert fixed(None, 3, "-") == "-"
    with pytest.raises(ValueError):
        fixed("topk", 3)


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0"),
        (999, "999"),
        (262_144, "262,144"),
        (1_048_576, "1,048,576"),  # not a round count: never rounded
        (1_000_000, "1M"),
        (1_500_000, "1.5M"),
        (10_000_000, "10M"),
        (1_000_000_000, "1B"),
        (1_000_001_536, "1,000,001,536"),
        (2_500_000_000, "2.5B"),
        (100_000_000, "100M"),
    ],
)
def test_tokens(n, text):
    assert tokens(n) == text


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (999, "999 B"),
        (1000, "1.0 KB"),
        (1536, "1.5 KB"),
        (604_000_000, "604.0 MB"),
        (2_147_483_648, "2.1 GB"),
        (2_100_000_000_000, "2.1 TB"),
        (5 * 10**15, "5000.0 TB"),  # no unit above TB
    ],
)
def test_size(n, text):
    assert size(n) == text
