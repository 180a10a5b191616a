# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""experiments.ncu_sparse_mla's reading of Nsight Compute's CSV (the counters run needs a GPU)."""

import pytest

from experiments import ncu_sparse_mla as ncu

_HEADER = (
  '"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size",'
  '"Grid Size","Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"'
)


def _line(i, kernel, metric, value, section="Command line profiler metrics", unit="unit"):
  return (
    f'"{i}","7","python3","h","{kernel}","1","13","(384, 1, 1)","(2, 8192, 1)","0","9.0",'
    f'"{section}","{metric}","{unit}","{value}"'
  )


def test_parse_keeps_both_launches_and_the_named_metrics():
  ours, theirs = "sparse_mla_fwd_kernel_mosaic_gpu_kernel", "void sm90::sparse_attn_fwd_kernel<>"
  text = "\n".join(
    [
      "some output of the program",
      "==PROF== Disconnected from process 7",
      _HEADER,
      _line(0, ours, "dram__bytes_read.sum", "21,474,836,480"),
      _line(0, ours, "gpu__time_duration.sum", "11,954,000"),
      _line(0, ours, "lts__t_sector_op_read_hit_rate.pct", "48.5"),
      _line(0, ours, "some__other_metric.sum", "3"),
      _line(1, theirs, "gpu__time_duration.sum", "8,900,000"),
      _line(2, "nvjet_hsh_gemm", "gpu__time_duration.sum", "5"),
    ]
  )
  got = ncu.parse_ncu_csv(text)
  assert got == {
    ncu.OURS: {"dram_read_bytes": 21474836480.0, "time_ns": 11954000.0, "l2_read_hit_pct": 48.5},
    ncu.FLASHMLA: {"time_ns": 8900000.0},
  }


def test_parse_without_a_header_says_so():
  with pytest.raises(ValueError, match="no ncu CSV header"):
    ncu.parse_ncu_csv("==PROF== ERR_NVGPUCTRPERM\n")


def test_sections_keep_every_metric_of_both_launches_with_section_and_unit():
  ours, theirs = "sparse_mla_fwd_kernel_mosaic_gpu_kernel", "void sm90::sparse_attn_fwd_kernel<>"
  text = "\n".join(
    [
      _HEADER,
      _line(0, ours, "", "", "SpeedOfLight", ""),  # a section's empty header row: dropped
      _line(0, ours, "DRAM Throughput", "61.2", "GPU Speed Of Light Throughput", "%"),
      _line(
        0, ours, "Warp Cycles Per Issued Instruction", "1,204.5", "Warp State Statistics", "cycle"
      ),
      _line(1, theirs, "Duration", "8.9", "GPU Speed Of Light Throughput", "ms"),
      _line(1, theirs, "SM Frequency", "n/a", "GPU Speed Of Light Throughput", "Ghz"),
      _line(2, "nvjet_hsh_gemm", "Duration", "5", "GPU Speed Of Light Throughput", "us"),
    ]
  )
  got = ncu.parse_ncu_sections(text)
  assert got == {
    ncu.OURS: {
      "GPU Speed Of Light Throughput: DRAM Throughput [%]": 61.2,
      "Warp State Statistics: Warp Cycles Per Issued Instruction [cycle]": 1204.5,
    },
    ncu.FLASHMLA: {
      "GPU Speed Of Light Throughput: Duration [ms]": 8.9,
      "GPU Speed Of Light Throughput: SM Frequency [Ghz]": "n/a",
    },
  }
