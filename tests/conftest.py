"""Test-wide setup: 4 fake CPU devices, so sharded code runs as it would on 4 GPUs."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import flags  # noqa: E402

# grain reads absl flags in worker processes; outside absl.app.run they must be marked parsed.
if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
