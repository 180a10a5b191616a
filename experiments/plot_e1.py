# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""Plot of E1 (one DSA layer fwd+bwd vs cuDNN dense MHA) from a bench result file.

  python -m experiments.plot_e1 [--json=experiments/results/e1.json] [--out=...e1.png]
      [--device=H200]

One card per plot: rows whose device contains --device (default: the last row's device). Per
length, the last such row wins (a later run at the same length supersedes); the title names the
dates and commits of the plotted rows.
"""

import json

from absl import app, flags

_JSON = flags.DEFINE_string("json", "experiments/results/e1.json", "bench result file with E1 rows")
_OUT = flags.DEFINE_string("out", "experiments/results/e1.png", "PNG to write")
_DEVICE = flags.DEFINE_string(
  "device", "", "plot the rows of this device (substring; default: the last row's)"
)


def e1_rows(results: list[dict], device: str = "") -> dict[int, dict]:
  """{seq_len: row}: per length the last E1 row of `device` (a substring of the row's; "" =
  any) that has both times (a NaN time marks a length that did not fit)."""
  rows = {}
  for r in results:
    if r.get("suite") != "E1" or "baseline" not in r:
      continue
    if device not in str(r.get("device", "")):
      continue
    t, td = r.get("time_ms"), r["baseline"].get("time_ms")
    if t is None or td is None or t != t:
      continue
    rows[int(r["shape"]["seq_len"])] = r
  if not rows:
    raise ValueError(f"no E1 rows with both times in the result file (device filter {device!r})")
  return dict(sorted(rows.items()))


def e1_points(results: list[dict], device: str = "") -> dict[int, tuple[float, float]]:
  """{seq_len: (ours_ms, dense_ms)} from `e1_rows`."""
  return {
    x: (float(r["time_ms"]), float(r["baseline"]["time_ms"]))
    for x, r in e1_rows(results, device).items()
  }


def main(argv):
  del argv
  with open(_JSON.value) as f:
    data = json.load(f)
  all_e1 = [r for r in data["results"] if r.get("suite") == "E1"]
  device = _DEVICE.value or (all_e1[-1].get("device", "") if all_e1 else "")
  pts = e1_points(data["results"], device)
  rows = list(e1_rows(data["results"], device).values())  # the plotted rows
  import matplotlib  # noqa: PLC0415

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  ls = list(pts)
  ours = [pts[x][0] for x in ls]
  dense = [pts[x][1] for x in ls]
  fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
  a.loglog(ls, ours, "o-", label="DSA layer (indexer + top-k + sparse MLA + indexer KL)")
  a.loglog(ls, dense, "s-", label="cuDNN causal MHA (h=128, d_qk=192)")
  a.set_xlabel("sequence length L")
  a.set_ylabel("fwd+bwd time (ms)")
  a.set_xticks(ls, [f"{x // 1024}K" for x in ls])
  a.set_xticks([], minor=True)  # only the measured lengths are labelled
  a.legend(fontsize=7)
  b.semilogx(ls, [d / o for o, d in zip(ours, dense)], "o-")
  b.axhline(1.0, color="gray", lw=0.8)
  b.set_xticks(ls, [f"{x // 1024}K" for x in ls])
  b.set_xticks([], minor=True)
  b.set_xlabel("sequence length L")
  b.set_ylabel("speed-up vs dense (dense / DSA)")
  runs = sorted({f"{r.get('date', '')} {r.get('commit', '')}".strip() for r in rows})
  fig.suptitle(
    f"E1 one DSA layer vs dense, {rows[-1].get('device')}, {', '.join(runs)}", fontsize=9
  )
  fig.tight_layout()
  fig.savefig(_OUT.value, dpi=120)
  for x in ls:
    print(f"L={x}: DSA {pts[x][0]:.1f} ms, dense {pts[x][1]:.1f} ms, {pts[x][1] / pts[x][0]:.2f}x")


if __name__ == "__main__":
  app.run(main)
