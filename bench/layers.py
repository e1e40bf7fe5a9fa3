"""What streaming one reply costs in each layer below the control plane, measured alone.

    python -m bench.layers [-c 50] [--duration 10] [--token-delay-ms 20] [--tokens 20] [--uvloop]

`-c` replies at a time, each of `--tokens` tokens, on one asyncio loop in one process (as the
worker's run host holds its runs), for `--duration` seconds after `--warmup` (2 s); the figure is
that process's CPU per reply. Each layer runs in a fresh process against the benchmark's fake
LLM (`bench.fakellm`, started here):

- `http`: the provider client's own HTTP client (httpx with the egress guard): the request,
  the SSE lines, `json.loads` per chunk;
- `openai`: the product's `openai` client (`FastChunksClient`), each chunk an object;
- `sdk`: `Runner.run_streamed` of a one-line agent on that client, every stream event read;
- `memory-*`: the same chunks from memory, `--token-delay-ms` apart, with no HTTP: the loop's
  wake-ups alone (`memory-loop`), the SDK's chat-completions stream handler
  (`memory-handler`), the whole runner (`memory-sdk`).

The control plane's own work (the run's SQL, its event stream, Celery, the web process) is what
`make bench` adds on top; docs/benchmark.md has both.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bench.stack import PYTHON, _start, _wait_port, free_port

BASE_DIR = Path(__file__).resolve().parent.parent
LAYERS = ("http", "openai", "sdk", "memory-loop", "memory-handler", "memory-sdk")
WARMUP_S = 2.0


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _measure(
    one: Callable[[], Awaitable[None]], concurrency: int, duration: float, warmup: float
) -> dict:
    done = 0
    measuring = False
    stop = time.monotonic() + warmup + duration

    async def chat() -> None:
        nonlocal done
        while time.monotonic() < stop:
            await one()
            if measuring:
                done += 1

    tasks = [asyncio.create_task(chat()) for _ in range(concurrency)]
    await asyncio.sleep(warmup)
    measuring, start = True, _cpu_s()
    await asyncio.gather(*tasks)
    cpu = _cpu_s() - start
    return {"replies": done, "cpu_ms_per_reply": round(1000 * cpu / done, 3) if done else None}


def _layer(name: str, port: int, tokens: int, delay_s: float) -> Callable[[], Awaitable[None]]:
    """The coroutine function streaming one reply through layer `name` (Django is set up)."""
    from agents import Agent, OpenAIChatCompletionsModel, RunConfig, Runner
    from agents.models.chatcmpl_stream_handler import ChatCmplStreamHandler
    from openai.types.chat import ChatCompletionChunk
    from openai.types.responses import Response

    from ai_agents.models import ModelProvider
    from ai_agents.runtime import models

    # The fake LLM answers "You said: <the message>": two words, then the message's.
    text = " ".join(f"w{i}" for i in range(max(tokens - 2, 1)))
    base_url = f"http://127.0.0.1:{port}/v1"
    provider = ModelProvider(base_url=base_url, api_key_encrypted="", timeout_seconds=60)
    client = models._new_client(provider)
    run_config = RunConfig(tracing_disabled=True)

    if name == "http":
        http = client._client
        body = {
            "model": "fake-model",
            "stream": True,
            "messages": [{"role": "user", "content": text}],
        }

        async def http_reply() -> None:
            async with http.stream("POST", f"{base_url}/chat/completions", json=body) as response:
                async for line in response.aiter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        json.loads(line[6:])

        return http_reply
    if name == "openai":

        async def openai_reply() -> None:
            stream = await client.chat.completions.create(
                model="fake-model", messages=[{"role": "user", "content": text}], stream=True
            )
            async for _chunk in stream:
                pass

        return openai_reply
    if name == "sdk":
        agent = Agent(
            name="Echo",
            instructions="Repeat what the user says.",
            model=OpenAIChatCompletionsModel(model="fake-model", openai_client=client),
        )

        async def sdk_reply() -> None:
            result = Runner.run_streamed(agent, text, run_config=run_config)
            async for _event in result.stream_events():
                pass

        return sdk_reply

    def chunk(delta: dict[str, Any], finish: str | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk.model_validate(
            {
                "id": "chatcmpl-layers",
                "object": "chat.completion.chunk",
                "created": 0,
                "model": "fake-model",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
        )

    chunks = [chunk({"role": "assistant", "content": ""})]
    chunks += [chunk({"content": f"w{i} "}) for i in range(tokens)]
    chunks.append(chunk({}, "stop"))

    async def from_memory() -> Any:
        for item in chunks:
            await asyncio.sleep(delay_s)
            yield item

    if name == "memory-loop":

        async def loop_reply() -> None:
            async for _chunk in from_memory():
                pass

        return loop_reply
    if name == "memory-handler":

        async def handler_reply() -> None:
            response = Response(
                id="resp-layers", created_at=0, model="fake-model", object="response",
                output=[], tool_choice="none", tools=[], top_p=None, parallel_tool_calls=False,
            )  # fmt: skip
            async for _event in ChatCmplStreamHandler.handle_stream(response, from_memory()):
                pass

        return handler_reply
    if name == "memory-sdk":

        class Completions:
            async def create(self, **_: Any) -> Any:
                return from_memory()

        class Chat:
            completions = Completions()

        class MemoryClient:  # what the chat-completions model asks of an `openai` client
            chat = Chat()
            base_url = "http://127.0.0.1/v1/"

            def with_options(self, **_: Any) -> MemoryClient:
                return self

        agent = Agent(
            name="Echo",
            instructions="Repeat what the user says.",
            model=OpenAIChatCompletionsModel(model="fake-model", openai_client=MemoryClient()),  # type: ignore[arg-type]
        )

        async def memory_sdk_reply() -> None:
            result = Runner.run_streamed(agent, text, run_config=run_config)
            async for _event in result.stream_events():
                pass

        return memory_sdk_reply
    raise ValueError(f"no layer {name!r}: one of {', '.join(LAYERS)}")


def child(args: argparse.Namespace) -> None:
    import django

    django.setup()
    one = _layer(args.child, args.port, args.tokens, args.token_delay_ms / 1000)
    if args.uvloop:
        import uvloop

        uvloop.install()
    figures = asyncio.run(_measure(one, args.concurrency, args.duration, args.warmup))
    print(json.dumps({"layer": args.child, **figures}))


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("DJANGO_SETTINGS_MODULE", "controlplane.settings")
    env.setdefault("DJANGO_SECRET_KEY", "bench-layers-only")  # no database, no sessions
    if not env.get("SECRETS_ENCRYPTION_KEYS"):
        from cryptography.fernet import Fernet

        env["SECRETS_ENCRYPTION_KEYS"] = Fernet.generate_key().decode()
    env["EGRESS_ALLOWED_NETWORKS"] = "127.0.0.0/8,::1/128"  # the fake LLM is on loopback
    return env


def measure(
    layers: list[str], *, concurrency: int, duration: float, tokens: int, delay_ms: float,
    uvloop: bool = False, warmup: float = WARMUP_S,
) -> list[dict[str, Any]]:  # fmt: skip
    """Each layer's figures, each measured in a process of its own."""
    env = _env()
    port = free_port()
    logs = BASE_DIR / "var" / "bench" / "layers"
    logs.mkdir(parents=True, exist_ok=True)
    llm = _start(
        "llm",
        [PYTHON, "-m", "bench.fakellm", "--port", str(port), "--token-delay-ms", str(delay_ms)],
        env,
        logs,
    )
    try:
        _wait_port(port, llm, "llm", logs)
        rows = []
        for layer in layers:
            argv = [
                PYTHON, "-m", "bench.layers", "--child", layer, "--port", str(port),
                "-c", str(concurrency), "--duration", str(duration), "--tokens", str(tokens),
                "--token-delay-ms", str(delay_ms), "--warmup", str(warmup),
            ]  # fmt: skip
            if uvloop:
                argv.append("--uvloop")
            out = subprocess.run(
                argv, env=env, cwd=BASE_DIR, check=True, capture_output=True, text=True
            )
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        return rows
    finally:
        llm.terminate()
        llm.wait(15)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.layers", description=__doc__.split("\n")[0]
    )
    parser.add_argument("-c", "--concurrency", type=int, default=50)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--tokens", type=int, default=20)
    parser.add_argument("--token-delay-ms", type=float, default=20.0)
    parser.add_argument("--warmup", type=float, default=WARMUP_S, help="seconds before measuring")
    parser.add_argument("--uvloop", action="store_true", help="run the loop on uvloop")
    parser.add_argument("--layers", default=",".join(LAYERS), help="comma-separated")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return
    layers = [name for name in args.layers.split(",") if name]
    unknown = [name for name in layers if name not in LAYERS]
    if unknown:
        parser.error(f"unknown layer(s) {', '.join(unknown)}: choose from {', '.join(LAYERS)}")
    rows = measure(
        layers, concurrency=args.concurrency, duration=args.duration, tokens=args.tokens,
        delay_ms=args.token_delay_ms, uvloop=args.uvloop, warmup=args.warmup,
    )  # fmt: skip
    loop = "uvloop" if args.uvloop else "asyncio"
    print(
        f"{args.concurrency} replies of {args.tokens} tokens at a time, "
        f"{args.token_delay_ms:g} ms/token, {args.duration:g} s, {loop}:\n"
    )
    print("| layer | replies | CPU ms per reply |\n| --- | --: | --: |")
    for row in rows:
        print(f"| {row['layer']} | {row['replies']} | {row['cpu_ms_per_reply']} |")


if __name__ == "__main__":
    main()
