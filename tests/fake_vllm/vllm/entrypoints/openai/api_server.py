"""Fake ``python -m vllm.entrypoints.openai.api_server``: prints its argv and environment secrets (vLLM logs its
non-default args), then answers /v1/models and /v1/chat/completions, with ``Authorization: Bearer`` checked
against ``--api-key`` or ``$VLLM_API_KEY`` as vLLM does, until SIGTERM."""

import json
import os
import signal
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

argv = sys.argv[1:]
port = int(argv[argv.index("--port") + 1])
key = argv[argv.index("--api-key") + 1] if "--api-key" in argv else os.environ.get("VLLM_API_KEY")
print(f"INFO non-default args: {argv}", flush=True)
print("INFO environment: " + ", ".join(f"{k}={v}" for k, v in sorted(os.environ.items())
                                       if k.endswith(("_KEY", "_TOKEN"))), flush=True)


class Handler(BaseHTTPRequestHandler):
    def _reply(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _authorized(self) -> bool:
        return key is None or self.headers.get("Authorization") == f"Bearer {key}"

    def do_GET(self):
        if not self._authorized():
            return self._reply(401, {"error": "Unauthorized"})
        self._reply(200, {"object": "list", "data": [{"id": "demo", "object": "model"}]})

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if not self._authorized():
            return self._reply(401, {"error": "Unauthorized"})
        message = {"role": "assistant", "content": "多喝水。", "reasoning": "用户发烧。"}
        self._reply(200, {"id": "x", "object": "chat.completion", "created": 0, "model": "demo",
                          "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                          "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

    def log_message(self, fmt, *args):
        print(f"INFO {self.command} {self.path} (auth: {self.headers.get('Authorization')})", flush=True)


server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(SystemExit(0)))
try:
    server.serve_forever()
finally:
    server.server_close()
