"""The naive baseline: one padded forward per request, no batching across requests.

What a minimal reward server does (OpenRLHF's ``serve_rm``): tokenize the request's items,
pad them, run the model once, answer. Requests queue for the model one after another. It
speaks the same ``POST /v1/score`` contract (and gRPC ``Score``) as ``serve reward`` and
tokenizes exactly like it, so the same load generator drives both and scores compare.

    python -m benchmarks.naive_server --model DIR --http-port 8001 --grpc-port 50052
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import FastAPI, Request, Response  # module level: FastAPI resolves the handlers' annotations here

log = logging.getLogger("rlhf_feedback.bench.naive")


class NaiveScorer:
    """The model, its tokenizer and one forward per call."""

    def __init__(self, model_dir: str, *, dtype: str, device: str, threads: int | None) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from services.runtime.device import torch_dtype
        from services.runtime.rendering import Renderer, model_max_length

        if threads is not None:
            torch.set_num_threads(threads)
        self.torch = torch
        self.device = torch.device(device)
        tok = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch_dtype(dtype))
        self.model.to(self.device).eval()
        self.renderer = Renderer(tok, model_max_length(tok, self.model.config, None))
        self.pad_id = self.model.config.pad_token_id if self.model.config.pad_token_id is not None else 0

    def score(self, items: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        from services.runtime.chat import ChatMessage
        from services.runtime.items import RewardInput

        inputs = []
        for w in items:
            if "text" in w:
                inputs.append(RewardInput.of_text(w["text"]))
            else:
                p = w["prompt"]
                prompt = p if isinstance(p, str) else tuple(ChatMessage(m["role"], m["content"]) for m in p)
                inputs.append(RewardInput.of_pair(prompt, w["response"]))
        encoded = self.renderer.encode(inputs)
        torch = self.torch
        width = max(e.num_tokens for e in encoded)
        ids = torch.full((len(encoded), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, e in enumerate(encoded):
            ids[row, : e.num_tokens] = torch.tensor(e.input_ids)
            mask[row, : e.num_tokens] = 1
        with torch.inference_mode():
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
        scores = logits.float().cpu()[:, 0].tolist()
        return [
            {"score": s, "num_tokens": e.num_tokens, "truncated": e.truncated}
            for s, e in zip(scores, encoded, strict=True)
        ]


def _http_app(scorer: NaiveScorer, pool: ThreadPoolExecutor) -> Any:
    import orjson

    app = FastAPI(title="naive reward server")

    @app.get("/health/ready")
    async def ready() -> Response:
        return Response(b"ok")

    @app.post("/v1/score")
    async def score(request: Request) -> Response:
        body = orjson.loads(await request.body())
        results = await asyncio.get_running_loop().run_in_executor(pool, scorer.score, body["inputs"])
        payload = {"model": {"id": "naive", "revision": ""}, "results": results}
        return Response(orjson.dumps(payload), media_type="application/json")

    return app


def _grpc_server(scorer: NaiveScorer, pool: ThreadPoolExecutor, port: int, host: str) -> Any:
    import grpc

    from protos.rlhf.v1 import reward_pb2 as pb
    from protos.rlhf.v1 import reward_pb2_grpc as pb_grpc

    def wire(x: Any) -> dict[str, Any]:
        which = x.WhichOneof("input")
        if which == "text":
            return {"text": x.text}
        pair = x.pair
        if pair.WhichOneof("prompt") == "prompt_text":
            return {"prompt": pair.prompt_text, "response": pair.response}
        msgs = [{"role": m.role, "content": m.content} for m in pair.prompt_messages.messages]
        return {"prompt": msgs, "response": pair.response}

    class Servicer(pb_grpc.RewardServiceServicer):
        async def Score(self, request: Any, context: Any) -> Any:  # the proto's method name
            items = [wire(x) for x in request.inputs]
            results = await asyncio.get_running_loop().run_in_executor(pool, scorer.score, items)
            return pb.ScoreResponse(
                model=pb.ModelRef(id="naive"),
                results=[
                    pb.ItemResult(
                        score=pb.Score(score=r["score"], num_tokens=r["num_tokens"], truncated=r["truncated"])
                    )
                    for r in results
                ],
            )

    opts = [("grpc.max_receive_message_length", 256 << 20), ("grpc.max_send_message_length", 256 << 20)]
    server = grpc.aio.server(options=opts)
    pb_grpc.add_RewardServiceServicer_to_server(Servicer(), server)
    server.add_insecure_port(f"{host}:{port}")
    return server


async def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    scorer = NaiveScorer(args.model, dtype=args.dtype, device=args.device, threads=args.threads)
    pool = ThreadPoolExecutor(1, thread_name_prefix="naive-forward")  # one forward at a time
    grpc_server = None
    if args.grpc_port:
        grpc_server = _grpc_server(scorer, pool, args.grpc_port, args.host)
        await grpc_server.start()
    config = uvicorn.Config(_http_app(scorer, pool), host=args.host, port=args.http_port, log_level="warning")
    try:
        await uvicorn.Server(config).serve()  # until SIGTERM / SIGINT
    finally:
        if grpc_server is not None:
            await grpc_server.stop(1.0)
        pool.shutdown()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.naive_server", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="A local Hugging Face sequence-classification checkpoint.")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--http-port", type=int, required=True)
    p.add_argument("--grpc-port", type=int, default=0, help="0: no gRPC.")
    args = p.parse_args(argv)
    return asyncio.run(_serve(args))


if __name__ == "__main__":
    sys.exit(main())
