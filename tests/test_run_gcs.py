"""A whole run with a ``gs://`` workdir, on CPU without a network: config, metrics, TensorBoard
events, checkpoints, summary and report land in the bucket, and the run resumes from there.

Two stand-ins share one local directory per bucket: a minimal GCS JSON-API server that
TensorStore's own ``gcs`` driver talks to (``TENSORSTORE_GCS_HTTP_URL``; Orbax writes the arrays
through it) and an fsspec filesystem registered for ``gs`` (etils.epath's backend for everything
else: config, metrics, events, Orbax and grain metadata).
"""

import json
import os
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import fsspec
import numpy as np
import pytest
from fsspec.implementations.local import LocalFileSystem

from experiments import pretrain
from moejax.metrics import read_metrics

BUCKET = "moejax-test"


class _Objects:
    """Objects as files under ``root/<bucket>/<name>``; generations counted per write."""

    def __init__(self, root):
        self.root, self.generations, self.lock = root, {}, threading.Lock()
        self.uploads: list[str] = []  # names written through the JSON API (TensorStore)

    def file(self, bucket, name):
        return os.path.join(self.root, bucket, name)

    def generation(self, bucket, name):
        path = self.file(bucket, name)
        if not os.path.isfile(path):
            return 0
        return self.generations.get(path) or os.stat(path).st_mtime_ns

    def meta(self, bucket, name):
        return {"kind": "storage#object", "bucket": bucket, "name": name,
                "size": str(os.path.getsize(self.file(bucket, name))),
                "generation": str(self.generation(bucket, name)), "metageneration": "1"}


def _handler(objects: _Objects):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def _reply(self, code, body=b"", headers=None):
            body = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
            self.send_response(code)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            if body and "Content-Type" not in (headers or {}):
                self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def _parse(self):
            url = urllib.parse.urlsplit(self.path)
            q = {k: v[0] for k, v in urllib.parse.parse_qs(url.query).items()}
            parts = url.path.split("/")  # ['', ('upload',) 'storage', 'v1', 'b', B, 'o', name]
            i = parts.index("b")
            bucket = parts[i + 1]
            name = urllib.parse.unquote("/".join(parts[i + 3:])) if len(parts) > i + 3 else ""
            return bucket, name, q

        def _precondition_ok(self, q, gen):
            if "ifGenerationMatch" in q and int(q["ifGenerationMatch"]) != gen:
                return False
            return True

        def do_GET(self):  # noqa: N802
            bucket, name, q = self._parse()
            if not name:  # list
                prefix = q.get("prefix", "")
                base = os.path.join(objects.root, bucket)
                names = sorted(os.path.relpath(os.path.join(r, f), base)
                               for r, _, fs in os.walk(base) for f in fs)
                names = [n for n in names if n.startswith(prefix)
                         and n >= q.get("startOffset", "")
                         and ("endOffset" not in q or n < q["endOffset"])]
                return self._reply(200, {"kind": "storage#objects",
                                         "items": [objects.meta(bucket, n) for n in names]})
            with objects.lock:
                gen = objects.generation(bucket, name)
                if not gen:
                    return self._reply(404, {"error": {"code": 404, "message": "No such object"}})
                if not self._precondition_ok(q, gen):
                    return self._reply(412, {"error": {"code": 412}})
                if "ifGenerationNotMatch" in q and int(q["ifGenerationNotMatch"]) == gen:
                    return self._reply(304, b"", {"x-goog-generation": str(gen)})
                if q.get("alt") != "media":
                    return self._reply(200, objects.meta(bucket, name))
                with open(objects.file(bucket, name), "rb") as f:
                    data = f.read()
            headers = {"x-goog-generation": str(gen), "Content-Type": "application/octet-stream"}
            rng = self.headers.get("Range")
            if rng:
                a, b = rng.split("=")[1].split("-")
                a, b = int(a), int(b) if b else len(data) - 1
                headers["Content-Range"] = f"bytes {a}-{b}/{len(data)}"
                return self._reply(206, data[a:b + 1], headers)
            return self._reply(200, data, headers)

        def do_POST(self):  # noqa: N802
            bucket, _, q = self._parse()
            name = q["name"]
            data = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            with objects.lock:
                if not self._precondition_ok(q, objects.generation(bucket, name)):
                    return self._reply(412, {"error": {"code": 412}})
                path = objects.file(bucket, name)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "wb") as f:
                    f.write(data)
                objects.generations[path] = max(objects.generations.values(), default=0) + 1
                objects.uploads.append(name)
                return self._reply(200, objects.meta(bucket, name))

        def do_DELETE(self):  # noqa: N802
            bucket, name, q = self._parse()
            with objects.lock:
                gen = objects.generation(bucket, name)
                if not gen:
                    return self._reply(404, {"error": {"code": 404}})
                if not self._precondition_ok(q, gen):
                    return self._reply(412, {"error": {"code": 412}})
                os.remove(objects.file(bucket, name))
                objects.generations.pop(objects.file(bucket, name), None)
                return self._reply(204)

    return Handler


