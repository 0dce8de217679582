"""What several test files share.

    builtin_dir            the tiny built-in dataset of a test file that trains (the file defines SPEC)
    seed_and_one_thread    the detector tests' setup: torch's global seed 0 and one thread per test
    box_target             one image's target dict {"boxes", "labels", "crowd"} from plain lists
"""

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


@pytest.fixture
def seed_and_one_thread():
    """torch's global generator seeded with 0 and one torch thread for the test; the thread count comes back after.
    The detector test files take it for every test (`pytestmark = pytest.mark.usefixtures(...)`)."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def box_target(boxes, labels, crowd=None, dtype=torch.float32) -> dict:
    """One image's target from plain lists: {"boxes" (N, 4), "labels" int64 (N,), "crowd" (M, 4)} in `dtype`."""
    crowd = torch.zeros(0, 4) if crowd is None else torch.tensor(crowd).reshape(-1, 4)
    return {"boxes": torch.tensor(boxes, dtype=dtype).reshape(-1, 4), "labels": torch.tensor(labels, dtype=torch.int64),
            "crowd": crowd.to(dtype)}
