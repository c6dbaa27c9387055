"""A stand-in Jupyter server for the unit tests of the remote side (tests/test_remote.py).

    python3 fake_jupyter.py RUNTIME_DIR STATUS [WORDS...]

Listens on a free port of 127.0.0.1, writes RUNTIME_DIR/jpserver-PID.json as Jupyter does
(port, token "tok", base_url, pid) and answers every request with STATUS and "{}".  Each
request is appended to RUNTIME_DIR/requests.log as "METHOD PATH AUTHORIZATION", so a test can
tell whether a token was sent.  POST /api/shutdown makes it exit.  WORDS are ignored: a
test passes "jupyter" to look like one in ps.
"""

import http.server
import json
import os
import sys

runtime, status = sys.argv[1], int(sys.argv[2])


class Handler(http.server.BaseHTTPRequestHandler):
    def answer(self):
        with open(os.path.join(runtime, "requests.log"), "a") as f:
            f.write("%s %s %s\n" % (self.command, self.path, self.headers.get("Authorization")))
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b"{}")
        self.wfile.flush()
        if self.path.endswith("api/shutdown"):
            os._exit(0)

    do_GET = do_POST = answer

    def log_message(self, *args):
        pass


server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
info = dict(port=server.server_address[1], token="tok", base_url="/", pid=os.getpid(),
            root_dir=os.getcwd())
tmp = os.path.join(runtime, ".jpserver-%d.tmp" % os.getpid())
with open(tmp, "w") as f:
    json.dump(info, f)
os.rename(tmp, os.path.join(runtime, "jpserver-%d.json" % os.getpid()))
server.serve_forever()
