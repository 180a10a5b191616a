# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""plot_e1 reads E1 rows: one device's, later rows win per length, failed lengths are skipped,
none is an error."""

import json
import pathlib

import pytest

from experiments import plot_e1

RESULTS = pathlib.Path(__file__).parents[2] / "experiments" / "results" / "e1.json"


def _row(l, t, td, suite="E1"):
  return {"suite": suite, "shape": {"seq_len": l}, "time_ms": t, "baseline": {"time_ms": td}}


def test_points_later_rows_win_and_failures_skipped():
  rows = [
    _row(16384, 300.0, 130.0),
    _row(8192, 150.0, 31.0),
    _row(16384, 290.0, 129.0),  # a later run at the same length
    {"suite": "E1", "shape": {"seq_len": 32768}, "time_ms": float("nan"), "error": "OOM"},
    _row(4096, 1.0, 2.0, suite="I1"),
  ]
  assert plot_e1.e1_points(rows) == {8192: (150.0, 31.0), 16384: (290.0, 129.0)}


def test_points_of_one_device():
  h100 = dict(_row(16384, 300.0, 130.0), device="NVIDIA H100 80GB HBM3")
  h200 = dict(_row(16384, 250.0, 120.0), device="NVIDIA H200")
  rows = [h100, h200, dict(_row(8192, 99.0, 30.0), device="NVIDIA H200")]
  assert plot_e1.e1_points(rows, "H100") == {16384: (300.0, 130.0)}
  assert plot_e1.e1_points(rows, "H200") == {8192: (99.0, 30.0), 16384: (250.0, 120.0)}
  with pytest.raises(ValueError, match="device filter 'B200'"):
    plot_e1.e1_points(rows, "B200")


def test_rows_are_the_plotted_ones():
  # the title's dates and commits come from these rows: a superseded run must not be among them
  old = dict(_row(16384, 300.0, 130.0), date="2026-11-29", commit="aaa")
  new = dict(_row(16384, 250.0, 120.0), date="2026-12-06", commit="bbb")
  rows = plot_e1.e1_rows([old, new, dict(_row(8192, 99.0, 30.0), commit="ccc")])
  assert [r.get("commit") for r in rows.values()] == ["ccc", "bbb"]


def test_no_rows_is_an_error():
  with pytest.raises(ValueError, match="no E1 rows"):
    plot_e1.e1_points([_row(4096, 1.0, 2.0, suite="T1")])


def test_committed_results_parse():
  rows = json.loads(RESULTS.read_text())["results"]
  pts = plot_e1.e1_points(rows, "H200")
  assert 131072 in pts and all(t > 0 and td > 0 for t, td in pts.values())
  assert 65536 in plot_e1.e1_points(rows, "H100")