class _BucketsOnDisk(LocalFileSystem):
    """fsspec ``gs://bucket/key`` -> ``ROOT/bucket/key`` (what etils.epath opens for gs://)."""

    protocol = ("gs", "gcs")
    root_marker = ""
    ROOT = ""

    def __init__(self, *args, finalize_on_close=None, **kwargs):
        super().__init__(*args, **kwargs)

    @classmethod
    def _strip_protocol(cls, path):
        path = os.fspath(path)
        for prefix in ("gs://", "gcs://"):
            if path.startswith(prefix):
                path = path[len(prefix):]
        if path.startswith(cls.ROOT):
            return path.rstrip("/")
        return os.path.join(cls.ROOT, path).rstrip("/")

    def _bucket_key(self, local):
        return os.path.relpath(local, self.ROOT)

    def glob(self, path, **kwargs):
        return [self._bucket_key(p) for p in super().glob(path, **kwargs)]

    def walk(self, path, *args, **kwargs):
        for root, dirs, files in super().walk(path, *args, **kwargs):
            yield self._bucket_key(root), dirs, files


@pytest.fixture
def gcs(tmp_path, monkeypatch):
    """A local stand-in for GCS; yields the directory that holds the bucket's objects."""
    root = str(tmp_path / "gcs")
    os.makedirs(os.path.join(root, BUCKET))
    objects = _Objects(root)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(objects))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("TENSORSTORE_GCS_HTTP_URL", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setenv("GOOGLE_AUTH_TOKEN_FOR_TESTING", "test-token")
    monkeypatch.setenv("EPATH_USE_TF", "false")
    monkeypatch.setattr(_BucketsOnDisk, "ROOT", root)
    # Orbax asks google-cloud-storage whether the bucket has a hierarchical namespace (that SDK is
    # what a real gs:// run needs besides gcsfs); the stand-in bucket has a flat one
    from orbax.checkpoint._src.path import gcs_utils
    monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)
    for name in ("gs", "gcs"):
        fsspec.register_implementation(name, _BucketsOnDisk, clobber=True)
    from etils.epath import backend
    backend.fsspec_backend._get_filesystem.cache_clear()
    yield os.path.join(root, BUCKET), objects
    server.shutdown()
    backend.fsspec_backend._get_filesystem.cache_clear()


def _losses(path):
    return [r["train/loss"] for r in read_metrics(path) if "train/loss" in r]


@pytest.mark.slow
def test_a_gs_workdir_holds_the_whole_run_and_resumes(gcs, data_cache, tmp_path):
    gcs, objects = gcs
    common = ["--preset", "cpu-smoke", "--set", f"data.cache_dir={data_cache}"]
    uri = f"gs://{BUCKET}/exp"
    first = pretrain.main([*common, "--workdir", uri, "--set", "train.steps=3"])
    assert first["baseline"]["step"] == 3
    arm = os.path.join(gcs, "exp", "baseline")
    assert sorted(int(d) for d in os.listdir(os.path.join(arm, "ckpt")) if d.isdigit()) == [3]
    second = pretrain.main([*common, "--workdir", uri, "--set", "train.steps=6"])  # resumes at 3
    assert second["baseline"]["step"] == 6
    # the same two invocations on a local disk: train.steps sets the cosine schedule's length, so
    # the first 3 steps ran another program than a straight 6-step run's (bits differ on AVX-512)
    local = str(tmp_path / "local")
    for steps in (3, 6):
        pretrain.main([*common, "--workdir", local, "--set", f"train.steps={steps}"])
    got = _losses(os.path.join(arm, "metrics.jsonl"))
    assert len(got) == 6
    np.testing.assert_array_equal(got, _losses(os.path.join(local, "baseline", "metrics.jsonl")))
    for name in ("config.json", "summary.json"):
        assert json.load(open(os.path.join(arm, name)))
    events = [f for f in os.listdir(os.path.join(arm, "tb")) if f.startswith("events")]
    assert events and all(os.path.getsize(os.path.join(arm, "tb", f)) > 0 for f in events)
    assert "| baseline | code |" in open(os.path.join(gcs, "exp", "report.md")).read()
    assert os.path.getsize(os.path.join(gcs, "exp", "plots", "loss.png")) > 1000
    assert any("/ckpt/3/state/" in n for n in objects.uploads)  # arrays via TensorStore's gcs
    assert not os.path.exists("gs:"), "nothing may land in a local folder named after the URI"
