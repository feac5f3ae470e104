"""Shared test helpers: the reference fixtures in ../shared (beside the repository, as in CI)."""
from __future__ import annotations

import functools
import http.server
import importlib.util
import os
import threading
from pathlib import Path

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    # the README's test command runs two pytest workers on CI's 2 cores: one thread each (and in the processes
    # the tests start), or the two oversubscribe the cores and both run several times slower
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

# The test files that take longest (seconds of one worker at one thread, AMD EPYC family 25, `--durations`):
# handed to the workers first, so that neither worker is left alone with one of them at the end. xdist's
# `--dist loadfile` otherwise queues files by their number of tests, which puts these few-test files last.
LONGEST_FIRST = (
    "tests/engine/test_train_trajectory.py",  # 428
    "tests/engine/test_engine_train.py",  # 285
    "tests/test_train_parity.py",  # 241
    "tests/deploy/test_onnx_models.py",  # 122
    "tests/test_long_runs.py",  # 103
    "tests/test_docs.py",  # 72
    "tests/models/test_cascade.py",  # 70
    "tests/models/test_paddle_parity.py",  # 55
    "tests/test_optimize.py",  # 53
)


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist: keep the order below
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable: the rest keep their order

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
REFERENCE = SHARED / "reference"


def _load_module(name: str):
    path = REFERENCE / f"{name}.py"
    if not path.is_file():
        pytest.skip(f"reference helper {path} not found (../shared must sit beside the repository)")
    spec = importlib.util.spec_from_file_location(f"_ref_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def seeded_weights():
    return _load_module("seeded_weights")


@pytest.fixture(scope="session")
def check_parity():
    return _load_module("check_parity")


@pytest.fixture(scope="session")
def seeded_checkpoint(seeded_weights, tmp_path_factory):
    """seeded_checkpoint(layout_name, suffix=".pth") -> path of a file with the seed-0 weights in that layout's
    own names: a torch .pth, or with ``suffix=".pdparams"`` what ``paddle.save`` writes."""
    cache: dict[tuple[str, str], Path] = {}

    def make(layout: str, suffix: str = ".pth") -> Path:
        if (layout, suffix) not in cache:
            sd = seeded_weights.seeded_state_dict(seeded_weights.load_layout(REFERENCE / "layouts" / f"{layout}.json"), 0)
            path = tmp_path_factory.mktemp("weights") / f"{layout}{suffix}"
            if suffix == ".pdparams":
                seeded_weights.save_pdparams(sd, path)
            else:
                torch.save(sd, path)
            cache[(layout, suffix)] = path
        return cache[(layout, suffix)]

    return make


def one_error_line(capsys) -> str:
    """The CLI's user-error convention: exactly one ``res2det: error: ...`` line on stderr, no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("res2det: error: "), err
    return lines[0]


MASK_RCNN = "mask_rcnn_r2_101_fpn_2x_coco"
PHOTO = SHARED / "data" / "tiny_coco" / "val2017" / "000000037777.jpg"  # 352x230: upscaled 3.48x by predict


@pytest.fixture(scope="session")
def seeded_mask_rcnn(seeded_checkpoint):
    """The R2-101 Mask R-CNN with the seed-0 reference weights, built once per session (eval mode)."""
    import res2det

    return res2det.create_model(MASK_RCNN, weights=str(seeded_checkpoint(MASK_RCNN)))


@pytest.fixture(scope="session")
def photo_detections(seeded_mask_rcnn):
    """``seeded_mask_rcnn.predict`` of a real photo of another size than the model input (one forward)."""
    if not PHOTO.is_file():
        pytest.skip(f"{PHOTO} not found (../shared must sit beside the repository)")
    (det,) = seeded_mask_rcnn.predict(str(PHOTO))
    return det


@pytest.fixture()
def http_server(tmp_path):
    """(folder, base URL) of a throwaway HTTP server on 127.0.0.1 serving that folder."""
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="session")
def tiny_seeded(seeded_weights):
    """The zoo's small Mask R-CNN (``mask_rcnn_r2_tiny_fpn``) with the reference recipe's seed-0 weights for its
    own layout, in eval mode: spread-out scores and real masks (plain random initialisation gives near-ties
    everywhere and empty masks)."""
    import res2det

    model = res2det.create_model("mask_rcnn_r2_tiny_fpn").eval()
    layout = {k: list(v.shape) for k, v in model.state_dict().items()}
    model.load_state_dict(seeded_weights.seeded_state_dict(layout, 0))
    return model


def free_port() -> int:
    """A TCP port free on loopback now (the rendezvous of the tests' two-process gloo runs)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
