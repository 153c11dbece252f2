"""dmf_recognizer served by a real Triton Inference Server (`dmf-serve`), used through RemoteRecognizer.

Skipped, with the reason, where the `serve` extra (nvidia-pytriton's tritonserver, tritonclient) is not
installed. Every server runs on free loopback ports and is stopped by the fixture that started it.
One server serves the module; the restart, kill -9 and empty-gallery tests start their own.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from dmf_deploy.export.triton import write_triton_repository
from dmf_deploy.export.triton_recognizer import GALLERY_FILE, MODEL_NAME
from dmf_deploy.manifest import read_manifest
from dmf_deploy.names import InvalidClassName
from dmf_deploy.packaged import DEMO_BUNDLE
from dmf_deploy.preprocess import InvalidFrame
from dmf_deploy.runtime.gallery import Gallery, GalleryError
from dmf_deploy.runtime.recognizer import Recognizer, describe_model
from dmf_deploy.runtime.remote import RemoteRecognizer
from dmf_deploy.runtime.serve import Served, ServeError, find_triton, serving, start_serving
from dmf_deploy.train.glyphs import GlyphSet

try:
    find_triton()
    import tritonclient.http as http
    from tritonclient.utils import InferenceServerException
except (ServeError, ImportError) as exc:
    pytest.skip(f"the serve extra is not usable here: {exc}", allow_module_level=True)

from bundles import relative_error  # noqa: E402

GLYPHS = GlyphSet(40, seed=23, image_size=48)
# The bound: the server runs the same Recognizer on the same ONNX graphs, so its scores differ
# from a local one's only by float32 rounding of batch composition (observed: 0).
SCORE_RTOL = 1e-6


def shots(class_id: int, count: int = 3) -> list[np.ndarray]:
    return [GLYPHS.render(class_id, i) for i in range(count)]


def queries() -> list[np.ndarray]:
    return [GLYPHS.render(c, 9) for c in range(6)]


def demo_bundle() -> Path:
    return DEMO_BUNDLE


def make_repository(folder: Path) -> Path:
    bundle = demo_bundle()
    write_triton_repository(bundle, read_manifest(bundle), folder)
    return folder


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_repository(tmp_path_factory.mktemp("triton") / "repo")


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[Served]:
    with serving(repo, repo.parent / "serve.log") as served:
        yield served


@pytest.fixture(scope="module")
def remote(server: Served) -> Iterator[RemoteRecognizer]:
    with RemoteRecognizer(server.url, timeout=30) as rec:
        yield rec


@pytest.fixture(scope="module")
def local() -> Recognizer:
    return Recognizer.open(demo_bundle())


@pytest.fixture(scope="module")
def enrolled(remote: RemoteRecognizer, local: Recognizer) -> list[str]:
    """The same three classes enrolled on the server and in a local Recognizer."""
    names = ["alpha", "beta", "gamma"]
    for c, name in enumerate(names):
        remote.enroll(name, shots(c))
        local.enroll(name, shots(c))
    return names


def test_served_scores_match_a_local_recognizer(remote, local, enrolled) -> None:
    assert remote.classes == enrolled
    got, ref = remote.scores(queries()), local.scores(queries())
    assert got.shape == ref.shape == (6, 3)
    assert relative_error(got, ref) <= SCORE_RTOL
    served, mine = remote.classify(queries()), local.classify(queries())
    assert [p.label for p in served] == [p.label for p in mine]
    for a, b in zip(served, mine):
        assert a.scores.keys() == b.scores.keys()
        assert np.allclose(list(a.scores.values()), list(b.scores.values()), rtol=SCORE_RTOL, atol=0)
    one = remote.classify(queries()[0])  # one frame in, one Prediction out, as locally
    assert one.label == local.classify(queries()[0]).label


def test_server_errors_come_back_as_the_local_errors(remote, enrolled) -> None:
    with pytest.raises(InvalidClassName, match="path separator"):
        remote.enroll("a/b", shots(5))
    with pytest.raises(KeyError, match="no class named 'nobody'"):
        remote.remove("nobody")
    with pytest.raises(GalleryError, match="already exists"):
        remote.rename("alpha", "beta")
    with pytest.raises(InvalidFrame, match="exceed 4096"):
        remote.scores([np.zeros((4100, 8, 3), np.uint8)])
    assert remote.classes == enrolled  # nothing changed


def test_the_server_checks_what_a_raw_client_sends(server: Served, enrolled) -> None:
    """Requests that bypass RemoteRecognizer's own checks are refused by the model, with named errors."""
    client = http.InferenceServerClient(server.url, connection_timeout=30, network_timeout=30)

    def send(frames: np.ndarray | None, parameters: dict) -> str:
        name = "frames" if frames is not None else "control"
        array = frames if frames is not None else np.zeros((1, 1), np.uint8)
        tensor = http.InferInput(name, list(array.shape), "UINT8")
        tensor.set_data_from_numpy(array)
        with pytest.raises(InferenceServerException) as caught:
            client.infer(MODEL_NAME, [tensor], parameters=parameters)
        return caught.value.message()

    assert send(np.zeros((1, 8, 8, 4), np.uint8), {}).startswith("InvalidFrame: ")
    assert send(np.zeros((1, 1, 8, 3), np.uint8), {}).startswith("InvalidFrame: ")
    assert send(np.zeros((1, 8, 8, 3), np.uint8), {"op": "explode"}).startswith("BadRequest: unknown op")
    assert "must be a string" in send(None, {"op": "remove", "name": 5})
    assert "must be a string" in send(None, {"op": "remove"})
    assert send(None, {"op": "classify"}).startswith("BadRequest: classify needs the input 'frames'")
    assert send(np.zeros((1, 8, 8, 3), np.uint8), {"op": "remove", "name": "alpha"}).startswith("BadRequest")
    assert send(None, {"op": "enroll", "name": "x" * 2000}).startswith("BadRequest")
    over = np.zeros((33, 8, 8, 3), np.uint8)  # max_batch_size is 32: Triton itself refuses
    assert "batch-size must be <= 32" in send(over, {})
    client.close()


