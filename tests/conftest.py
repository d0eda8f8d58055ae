"""Test session setup: 4 simulated CPU devices (set before JAX initialises its backend)."""

import os

os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=4"]
).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# torchvision (via timm) loads triton, whose extension segfaults when TensorFlow (the SavedModel
# export and dataset preparation tests) was imported first; loading it first is safe.
try:
    import torchvision  # noqa: F401
except ImportError:
    pass
