# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""Makes this folder's test helpers (`convert_testing`) importable from its tests and v4/."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
