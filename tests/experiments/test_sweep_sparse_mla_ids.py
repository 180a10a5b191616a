# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""The slot-id patterns of experiments/sweep_sparse_mla_ids.py are what its docstring says."""

import jax
import numpy as np

from experiments import sweep_sparse_mla_ids as sweep

T, S, K = 40, 48, 16


def _ids(case):
  ids = np.asarray(sweep.slot_ids(case, T, S, K, jax.random.key(3)))
  assert ids.shape == (1, T, K) and ids.dtype == np.int32
  return ids[0]


def test_causal_ids_stay_in_the_prefix_and_invalidate_the_rest():
  ids = _ids("causal")
  t = np.arange(T)[:, None]
  assert ((ids == -1) | ((ids >= 0) & (ids <= t))).all()
  # query t < k: rows 0..t in slots 0..t, the other k - t - 1 slots invalid
  for q in range(K):
    np.testing.assert_array_equal(ids[q, : q + 1], np.arange(q + 1))
    assert (ids[q, q + 1 :] == -1).all()
  assert (ids[K:] >= 0).all()


def test_the_other_cases():
  causal, uniform = _ids("causal"), _ids("uniform")
  assert ((uniform >= 0) & (uniform < S)).all()
  no_invalid = _ids("causal_no_invalid")
  assert (no_invalid >= 0).all() and (no_invalid <= np.arange(T)[:, None]).all()
  np.testing.assert_array_equal(no_invalid[K:], causal[K:])
  early = _ids("early_causal")
  np.testing.assert_array_equal(early[:K], causal[:K])
  np.testing.assert_array_equal(early[K:], uniform[K:])
  hot = _ids("hot_row")
  assert (hot[:, 0] == 0).all()
  np.testing.assert_array_equal(hot[:, 1:], uniform[:, 1:])
