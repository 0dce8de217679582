"""Fixtures shared by the test files that train: each such file defines SPEC, its tiny built-in dataset."""

import pytest
import torch

from data.synthetic import BuiltinSpec, ensure_builtin


@pytest.fixture(scope="module", autouse=True)
def keep_thread_count():
    """train.train sets torch's thread count; later test files get theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def builtin_dir(request, tmp_path_factory):
    """The test module's tiny built-in dataset (its SPEC), generated once per module."""
    root = tmp_path_factory.mktemp("builtin")
    ensure_builtin(root, spec=BuiltinSpec(**request.module.SPEC), num_workers=0, verbose=False)
    return root
