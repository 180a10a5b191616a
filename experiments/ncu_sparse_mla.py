# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""Hardware counters of the sparse MLA forward beside FlashMLA's, one launch each (GPU only).

  bash experiments/scripts/ncu_sparse_mla.sh S2 experiments/results/ncu_sparse_mla.json

The script runs `run` under Nsight Compute (`ncu`, where the machine's runtime gives it the
counters), then `report` on ncu's CSV. `run` compiles and warms both kernels at the suite's shape
(bench_sparse_mla's S1 / S2), then brackets one call of each with the CUDA profiler API so ncu
measures only those two launches. `report` keeps, per kernel: time, DRAM bytes read, L2 read
sectors and hit rate, and the bytes L2 sent to the SMs (`METRICS`; `MINIMAL` where ncu rejects
one of those names); the row's
ratio is FlashMLA's time over ours, from the same process, as in `bench --suite=S1,S2`.

What it answers: whether a token's two head-block CTAs find each other's rows in L2 (DRAM
bytes read near one copy of the selected rows, 2.36 MB a token at k 2048, or near two), and how
our L2 traffic compares with FlashMLA's at the same shape. A second ncu pass (optional: the row
is written without it) reads ncu's SpeedOfLight and WarpStateStats sections (`SECTIONS`): DRAM
and SM throughput as a share of peak, and where warps stall. DRAM near its peak says the kernel
is bound by HBM; DRAM well below it with warps stalled on barriers says it waits on the latency
of filling a slot. The pass also reads every stall reason ncu counts (`STALLS`).
"""

import argparse
import csv
import io
import json
import os

METRICS = {
  "gpu__time_duration.sum": "time_ns",
  "dram__bytes_read.sum": "dram_read_bytes",
  "lts__t_sectors_op_read.sum": "l2_read_sectors",
  "lts__t_sector_op_read_hit_rate.pct": "l2_read_hit_pct",
  "l1tex__m_xbar2l1tex_read_bytes.sum": "l2_to_sm_bytes",
}
# What the script falls back to where ncu rejects a name above.
MINIMAL = ("gpu__time_duration.sum", "dram__bytes_read.sum")
OURS, FLASHMLA = "sparse_mla_fwd", "flashmla"
SECTIONS = ("SpeedOfLight", "WarpStateStats")
# With SECTIONS: each stall reason's warps per issued instruction (every name ncu has).
STALLS = (r"regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio",)


def kernel_role(name: str) -> str | None:
  """Which of the two launches an ncu kernel name is (None: neither)."""
  low = name.lower()
  if "sparse_mla_fwd" in low:
    return OURS
  if "sparse" in low or "flash" in low or "mla" in low:
    return FLASHMLA
  return None


def _records(text: str):
  """The CSV records of ncu --csv output; lines before the header are ncu's own log."""
  lines = text.splitlines()
  start = next((i for i, l in enumerate(lines) if l.startswith('"ID"')), None)
  if start is None:
    raise ValueError('no ncu CSV header (a line starting with "ID") in the input')
  return csv.DictReader(io.StringIO("\n".join(lines[start:])))


def _number(value: str):
  try:
    return float(value.replace(",", ""))
  except ValueError:
    return value


def parse_ncu_csv(text: str) -> dict:
  """ncu --csv --metrics ... output -> {role: {short metric name: value}}. ncu prints one row
  per (launch, metric) with columns "Kernel Name", "Metric Name", "Metric Value" (values may
  carry thousands separators)."""
  out = {}
  for rec in _records(text):
    role = kernel_role(rec["Kernel Name"])
    short = METRICS.get(rec["Metric Name"])
    if role is None or short is None:
      continue
    out.setdefault(role, {})[short] = _number(rec["Metric Value"])
  return out


def parse_ncu_sections(text: str) -> dict:
  """ncu --csv --section ... output -> {role: {"Section: Metric Name [unit]": value}}, every
  metric of the two launches as ncu names it."""
  out = {}
  for rec in _records(text):
    role = kernel_role(rec["Kernel Name"])
    if role is None or not rec["Metric Name"]:  # a section's empty header row
      continue
    name = f"{rec['Section Name']}: {rec['Metric Name']} [{rec['Metric Unit']}]"
    out.setdefault(role, {})[name] = _number(rec["Metric Value"])
  return out


def report(csv_path: str, out: str, suite: str, command: str, sections_csv: str | None = None):
  from experiments import bench_common, bench_sparse_mla  # noqa: PLC0415

  with open(csv_path) as f:
    got = parse_ncu_csv(f.read())
  if OURS not in got:
    raise SystemExit(f"no {OURS} launch in {csv_path}: found {sorted(got)}")
  shp = bench_sparse_mla._FULL[suite]
  ours = got[OURS]
  rows_bytes = shp["s_q"] * shp["topk"] * shp["d_qk"] * 2  # one copy of the selected rows
  extra = dict(
    counters=got,
    selected_rows_bytes=rows_bytes,
    dram_read_over_selected_rows=ours.get("dram_read_bytes", float("nan")) / rows_bytes,
    note="ncu --clock-control none, one launch each (the counters' replays); time from ncu",
  )
  if sections_csv and os.path.exists(sections_csv):
    with open(sections_csv) as f:
      extra["sections"] = parse_ncu_sections(f.read())
  t = ours["time_ns"] * 1e-6
  if FLASHMLA in got:
    t_fm = got[FLASHMLA]["time_ns"] * 1e-6
    extra["baseline"] = {"name": "flashmla_sparse_prefill", "time_ms": t_fm}  # row() sets ratio
  row = bench_common.row(suite, shp, t, bench_sparse_mla._fwd_flops(shp), **extra)
  row["command"] = command
  bench_common.write_results(out, [row])
  print(json.dumps(row, indent=1))


def run(suite: str):
  import functools  # noqa: PLC0415

  import jax  # noqa: PLC0415
  import torch  # noqa: PLC0415

  from experiments import bench_sparse_mla as b  # noqa: PLC0415
  from pallas_kernels.sparse_mla import ops  # noqa: PLC0415

  shp = b._FULL[suite]
  q, kv, idx = b._inputs(shp)
  ours = jax.jit(functools.partial(ops.sparse_mla, scale=b.SCALE, d_v=shp["d_v"], impl="pallas"))
  fm, _ = b._flashmla()
  tq, tkv, tidx = (torch.from_dlpack(x) for x in (q[0], kv[0][:, None, :], idx[0][:, None, :]))

  def flash():
    if fm is not None:
      fm.flash_mla_sparse_fwd(tq, tkv, tidx, b.SCALE, shp["d_v"], use_legacy=True)

  for _ in range(2):  # compile and warm both outside the profiled range
    jax.block_until_ready(ours(q, kv, idx))
    flash()
  torch.cuda.synchronize()
  torch.cuda.profiler.start()
  jax.block_until_ready(ours(q, kv, idx))
  flash()
  torch.cuda.synchronize()
  torch.cuda.profiler.stop()


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("mode", choices=("run", "report"))
  p.add_argument("--suite", default="S2", choices=("S1", "S2"))
  p.add_argument("--csv", help="report: ncu's CSV output")
  p.add_argument("--sections_csv", help="report: ncu's CSV of SECTIONS (optional)")
  p.add_argument("--out", default="experiments/results/ncu_sparse_mla.json")
  p.add_argument("--command", default="bash experiments/scripts/ncu_sparse_mla.sh")
  a = p.parse_args()
  if a.mode == "run":
    run(a.suite)
  else:
    report(a.csv, a.out, a.suite, a.command, a.sections_csv)


if __name__ == "__main__":
  main()
