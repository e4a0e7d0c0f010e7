"""A local OpenAI-compatible chat server for tests: replies come from a function of the request."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def reply(content, logprobs=None) -> dict:
    """A chat-completions reply holding ``content`` (and per-token ``logprobs`` if given)."""
    choice = {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
    if logprobs is not None:
        choice["logprobs"] = {"content": logprobs}
    return {"id": "x", "object": "chat.completion", "choices": [choice]}


class ChatServer:
    """Serves ``respond(number, body)`` on 127.0.0.1: the request's 1-based number and its JSON
    body in; a reply text, a reply dict, or ``(status, bytes)`` out. Records every body."""

    def __init__(self, respond, delay: float = 0.0):
        self.count = self.active = self.max_active = 0
        self.bodies = []
        lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                with lock:
                    outer.count += 1
                    outer.active += 1
                    outer.max_active = max(outer.max_active, outer.active)
                    outer.bodies.append(body)
                    number = outer.count
                time.sleep(delay)
                answer = respond(number, body)
                with lock:
                    outer.active -= 1
                if isinstance(answer, str):
                    answer = reply(answer)
                status, payload = answer if isinstance(answer, tuple) else (200, json.dumps(answer).encode())
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.send_header("retry-after-ms", "10")  # the openai client's retries wait 10 ms
                self.end_headers()
                try:
                    self.wfile.write(payload)
                except BrokenPipeError:  # the client gave up (timeout test)
                    pass

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
