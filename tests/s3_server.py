"""A real S3-protocol server on 127.0.0.1 for tests: moto's server app (the one `moto_server`
runs) behind werkzeug, with a thin WSGI layer that counts requests and bytes, can answer
503 SlowDown (the throttling reply S3 gives a busy prefix), and answers a request signed with an
unknown access key as S3 does (403 InvalidAccessKeyId; moto itself accepts any key).

The code under test reaches it only through the standard AWS environment variables
(`S3Server.env()`), as it would reach AWS. Buckets live in moto's in-process backend, so they
survive `stop()` / `start()` (a server that goes away mid-job and comes back).
"""
from __future__ import annotations

import json
import sys
import threading
from collections import Counter
from typing import Optional

SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
             b'<Message>Please reduce your request rate.</Message></Error>')


INVALID_KEY = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>InvalidAccessKeyId</Code>'
               b'<Message>The AWS Access Key Id you provided does not exist in our records.</Message></Error>')


CONTROL = "/_nextdetail/"


class S3Server:
    def __init__(self):
        self.port: Optional[int] = None
        self.requests: Counter = Counter()       # method -> count
        self.bytes_in = 0                        # request bodies (uploads)
        self.bytes_out = 0                       # response bodies (downloads)
        self.throttle = 0                        # answer the next N object requests with 503
        self.throttled = 0
        self.access_key = "testing"              # requests signed with another key get 403
        self._server = None
        self._thread = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ WSGI
    def _app(self):
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app

        moto_app = DomainDispatcherApplication(create_backend_app)

        def app(environ, start_response):
            method = environ["REQUEST_METHOD"]
            path = environ.get("PATH_INFO", "")
            if path.startswith(CONTROL):          # a benchmark's questions to a server in another process
                body = json.dumps(self._control(path[len(CONTROL):], environ.get("QUERY_STRING", ""))).encode()
                start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
                return [body]
            is_object = path.count("/") >= 2 and not path.startswith("/moto-api")
            with self._lock:
                self.requests[method] += 1
                self.bytes_in += int(environ.get("CONTENT_LENGTH") or 0)
                throttle = is_object and self.throttle > 0
                if throttle:
                    self.throttle -= 1
                    self.throttled += 1
            auth = environ.get("HTTP_AUTHORIZATION", "")
            if "Credential=" in auth and not auth.split("Credential=", 1)[1].startswith(self.access_key + "/"):
                start_response("403 Forbidden", [("Content-Type", "application/xml"),
                                                 ("Content-Length", str(len(INVALID_KEY)))])
                return [INVALID_KEY]
            if throttle:
                start_response("503 Slow Down", [("Content-Type", "application/xml"),
                                                 ("Content-Length", str(len(SLOW_DOWN)))])
                return [SLOW_DOWN]
            return self._counted(moto_app(environ, start_response))

        return app

    def _control(self, what: str, query: str) -> dict:
        from urllib.parse import parse_qs

        q = {k: v[0] for k, v in parse_qs(query).items()}
        if what == "reset":
            self.reset_counts()
        elif what == "fill":               # n tiny image objects under a prefix, straight into moto
            from moto.s3.models import s3_backends

            backend = s3_backends["123456789012"]["aws"]
            backend.create_bucket(q["bucket"], "us-east-1")
            for i in range(int(q["n"])):
                backend.put_object(q["bucket"], f"{q['prefix']}/c{i % 10}/{i:07d}.jpg", b"x")
        return {"requests": dict(self.requests), "bytes_in": self.bytes_in, "bytes_out": self.bytes_out}

    def _counted(self, body):
        for chunk in body:
            with self._lock:
                self.bytes_out += len(chunk)
            yield chunk

    def start(self) -> "S3Server":
        from moto.moto_server.werkzeug_app import MotoRequestHandler
        from werkzeug.serving import make_server

        class Quiet(MotoRequestHandler):
            def log_request(self, *args, **kwargs):     # one line per request otherwise
                pass

        self._server = make_server("127.0.0.1", self.port or 0, self._app(), threaded=True, request_handler=Quiet)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join()
            self._server = None

    # ------------------------------------------------------------------ for tests
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict:
        """The standard variables that point boto3, s3fs and pyarrow at this server."""
        return {"AWS_ENDPOINT_URL": self.url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_REGION": "us-east-1", "AWS_MAX_ATTEMPTS": "3"}

    def reset_counts(self) -> None:
        with self._lock:
            self.requests.clear()
            self.bytes_in = self.bytes_out = 0

    def total_requests(self) -> int:
        return sum(self.requests.values())


def make_bucket(name: str) -> None:
    """Create a bucket through the environment's endpoint (boto3, as a user would)."""
    import boto3

    boto3.client("s3").create_bucket(Bucket=name)


if __name__ == "__main__":          # python tests/s3_server.py PORT: the server in a process of its own
    server = S3Server()
    server.port = int(sys.argv[1])
    server.start()
    print(server.url, flush=True)
    threading.Event().wait()