def test_readme_client_example_runs(server: Served, remote: RemoteRecognizer, enrolled) -> None:
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text[text.index("### 6. Serve with Triton") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert len(code.strip().splitlines()) <= 5  # "a five-line client"
    code = code.replace('"127.0.0.1:8000"', repr(server.url))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "label='ring'" in result.stdout
    remote.remove("ring")
    assert remote.classes == enrolled


def test_classifying_threads_and_an_enrolling_one(remote: RemoteRecognizer, enrolled) -> None:
    """8 threads classify while one enrols: no error, and every score row as wide as its class list."""
    frames = queries()[:2]
    new = [f"extra{c}" for c in range(6)]
    final = enrolled + new
    problems: list[str] = []
    seen: list[list[str]] = []
    enrolling, reading = threading.Event(), threading.Event()
    enrolling.set()

    def classify_loop(k: int) -> None:
        own = RemoteRecognizer(remote.url, timeout=30) if k % 2 else None  # own and shared clients
        rec = own or remote
        rounds = 0
        while (enrolling.is_set() or rounds < 3) and rounds < 500:
            try:
                scores, classes = rec.scores_and_classes(frames)
                if scores.shape != (len(frames), len(classes)):
                    problems.append(f"scores {scores.shape} for {len(classes)} classes")
                for p in rec.classify(frames):  # scored over a class list the gallery went through
                    if list(p.scores) != final[: max(len(p.scores), len(enrolled))]:
                        problems.append(f"classify scored {list(p.scores)}")
                seen.append(classes)
                reading.set()
            except Exception as exc:  # any error is a failure of the test
                problems.append(f"{type(exc).__name__}: {exc}")
            rounds += 1
        if own is not None:
            own.close()

    threads = [threading.Thread(target=classify_loop, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    try:
        assert reading.wait(60), "no reader got an answer"
        for c, name in enumerate(new):
            remote.enroll(name, shots(10 + c))
    finally:
        enrolling.clear()
        for t in threads:
            t.join(120)
    assert not any(t.is_alive() for t in threads)
    assert problems == []
    assert remote.classes == final
    # every class list a reader saw is one the gallery went through
    assert all(classes == final[: len(classes)] and len(classes) >= len(enrolled) for classes in seen)
    assert len({len(c) for c in seen}) > 1, "the readers never saw an enrolment happen"
    for name in new:
        remote.remove(name)
    assert remote.classes == enrolled


def test_graph_models_fail_only_on_the_missing_onnxruntime_backend(server: Served) -> None:
    """Triton parses dmf_backbone/dmf_support/dmf_head's configs, then stops at the backend it lacks."""
    client = http.InferenceServerClient(server.url, connection_timeout=30, network_timeout=120)
    for model in ("dmf_backbone", "dmf_support", "dmf_head"):
        with pytest.raises(InferenceServerException) as caught:
            client.load_model(model)
        message = caught.value.message()
        assert "unable to find backend library for backend 'onnxruntime'" in message, message
    client.close()


# ----- a new deployment: no class enrolled yet (issue 29, item 7) ----------------------------------
def check_empty(remote: RemoteRecognizer, local: Recognizer) -> None:
    """Every RemoteRecognizer method on a gallery with no class, against a local Recognizer's answers."""
    assert remote.classes == local.classes == []
    assert remote.scores(queries()).shape == local.scores(queries()).shape == (6, 0)
    scores, classes = remote.scores_and_classes(queries()[:2])
    assert scores.shape == (2, 0) and classes == []
    served, mine = remote.classify(queries()), local.classify(queries())
    for got in (*served, remote.classify(queries()[0])):
        ref = mine[0]
        assert (got.label, got.message, got.reason) == (ref.label, ref.message, ref.reason)
        assert got.scores == ref.scores == {} and np.isnan(got.score) and np.isnan(ref.score)
    with pytest.raises(KeyError, match="no class named 'nobody'"):
        remote.remove("nobody")
    with pytest.raises(KeyError, match="no class named 'nobody'"):
        remote.rename("nobody", "somebody")
    assert remote.save().name == GALLERY_FILE


def test_every_method_on_an_empty_served_gallery(tmp_path: Path) -> None:
    """A fresh deployment, then the same after its last class is removed."""
    repo = make_repository(tmp_path / "repo")
    local = Recognizer.open(demo_bundle())
    with serving(repo, tmp_path / "serve.log") as served, RemoteRecognizer(served.url, timeout=30) as rec:
        check_empty(rec, local)
        rec.enroll("first", shots(0))
        local.enroll("first", shots(0))
        assert rec.classes == ["first"]
        assert relative_error(rec.scores(queries()), local.scores(queries())) <= SCORE_RTOL
        rec.rename("first", "only")
        local.rename("first", "only")
        rec.remove("only")
        local.remove("only")
        check_empty(rec, local)
        rec.enroll("again", shots(1))  # an emptied gallery takes classes again
        assert rec.classes == ["again"]
    manifest = read_manifest(demo_bundle())
    saved = Gallery.load(repo / MODEL_NAME / GALLERY_FILE, manifest.fingerprint, describe_model(manifest))
    assert saved.names == ["again"]


def test_restart_keeps_the_classes(server: Served, repo: Path, remote, enrolled) -> None:
    before = remote.scores(queries())
    assert remote.save() == repo / MODEL_NAME / GALLERY_FILE
    remote.close()
    assert server.stop() == 0  # dmf-serve stops the server on SIGTERM and exits cleanly
    assert "dmf-serve: stopped" in server.log.read_text()
    with serving(repo, repo.parent / "restart.log") as again, RemoteRecognizer(again.url, timeout=30) as rec:
        assert rec.classes == enrolled
        assert relative_error(rec.scores(queries()), before) <= SCORE_RTOL


def test_kill_9_during_a_save_leaves_a_loadable_gallery(tmp_path: Path) -> None:
    """The server saves after every enrolment; kill -9 it while a save's temp file exists."""
    repo = make_repository(tmp_path / "repo")
    gallery_path = repo / MODEL_NAME / GALLERY_FILE
    # A gallery of 400 classes (~19 MB) makes each save take long enough to be caught in the act.
    seed = Recognizer.open(demo_bundle(), gallery=gallery_path)
    for c in range(400):
        seed.enroll(f"seed{c}", [GLYPHS.render(c % 40, c)])
    seed.save()
    served = start_serving(repo, tmp_path / "serve.log")
    caught_in_save = False
    rec = writer = None
    stop = threading.Event()
    try:
        rec = RemoteRecognizer(served.url, timeout=60)

        def enrol_forever() -> None:
            k = 0
            while not stop.is_set() and k < 200:
                try:
                    rec.enroll(f"new{k}", shots(k % 40, 1))
                except Exception:
                    return  # the server is gone
                k += 1

        writer = threading.Thread(target=enrol_forever)
        writer.start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and writer.is_alive():
            if any(p.name.startswith(f".{GALLERY_FILE}.") for p in gallery_path.parent.iterdir()):
                served.kill()
                caught_in_save = True
                break
            time.sleep(0.0005)
        stop.set()
    finally:
        served.stop()
        if writer is not None:
            writer.join(60)
        if rec is not None:
            rec.close()
    assert caught_in_save, "no save was seen in progress"
    manifest = read_manifest(demo_bundle())
    loaded = Gallery.load(gallery_path, manifest.fingerprint, describe_model(manifest))
    assert loaded.names[:400] == [f"seed{c}" for c in range(400)]
    assert loaded.names[400:] == [f"new{k}" for k in range(len(loaded) - 400)]
    shutil.rmtree(repo)
