# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""Registers, spills and stack of the sparse MLA Mosaic GPU kernels, from ptxas, without a GPU.

  python -m experiments.ptxas_report --kernels=fwd,bwd,probs --plugin_dir=DIR [--out=JSON]

Each kernel is cross-lowered for CUDA with `jax.export` on the CPU backend, which records the
serialized Mosaic GPU module of every kernel it lowers (`mosaic.gpu.core.KNOWN_KERNELS`). A
subprocess hands each module to the CUDA plugin's own `MosaicGpuCompile` (the pass pipeline and
LLVM NVPTX of a GPU run) against a stand-in libcuda that claims one compute capability 9.0
device, so the plugin dumps the kernel's PTX before it fails to load the cubin. `ptxas
-arch=sm_90a -v` on that PTX gives the numbers. The kernels: fwd = ops.sparse_mla(impl="pallas");
bwd = kernel_mosaic_gpu_bwd.sparse_mla_bwd and probs = kernel_mosaic_gpu_probs.sparse_mla_probs
on the folded layout (ops.py's; the full backward also lowers a Triton kernel, which needs a
GPU). The token count does not change a kernel's code, only its grid. ptxas 13.0 is not
deterministic on the backward: runs on the same PTX differ by a few spill bytes.

Needs a C compiler (`cc`, or CC) for the stand-in libcuda, `ptxas` (PTXAS, or on PATH) and, in
--plugin_dir, the two CUDA wheels of this jax version unpacked (not installed: in this venv the
plugin would become a jax backend). One-time setup, with this venv's bin first on PATH (the
plugin wheel is built per CPython version; another `pip` may find none):

  pip download --no-deps jax-cuda12-pjrt==0.11.2 jax-cuda12-plugin==0.11.2 -d DIR && (cd DIR && for w in *.whl; do python -m zipfile -e $w .; done)
"""

import argparse
import glob
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp

from experiments import bench_common as bc

KERNELS = ("fwd", "bwd", "probs")
_PLUGIN_SO = "jax_plugins/xla_cuda12/xla_cuda_plugin.so"
_RUNTIME_SO = "jax_cuda12_plugin/libmosaic_gpu_runtime.so"

# The driver calls MosaicGpuCompile makes before its PTX dump; loading the cubin then fails.
_FAKE_LIBCUDA_C = r"""
#include <stdio.h>
typedef int CUresult;
typedef int CUdevice;
CUresult cuInit(unsigned flags) { return 0; }
CUresult cuDriverGetVersion(int* v) { *v = 12080; return 0; }
CUresult cuDeviceGetCount(int* n) { *n = 1; return 0; }
CUresult cuDeviceGet(CUdevice* d, int ordinal) { *d = 0; return 0; }
CUresult cuCtxGetDevice(CUdevice* d) { *d = 0; return 0; }
CUresult cuCtxGetCurrent(void** ctx) { static int c; *ctx = &c; return 0; }
CUresult cuDeviceGetAttribute(int* v, int attr, CUdevice d) {
  *v = attr == 75 ? 9 : 0; /* 75: compute capability major, 76: minor */
  return 0;
}
CUresult cuGetErrorString(CUresult e, const char** s) { *s = "stand-in libcuda: no GPU"; return 0; }
CUresult cuGetErrorName(CUresult e, const char** s) { *s = "CUDA_ERROR_NOT_SUPPORTED"; return 0; }
CUresult cuModuleLoadData(void** m, const void* image) {
  fprintf(stderr, "stand-in libcuda: no GPU to load the cubin\n");
  return 801;
}
CUresult cuModuleLoadDataEx(void** m, const void* image, unsigned n, void* o, void** v) {
  return cuModuleLoadData(m, image);
}
"""

# Runs in the subprocess, whose LD_LIBRARY_PATH puts the stand-in libcuda first (the plugin's
# loader reads it at process start); argv: the plugin .so, the module.
_COMPILE_PY = """
import ctypes, sys
compile_ = ctypes.CDLL(sys.argv[1]).MosaicGpuCompile
compile_.argtypes = [ctypes.c_char_p, ctypes.c_int]
compile_.restype = ctypes.c_void_p
with open(sys.argv[2], "rb") as f:
  module = f.read()
compile_(module, len(module))
"""


def parse_ptxas(text: str) -> list[dict]:
  """Per entry function in `ptxas -v` output: {"function", "registers", "spill_stores",
  "spill_loads", "stack_frame"} (bytes)."""
  entries, props = [], {}
  current = props_of = None
  for line in text.splitlines():
    if m := re.search(r"Compiling entry function '([^']+)'", line):
      current = {"function": m.group(1)}
      entries.append(current)
    elif m := re.search(r"Function properties for (\S+)", line):
      props_of = m.group(1)
    elif m := re.search(
      r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line
    ):
      frame, stores, loads = map(int, m.groups())
      props[props_of] = dict(stack_frame=frame, spill_stores=stores, spill_loads=loads)
    elif (m := re.search(r"Used (\d+) registers", line)) and current is not None:
      current["registers"] = int(m.group(1))
  for e in entries:
    e.update(props.get(e["function"], {}))
  return entries


def export_modules(kernel: str, a: argparse.Namespace) -> list[bytes]:
  """The serialized Mosaic GPU modules that lowering `kernel` for CUDA produces."""
  from jax.experimental.mosaic.gpu import core as mgpu_core  # noqa: PLC0415

  from pallas_kernels.sparse_mla import (  # noqa: PLC0415
    kernel_mosaic_gpu,
    kernel_mosaic_gpu_bwd,
    kernel_mosaic_gpu_probs,
    ops,
  )

  sds, bf16, f32, i32 = jax.ShapeDtypeStruct, jnp.bfloat16, jnp.float32, jnp.int32
  scale = a.d_qk**-0.5
  n, hp = a.tokens, -(-a.heads // kernel_mosaic_gpu.HEAD_BLOCK) * kernel_mosaic_gpu.HEAD_BLOCK
  if kernel == "fwd":
    fn = lambda q, kv, idx: ops.sparse_mla(q, kv, idx, scale=scale, d_v=a.d_v, impl="pallas")
    args = (
      sds((1, n, a.heads, a.d_qk), bf16),
      sds((1, a.s_kv, a.d_qk), bf16),
      sds((1, n, a.topk), i32),
    )
  elif kernel == "bwd":
    kp_dim, d_out, kp = kernel_mosaic_gpu.padded_dims(a.d_qk, a.d_v, a.topk)
    fn = lambda *xs: kernel_mosaic_gpu_bwd.sparse_mla_bwd(*xs, scale=scale)
    args = (
      sds((n, hp, kp_dim), bf16),
      sds((a.s_kv, kp_dim), bf16),
      sds((n, kp), i32),
      sds((n, hp, d_out), bf16),
      sds((n, hp), f32),
      sds((n, hp), f32),
    )
  else:
    kp_dim, _, kp = kernel_mosaic_gpu.padded_dims(a.d_qk, 0, a.topk)
    qk_scale = scale * math.log2(math.e)  # the kernel's base-2 scale, as ops._mosaic_probs
    fn = lambda *xs: kernel_mosaic_gpu_probs.sparse_mla_probs(*xs, qk_scale=qk_scale)
    args = (
      sds((n, hp, kp_dim), bf16),
      sds((a.s_kv, kp_dim), bf16),
      sds((n, kp), i32),
      sds((n, hp), f32),
    )
  before = set(mgpu_core.KNOWN_KERNELS)
  jax.export.export(jax.jit(fn), platforms=["cuda"])(*args)
  return [asm for kid, asm in mgpu_core.KNOWN_KERNELS.items() if kid not in before]


def build_fake_libcuda(cc: str, out_dir: str) -> str:
  """Compiles the stand-in libcuda.so.1 into out_dir with the C compiler cc; returns out_dir."""
  src = os.path.join(out_dir, "fake_libcuda.c")
  with open(src, "w") as f:
    f.write(_FAKE_LIBCUDA_C)
  so = os.path.join(out_dir, "libcuda.so.1")
  r = subprocess.run([cc, "-shared", "-fPIC", "-o", so, src], capture_output=True, text=True)
  if r.returncode:
    raise SystemExit(f"ptxas_report: {cc} failed on the stand-in libcuda: {r.stderr.strip()}")
  return out_dir


def compile_to_ptx(module: str, plugin_dir: str, libcuda_dir: str, dump: str) -> list[str]:
  """Runs MosaicGpuCompile on the serialized module in a subprocess, dumping into `dump`;
  returns the PTX files (the log is dump/compile.log)."""
  env = dict(
    os.environ,
    MOSAIC_GPU_DUMP_TO=dump,
    MOSAIC_GPU_DUMP_PTX="1",
    MOSAIC_GPU_RUNTIME_LIB_PATH=os.path.join(plugin_dir, _RUNTIME_SO),
    LD_LIBRARY_PATH=os.pathsep.join(filter(None, [libcuda_dir, os.environ.get("LD_LIBRARY_PATH")])),
  )
  cmd = [sys.executable, "-c", _COMPILE_PY, os.path.join(plugin_dir, _PLUGIN_SO), module]
  r = subprocess.run(cmd, env=env, capture_output=True, text=True)
  with open(os.path.join(dump, "compile.log"), "w") as f:
    f.write(f"exit status {r.returncode}\n{r.stdout}{r.stderr}")
  for path in glob.glob(os.path.join(dump, "*.mlir-passes.log")):  # ~50 MB a kernel, unasked
    os.remove(path)
  return sorted(glob.glob(os.path.join(dump, "*.ptx")))


def run_ptxas(ptxas: str, ptx: str) -> list[dict]:
  """`ptxas -arch=sm_90a -v` on one PTX file, parsed (parse_ptxas)."""
  cmd = [ptxas, "-arch=sm_90a", "-v", ptx, "-o", ptx[: -len(".ptx")] + ".cubin"]
  r = subprocess.run(cmd, capture_output=True, text=True)
  if r.returncode:
    last = (r.stderr.strip() or r.stdout.strip()).splitlines()[-1:]
    raise SystemExit(f"ptxas_report: ptxas failed on {ptx}: {' '.join(last)}")
  return parse_ptxas(r.stdout + r.stderr)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--kernels", default=",".join(KERNELS), help=f"comma-separated, of {KERNELS}")
  ap.add_argument("--plugin_dir", required=True, help="the unpacked CUDA wheels (docstring)")
  ap.add_argument("--out", default="", help="append the rows to this results JSON")
  ap.add_argument("--dump_dir", default="", help="keep modules, PTX and logs here (default: temp)")
  ap.add_argument("--tokens", type=int, default=64)
  ap.add_argument("--s_kv", type=int, default=4096)
  ap.add_argument("--heads", type=int, default=128)
  ap.add_argument("--d_qk", type=int, default=576)
  ap.add_argument("--d_v", type=int, default=512)
  ap.add_argument("--topk", type=int, default=2048)
  a = ap.parse_args()
  kernels = [k for k in a.kernels.split(",") if k]
  if unknown := sorted(set(kernels) - set(KERNELS)):
    raise SystemExit(f"ptxas_report: unknown kernels {unknown}; expected some of {KERNELS}")
  plugin_dir = os.path.abspath(a.plugin_dir)
  for rel in (_PLUGIN_SO, _RUNTIME_SO):
    if not os.path.isfile(os.path.join(plugin_dir, rel)):
      raise SystemExit(
        f"ptxas_report: no {rel} in {plugin_dir} (unpack the CUDA wheels there: see the docstring)"
      )
  ptxas = shutil.which(os.environ.get("PTXAS", "ptxas"))
  if ptxas is None:
    raise SystemExit("ptxas_report: no ptxas (set PTXAS or put it on PATH)")
  cc = shutil.which(os.environ.get("CC", "cc"))
  if cc is None:
    raise SystemExit("ptxas_report: no C compiler (cc, or CC) to build the stand-in libcuda")

  work = os.path.abspath(a.dump_dir) if a.dump_dir else tempfile.mkdtemp(prefix="ptxas_report_")
  os.makedirs(work, exist_ok=True)
  libcuda_dir = build_fake_libcuda(cc, work)
  shape = dict(tokens=a.tokens, s_kv=a.s_kv, h=a.heads, d_qk=a.d_qk, d_v=a.d_v, topk=a.topk)
  rows = []
  for kernel in kernels:
    modules = export_modules(kernel, a)
    if not modules:
      raise SystemExit(f"ptxas_report: lowering {kernel} for CUDA gave no Mosaic GPU kernel")
    for i, asm in enumerate(modules):
      dump = os.path.join(work, f"{kernel}_{i}")
      os.makedirs(dump, exist_ok=True)
      module = os.path.join(dump, "module.mlirbc")
      with open(module, "wb") as f:
        f.write(asm)
      ptx_files = compile_to_ptx(module, plugin_dir, libcuda_dir, dump)
      if not ptx_files:
        log = os.path.join(dump, "compile.log")
        raise SystemExit(f"ptxas_report: compiling {kernel} produced no PTX; see {log}")
      for ptx in ptx_files:
        for r in run_ptxas(ptxas, ptx):
          print(
            f"{kernel:5s} {r['function']}: {r.get('registers')} registers, "
            f"{r.get('spill_stores')} bytes spill stores, {r.get('spill_loads')} bytes spill "
            f"loads, {r.get('stack_frame')} bytes stack frame"
          )
          rows.append(
            bc.row(
              "PTXAS",
              shape,
              None,
              None,
              device="sm_90a (ptxas -v, offline)",
              command=bc.command("experiments.ptxas_report"),
              kernel=kernel,
              **r,
            )
          )
  if a.out:
    bc.write_results(a.out, rows)
    print(f"wrote {a.out}")
  if not a.dump_dir:
    shutil.rmtree(work)


if __name__ == "__main__":
  main()
