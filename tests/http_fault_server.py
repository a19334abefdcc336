#!/usr/bin/env python3
"""A small HTTP file server with injected faults, for tests/test_http.c (python3 stdlib only).

    python3 tests/http_fault_server.py ROOT_DIR

Binds 127.0.0.1 on a free port and prints "PORT <n>" on stdout. URLs:

    /ok/<file>                 the file, Range requests honored (206)
    /f/<spec>/<tag>/<file>     the file with faults; <tag> is any word that keeps the fault counters
                               of one test apart from another's
    /_log                      JSON list of the requests seen so far: [{"path", "method", "range"}]

<spec> is a comma-separated list of:
    drop=N      the first N GET responses are cut: headers with the full Content-Length, then part of
                the body (cut=BYTES, default a third of what was asked), then the connection closes
    e503=N      the first N GET requests answer 503          e429=N   ... answer 429
    stall=N     the first N GET responses send part of the body, then go silent for stallsec=S seconds
                (default 3) before closing
    norange     Range is ignored: always 200 with the whole file
    chunked     Transfer-Encoding: chunked instead of Content-Length (a cut is then a torn chunk)
"""
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ROOT = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else ".")
LOCK = threading.Lock()
COUNTS = {}  # (spec/tag/file, kind) -> times the fault fired
LOG = []


def parse_spec(spec):
    out = {}
    for tok in spec.split(","):
        if not tok:
            continue
        if "=" in tok:
            k, v = tok.split("=", 1)
            out[k] = float(v) if k == "stallsec" else int(v)
        else:
            out[tok] = True
    return out


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):  # quiet
        pass

    def fire(self, key, kind, limit):
        """True while the fault `kind` has fired fewer than `limit` times for this URL."""
        with LOCK:
            n = COUNTS.get((key, kind), 0)
            if n < limit:
                COUNTS[(key, kind)] = n + 1
                return True
            return False

    def resolve(self):
        parts = self.path.split("?")[0].lstrip("/").split("/")
        if parts[0] == "ok":
            return {}, "/".join(parts[1:]), self.path
        if parts[0] == "f" and len(parts) >= 4:
            return parse_spec(parts[1]), "/".join(parts[3:]), self.path
        return None, None, None

    def send_plain(self, code, msg):
        body = msg.encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self):
        self.handle_any()

    def do_GET(self):
        self.handle_any()

    def handle_any(self):
        with LOCK:
            LOG.append({"path": self.path, "method": self.command, "range": self.headers.get("Range")})
        if self.path == "/_log":
            with LOCK:
                body = json.dumps(LOG).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        spec, rel, key = self.resolve()
        if spec is None:
            return self.send_plain(404, "no such route\n")
        path = os.path.join(ROOT, rel)
        if not os.path.isfile(path):
            return self.send_plain(404, "not found\n")
        data = open(path, "rb").read()
        size = len(data)
        if self.command == "GET":
            if "e503" in spec and self.fire(key, "e503", spec["e503"]):
                return self.send_plain(503, "busy\n")
            if "e429" in spec and self.fire(key, "e429", spec["e429"]):
                return self.send_plain(429, "slow down\n")
        start = 0
        rng = self.headers.get("Range")
        if rng and not spec.get("norange") and rng.startswith("bytes="):
            a = rng[6:].split("-")[0]
            start = int(a) if a else 0
            if start >= size:
                self.send_response(416)
                self.send_header("Content-Range", "bytes */%d" % size)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", "bytes %d-%d/%d" % (start, size - 1, size))
        else:
            self.send_response(200)
        body = data[start:]
        chunked = spec.get("chunked")
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "none" if spec.get("norange") else "bytes")
        self.end_headers()
        if self.command == "HEAD":
            return
        cut = None
        stall = False
        if "drop" in spec and self.fire(key, "drop", spec["drop"]):
            cut = spec.get("cut", max(1, len(body) // 3))
        elif "stall" in spec and self.fire(key, "stall", spec["stall"]):
            cut = spec.get("cut", max(1, len(body) // 3))
            stall = True
        try:
            payload = body if cut is None else body[:cut]
            step = 16384
            for i in range(0, len(payload), step):
                piece = payload[i:i + step]
                if chunked:
                    self.wfile.write(b"%x\r\n" % len(piece) + piece + b"\r\n")
                else:
                    self.wfile.write(piece)
            if cut is None:
                if chunked:
                    self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
                return
            self.wfile.flush()
            if stall:
                time.sleep(spec.get("stallsec", 3.0))
            self.close_connection = True
            try:
                self.connection.shutdown(2)
            except OSError:
                pass
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        # Clients that hang up mid-response are what these tests are about: not worth a traceback.
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)


def main():
    srv = Server(("127.0.0.1", 0), Handler)
    print("PORT %d" % srv.server_address[1], flush=True)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
