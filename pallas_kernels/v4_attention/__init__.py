# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
