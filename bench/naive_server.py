"""The naive baseline: transformers `generate`, one request at a time, streamed over HTTP.

Speaks the two streaming routes the load generator uses (TGI `/generate_stream`, OpenAI
`/v1/completions` with `stream: true`) so both servers are measured by the same client. Requests
wait on a lock: this is what serving looks like without batching.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading

import torch
import transformers
from aiohttp import web
from tokenizers import Tokenizer
from transformers.generation.streamers import BaseStreamer


class _QueueStreamer(BaseStreamer):
    """Hands each new token id from the generate thread to the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, prompt_len: int) -> None:
        self.loop, self.queue, self.skip = loop, queue, 1  # the first put() is the prompt

    def put(self, value: torch.Tensor) -> None:
        if self.skip:
            self.skip -= 1
            return
        for token_id in value.flatten().tolist():
            self.loop.call_soon_threadsafe(self.queue.put_nowait, token_id)

    def end(self) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, None)


class NaiveServer:
    def __init__(self, model_dir: str, threads: int) -> None:
        torch.set_num_threads(threads)
        self.model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.tokenizer = Tokenizer.from_file(f"{model_dir}/tokenizer.json")
        self.lock = asyncio.Lock()

    async def _tokens(self, text: str, max_new_tokens: int):
        ids = self.tokenizer.encode(text).ids
        queue: asyncio.Queue = asyncio.Queue()
        streamer = _QueueStreamer(asyncio.get_running_loop(), queue, len(ids))

        def run() -> None:
            with torch.inference_mode():
                self.model.generate(
                    torch.tensor([ids]),
                    attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    streamer=streamer,
                    pad_token_id=2,
                )

        async with self.lock:
            thread = threading.Thread(target=run, daemon=True)
            thread.start()
            while (token_id := await queue.get()) is not None:
                yield token_id
            thread.join()

    async def generate_stream(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        max_new = int((body.get("parameters") or {}).get("max_new_tokens") or 20)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        n = 0
        async for token_id in self._tokens(body["inputs"], max_new):
            n += 1
            event = {"index": n, "token": {"id": token_id, "text": self.tokenizer.decode([token_id]),
                                           "logprob": None, "special": False}, "generated_text": None}
            await resp.write(f"data: {json.dumps(event)}\n\n".encode())
        return resp

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        async for token_id in self._tokens(body["prompt"], int(body.get("max_tokens") or 16)):
            chunk = {"object": "text_completion", "choices": [{"index": 0, "text": self.tokenizer.decode([token_id]),
                                                                "finish_reason": None}]}
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        return resp

    async def health(self, request: web.Request) -> web.Response:
        return web.Response()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model_dir")
    parser.add_argument("--port", type=int, default=8090)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    server = NaiveServer(args.model_dir, args.threads)
    app = web.Application()
    app.router.add_post("/generate_stream", server.generate_stream)
    app.router.add_post("/v1/completions", server.completions)
    app.router.add_get("/health", server.health)
    web.run_app(app, host="127.0.0.1", port=args.port, print=None)


if __name__ == "__main__":
    main()
