"""The programs ``bench harvest`` runs as child processes, one per system, as source text.

Each is written to OUT/children/child_NAME.py and run by :func:`stillhouse.bench.sampling.run_child`
with the python of its system (ours, or a peer's pinned virtualenv). Each prints READY once set
up (imports, prompts read), then one JSON line: ``{"n": completed, "wall_s": seconds, ...}``.
``STARLETTE`` is a plain uvicorn+starlette fake server, for the server-capacity stage.
"""

NAIVE = r'''
import asyncio, json, sys, time
import aiohttp
url, model, C, prompts_path = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
prompts = [json.loads(l)["prompt"] for l in open(prompts_path)]
async def main():
    out = []
    it = iter(prompts)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=C)) as s:
        async def worker():
            for p in it:
                body = {"model": model, "messages": [{"role": "user", "content": p}], "max_tokens": 16}
                async with s.post(url + "/chat/completions", json=body) as r:
                    data = await r.json()
                out.append(data["choices"][0]["message"]["content"])
        print("READY", flush=True)
        t = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(C)])
        return len(out), time.perf_counter() - t
n, dt = asyncio.run(main())
print(json.dumps({"n": n, "wall_s": dt}), flush=True)
'''

BARE = r'''
import asyncio, json, sys, time
from stillhouse.distill.harvest import run_async
from stillhouse.http.client import RawHTTPTransport
url, model, C, prompts_path = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
prompts = [json.loads(l)["prompt"] for l in open(prompts_path)]
headers = {"Content-Type": "application/json"}
async def main():
    out = []
    it = iter(prompts)
    t = RawHTTPTransport(max_connections=C)
    async def worker():
        for p in it:
            body = json.dumps({"model": model, "messages": [{"role": "user", "content": p}], "max_tokens": 16})
            status, _, raw = await t("POST", url + "/chat/completions", body.encode(), headers, 120.0)
            out.append(json.loads(raw)["choices"][0]["message"]["content"])
    print("READY", flush=True)
    t0 = time.perf_counter()
    await asyncio.gather(*[worker() for _ in range(C)])
    dt = time.perf_counter() - t0
    await t.aclose()
    return len(out), dt
n, dt = run_async(main())
print(json.dumps({"n": n, "wall_s": dt}), flush=True)
'''

ANATOMY = r'''
import asyncio, glob, json, os, sys, time
url, C, dur, client, server_pid = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4], int(sys.argv[5])
from stillhouse.distill.harvest import run_async

def sched(pid):
    """(CPU ns, run-queue wait ns) summed over the threads of pid (/proc/PID/task/*/schedstat)."""
    cpu = wait = 0
    for f in glob.glob(f"/proc/{pid}/task/*/schedstat"):
        try:
            a, b, _ = open(f).read().split()
        except (OSError, ValueError):
            continue
        cpu, wait = cpu + int(a), wait + int(b)
    return cpu, wait

async def main():
    import aiohttp
    from stillhouse.http.client import RawHTTPTransport
    lats, lags, n, stop = [], [], 0, False
    raw = RawHTTPTransport(max_connections=C)
    hdr = {"Content-Type": "application/json"}
    async def lagmon():
        while not stop:
            t = time.perf_counter()
            await asyncio.sleep(0.001)
            lags.append(time.perf_counter() - t - 0.001)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=C)) as s:
        async def worker(k):
            nonlocal n
            i = k
            while not stop:
                body = {"model": "fake-model", "max_tokens": 16, "messages": [
                    {"role": "user", "content": f"What is {10 + i // 1000} + {i % 1000}? Reply with just the number."}]}
                t = time.perf_counter()
                if client == "raw":
                    _, _, b = await raw("POST", url + "/chat/completions", json.dumps(body).encode(), hdr, 60)
                    json.loads(b)
                else:
                    async with s.post(url + "/chat/completions", json=body) as r:
                        await r.json()
                lats.append(time.perf_counter() - t)
                n += 1
                i += C
        tasks = [asyncio.create_task(worker(k)) for k in range(C)] + [asyncio.create_task(lagmon())]
        await asyncio.sleep(1.0)  # warm up: connections open, phases settle
        lats.clear(); lags.clear(); n0 = n
        c0, s0, t0 = sched(os.getpid()), sched(server_pid), time.perf_counter()
        await asyncio.sleep(dur)
        c1, s1, t1, n1 = sched(os.getpid()), sched(server_pid), time.perf_counter(), n
        stop = True
        await asyncio.gather(*tasks)
    await raw.aclose()
    done, wall = n1 - n0, t1 - t0
    lats.sort(); lags.sort()
    q = lambda a, p: round(a[int(p * (len(a) - 1))] * 1000, 2) if a else 0.0
    return {"n": done, "wall_s": wall, "lat_p50_ms": q(lats, .5), "lat_p99_ms": q(lats, .99),
            "lag_p50_ms": q(lags, .5), "lag_p99_ms": q(lags, .99),
            "client_cpu_ms_per_req": round((c1[0] - c0[0]) / 1e6 / done, 4),
            "server_cpu_ms_per_req": round((s1[0] - s0[0]) / 1e6 / done, 4),
            "client_runq_ms_per_s": round((c1[1] - c0[1]) / 1e6 / wall, 1),
            "server_runq_ms_per_s": round((s1[1] - s0[1]) / 1e6 / wall, 1)}
print("READY", flush=True)
print(json.dumps(run_async(main())), flush=True)
'''

