# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""profile_sparse_mla_kernels.region_stats on a synthetic Mosaic GPU profiler trace; the kernels
with kernel_mosaic_gpu.PROFILE set lower for CUDA up to the trace's host callback."""

import jax
import jax.numpy as jnp
import pytest

from experiments import profile_sparse_mla_kernels as prof


def _ev(name, ph, ts, cta, wg, wgs=3):
  return {"name": name, "ph": ph, "ts": ts, "pid": 1, "tid": 1 + wg + wgs * cta}


def test_region_stats_means_per_cta():
  ev = []
  for cta, base in ((0, 0.0), (1, 100.0)):
    ev += [_ev("qk", "B", base + 0, cta, 0), _ev("qk", "E", base + 4, cta, 0)]
    ev += [_ev("qk", "B", base + 5, cta, 0), _ev("qk", "E", base + 7, cta, 0)]
    ev += [_ev("pv", "B", base + 7, cta, 0), _ev("pv", "E", base + 10, cta, 0)]
    ev += [_ev("issue", "B", base + 1, cta, 2), _ev("issue", "E", base + 2 + cta, cta, 2)]
  s = prof.region_stats({"traceEvents": ev}, warpgroups=3)
  assert s["ctas"] == 2 and s["cta_kcycles"] == pytest.approx(10.0)
  assert s["warpgroups"][0]["qk"] == {"kcycles": 6.0, "calls": 2.0, "share": pytest.approx(0.6)}
  assert s["warpgroups"][0]["pv"]["kcycles"] == pytest.approx(3.0)
  assert s["warpgroups"][2]["issue"]["kcycles"] == pytest.approx(1.5)  # (1 + 2) / 2 CTAs
  assert set(s["warpgroups"]) == {0, 2}


def test_region_stats_nested_and_empty():
  ev = [
    _ev("a", "B", 0, 0, 1),
    _ev("a", "B", 1, 0, 1),
    _ev("a", "E", 2, 0, 1),
    _ev("a", "E", 5, 0, 1),
  ]
  s = prof.region_stats({"traceEvents": ev}, warpgroups=3)
  assert s["warpgroups"][1]["a"]["kcycles"] == pytest.approx(6.0)  # inner 1 + outer 5
  with pytest.raises(ValueError, match="no events"):
    prof.region_stats({"traceEvents": []}, warpgroups=3)


@pytest.mark.parametrize("kernel", ["fwd", "bwd"])
@pytest.mark.parametrize("kp_dim", [512, 576])
def test_profiled_kernels_lower_for_cuda(kernel, kp_dim, tmp_path, monkeypatch):
  # PROFILE adds the profiler's buffer (an extra kernel output) and the trace's dump, a host
  # callback that cannot be cross-lowered from a CPU backend. The kernel's Mosaic GPU lowering
  # (named regions, the profiler's SMEM) runs before it, so reaching that error means the
  # kernel lowered with the profiler.
  from pallas_kernels import _testing
  from pallas_kernels.sparse_mla import kernel_mosaic_gpu, kernel_mosaic_gpu_bwd

  # the script's buffer at k 2048 (32 chunks): it fits beside Kp 512's tiles, not Kp 576's
  monkeypatch.setattr(kernel_mosaic_gpu, "PROFILE", (prof.profile_ranges(32), str(tmp_path)))
  sds = jax.ShapeDtypeStruct
  n, hp, k = 4, 128, 128
  q, kv = sds((n, hp, kp_dim), jnp.bfloat16), sds((64, kp_dim), jnp.bfloat16)
  idx = sds((n, k), jnp.int32)
  if kernel == "fwd":
    f = lambda q, kv, idx: kernel_mosaic_gpu.sparse_mla_fwd(
      q, kv, idx, scale=0.1, d_out=512, config=kernel_mosaic_gpu.GpuConfig()
    )
    args = (q, kv, idx)
  else:
    f = lambda q, kv, idx, do, lse, delta: kernel_mosaic_gpu_bwd.sparse_mla_bwd(
      q, kv, idx, do, lse, delta, scale=0.1
    )
    rows = sds((n, hp), jnp.float32)
    args = (q, kv, idx, sds((n, hp, 512), jnp.bfloat16), rows, rows)
  expect = "backend cpu is different" if kp_dim == 512 else "exceeds available shared memory"
  with pytest.raises(ValueError, match=expect):
    _testing.export_cuda(f, *args)
