"""Run the Triton kernels through Triton's CPU interpreter on machines without a GPU.

triton.jit reads TRITON_INTERPRET when a kernel is defined, i.e. when `nanollava.kernels` is first
imported, and pytest imports every test module into one process; so it is set here, before any.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# CI (CI=true) replays a fixed set of examples, so a submission's result does not depend on the
# draw; local runs stay random and keep exploring (a failure prints its @reproduce_failure).
from hypothesis import settings

settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI") == "true":
    settings.load_profile("ci")


import gzip  # noqa: E402
import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def pope_dir(tmp_path_factory):
    """The POPE fixture (tests/fixtures/pope/*.gz: LLaVA-1.5-13B's answers, questions, labels), unpacked."""
    out = tmp_path_factory.mktemp("pope")
    for gz in (Path(__file__).parent / "fixtures" / "pope").glob("*.gz"):
        with gzip.open(gz, "rb") as src, open(out / gz.name[:-3], "wb") as dst:
            shutil.copyfileobj(src, dst)
    return out