OURS = r'''
import asyncio, json, sys, time
import aiohttp  # imported before READY, like the others
from stillhouse.distill.harvest import HarvestConfig, run_async, run_harvest
url, C, prompts_path, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
cfg = HarvestConfig(prompts=prompts_path, teacher=url, out=out, concurrency=C, max_tokens=16)
print("READY", flush=True)
t = time.perf_counter()
rep = run_async(run_harvest(cfg))
dt = time.perf_counter() - t
print(json.dumps({"n": rep.stats.ok, "errors": rep.stats.errors, "wall_s": dt,
                  "request_phase_s": rep.stats.request_phase_s}), flush=True)
'''

CURATOR = r'''
import json, os, sys, time, glob
url, model, C, prompts_path, cache = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
os.environ["CURATOR_CACHE_DIR"] = cache
os.environ.setdefault("CURATOR_DISABLE_CACHE", "1")
import litellm
tok = os.path.join(os.path.dirname(litellm.__file__), "litellm_core_utils", "tokenizers")
os.environ.setdefault("TIKTOKEN_CACHE_DIR", tok)
from bespokelabs import curator
prompts = [json.loads(l)["prompt"] for l in open(prompts_path)]
llm = curator.LLM(model_name=model, backend="openai",
                  generation_params={"max_tokens": 16},
                  backend_params={"base_url": url, "api_key": "sk-bench", "max_concurrent_requests": C,
                                  "max_requests_per_minute": 10_000_000, "max_tokens_per_minute": 10_000_000_000,
                                  "max_retries": 1, "require_all_responses": False})
print("READY", flush=True)
t = time.perf_counter()
res = llm(prompts)
dt = time.perf_counter() - t
try:
    n = len(res.dataset) if hasattr(res, "dataset") else len(res)
except Exception:
    n = -1
print(json.dumps({"n": n, "wall_s": dt}), flush=True)
'''

DISTILABEL = r'''
import json, os, sys, time
url, model, C, prompts_path, cache = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
os.environ["DISTILABEL_CACHE_DIR"] = cache
from distilabel.pipeline import Pipeline
from distilabel.steps import LoadDataFromDicts
from distilabel.steps.tasks import TextGeneration
try:
    from distilabel.models import OpenAILLM
except ImportError:
    from distilabel.llms import OpenAILLM
prompts = [json.loads(l)["prompt"] for l in open(prompts_path)]
with Pipeline(name="bench-harvest", cache_dir=cache) as pipe:
    load = LoadDataFromDicts(data=[{"instruction": p} for p in prompts], batch_size=C)
    gen = TextGeneration(llm=OpenAILLM(model=model, base_url=url, api_key="sk-bench",
                                       generation_kwargs={"max_new_tokens": 16}),
                         input_batch_size=C)
    load >> gen
print("READY", flush=True)
t = time.perf_counter()
ds = pipe.run(use_cache=False)
dt = time.perf_counter() - t
n = sum(1 for r in ds["default"]["train"] if r.get("generation"))
print(json.dumps({"n": n, "wall_s": dt}), flush=True)
'''

STARLETTE = r'''
import json, sys
import uvicorn
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route

async def chat(request):
    body = json.loads(await request.body())
    last = body["messages"][-1]["content"]
    payload = {"id": "x", "object": "chat.completion", "created": 0, "model": body.get("model"),
               "choices": [{"index": 0, "message": {"role": "assistant", "content": last[:16]},
                            "finish_reason": "stop", "logprobs": None}],
               "usage": {"prompt_tokens": 10, "completion_tokens": 4, "total_tokens": 14}}
    return Response(json.dumps(payload), media_type="application/json")

app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", access_log=False, backlog=4096)
'''
