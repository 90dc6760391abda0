"""System 5a: the paper's serving stack — two vLLM OpenAI-compatible servers on loopback (the policy
with prefix caching, the PRM as a pooling model with STEP pooling), driven by its_hub's
``ParticleFiltering`` through HTTP clients that behave like its OpenAI-compatible LM: one concurrent
``/v1/completions`` request per particle per step re-sending prompt + all steps, and one ``/pooling``
request per step re-scoring every particle's whole prefix (+ one step tag).

Token ids travel instead of text (``prompt`` as a list of ints, ``return_token_ids``), see
bench/its_hub_pf.py. The servers run from the vLLM venv (``python -m vllm.entrypoints.openai.api_server``;
the wheel's ``vllm`` console script is broken) and are started once, outside the timed region."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from pathlib import Path

from bench.common import peak_rss_mb
from bench.its_hub_pf import IdBook, make_lm, make_prm, run_its_hub_pf
from bench.workload import Checkpoints, Workload

REPO = Path(__file__).resolve().parent.parent
VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"


def vllm_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1")  # both cores (default: one, the other reserved)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.pop("PYTHONPATH", None)
    return env


def vllm_available() -> str | None:
    """None when the vLLM venv can run, else why not."""
    if not VLLM_PYTHON.exists():
        return f"{VLLM_PYTHON} not found (create it with `make bench-vllm-env`)"
    r = subprocess.run([str(VLLM_PYTHON), "-c", "import vllm, sys; print(vllm.__version__)"], capture_output=True,
                       text=True, env=vllm_env(), timeout=300)
    if r.returncode != 0:
        return f"vllm does not import in {VLLM_PYTHON}: {r.stderr.strip().splitlines()[-1:]}"
    return None


class VllmServer:
    """One ``vllm.entrypoints.openai.api_server`` process group on 127.0.0.1."""

    def __init__(self, model: str, port: int, log: Path, pooling_step_tag: int | None = None, block_size: int = 32,
                 max_model_len: int = 2048, max_num_batched_tokens: int = 16384, max_num_seqs: int = 256,
                 seed: int = 0) -> None:
        self.port, self.log_path = port, log
        cmd = [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", model,
               "--served-model-name", "m", "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
               "--enforce-eager", "--block-size", str(block_size), "--max-model-len", str(max_model_len),
               "--max-num-batched-tokens", str(max_num_batched_tokens), "--max-num-seqs", str(max_num_seqs),
               "--seed", str(seed), "--disable-log-stats", "--uvicorn-log-level", "warning"]
        if pooling_step_tag is None:
            cmd += ["--enable-prefix-caching", "--enable-prompt-tokens-details"]
        else:
            cmd += ["--runner", "pooling", "--pooler-config", json.dumps({"step_tag_id": pooling_step_tag})]
        log.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log, "w")
        self.cmd = cmd
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=vllm_env(),
                                     start_new_session=True)
        self.started = time.perf_counter()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait(self, timeout: float = 900) -> float:
        import httpx

        while time.perf_counter() - self.started < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM server on port {self.port} exited ({self.proc.returncode}); last log lines:\n"
                                   + "\n".join(self.log_path.read_text().splitlines()[-15:]))
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return time.perf_counter() - self.started
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise TimeoutError(f"vLLM server on port {self.port} not healthy after {timeout} s (log {self.log_path})")

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)  # the group this object started
                self.proc.wait(30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self._log.close()


class VllmHttpPF:
    system = "vllm-serve"

    def __init__(self, ck: Checkpoints, log_dir: Path, port: int = 8391, max_model_len: int = 2048) -> None:
        assert ck.prm_dir and ck.step_tag_id is not None, "vLLM serving needs the PRM dir (pooling model)"
        self.ck = ck
        self.variant = "separate PRM, its_hub over HTTP"
        self.policy = VllmServer(ck.policy, port, log_dir / "vllm-serve-policy.log", max_model_len=max_model_len)
        self.prm = VllmServer(ck.prm_dir, port + 1, log_dir / "vllm-serve-prm.log", pooling_step_tag=ck.step_tag_id,
                              max_model_len=max_model_len)
        self.startup_s = {"policy": self.policy.wait(), "prm": self.prm.wait()}
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(ck.policy, local_files_only=True)

    def process_groups(self) -> list[int]:
        return [self.policy.proc.pid, self.prm.proc.pid]

    def close(self) -> None:
        self.policy.stop()
        self.prm.stop()

    def _clients(self, wl: Workload, book: IdBook, counts: dict, client):
        import httpx

        async def post(url: str, body: dict):
            """POST with its_hub's client behaviour: up to 3 tries on a transport error (a keep-alive
            connection the server closed while the PRM step ran is the usual one)."""
            for attempt in range(3):
                try:
                    r = await client.post(url, json=body)
                    r.raise_for_status()
                    return r
                except httpx.TransportError:
                    counts["retries"] += 1
                    if attempt == 2:
                        raise
                    await asyncio.sleep(0.1 * (attempt + 1))

        async def one(ids: list[int], max_tokens: int, temperature: float) -> list[int]:
            body = {"model": "m", "prompt": ids, "max_tokens": max_tokens, "temperature": temperature, "top_p": 1.0,
                    "top_k": 0, "ignore_eos": True, "return_token_ids": True, "skip_special_tokens": False}
            r = await post(self.policy.url + "/v1/completions", body)
            data = r.json()
            usage = data.get("usage") or {}
            cached = ((usage.get("prompt_tokens_details") or {}).get("cached_tokens")) or 0
            counts["policy_tokens"] += len(ids) - cached + max_tokens - 1
            counts["policy_cached"] += cached
            counts["requests"] += 1
            return list(data["choices"][0]["token_ids"])

        async def generate_ids(seqs, max_tokens, temperature):
            # its_hub's OpenAI LM: one request per conversation, all in flight at once
            return await asyncio.gather(*[one(s, max_tokens, temperature) for s in seqs])

        async def score_ids(seqs):
            tag = self.ck.step_tag_id
            r = await post(self.prm.url + "/pooling",
                           {"model": "m", "input": [s + [tag] for s in seqs], "task": "token_classify"})
            data = r.json()["data"]
            counts["prm_tokens"] += sum(len(s) for s in seqs)  # vLLM does not prefix-cache STEP pooling
            counts["prm_tags"] += len(seqs)
            counts["requests"] += 1
            return [float(d["data"][-1][1]) for d in data]

        return make_lm(generate_ids, book), make_prm(score_ids, book)

    def warmup(self, wl: Workload, prompt_ids: list[list[int]]) -> None:
        from dataclasses import replace

        self.run(replace(wl, steps=1, particles=min(wl.particles, 4)), prompt_ids, seed=10_000)

    def run(self, wl: Workload, prompt_ids: list[list[int]], seed: int) -> dict:
        import httpx

        texts = wl.prompt_texts()
        book = IdBook(lambda ids: self.tokenizer.decode(ids))
        book.prompts = dict(zip(texts, prompt_ids))
        counts = {k: 0 for k in ("policy_tokens", "policy_cached", "prm_tokens", "prm_tags", "requests", "retries")}

        async def go():
            limits = httpx.Limits(max_connections=1024, max_keepalive_connections=1024)
            async with httpx.AsyncClient(timeout=600, limits=limits) as client:
                lm, prm = self._clients(wl, book, counts, client)
                return await run_its_hub_pf(lm, prm, book, wl, texts, seed)

        t0 = time.perf_counter()
        info = asyncio.run(go())
        wall = time.perf_counter() - t0
        return {"wall_s": wall, "generated_tokens": book.generated, **counts, "union_tokens": book.union(),
                "steps_used": info["steps_used"], "peak_rss_mb": peak_rss_mb()}


class VllmOfflinePF:
    """Harness side of system 5b: bench/vllm_pf.py as a worker process in the vLLM venv."""

    system = "vllm-offline"

    def __init__(self, ck: Checkpoints, log_dir: Path, max_model_len: int = 2048) -> None:
        assert ck.prm_dir and ck.step_tag_id is not None, "vLLM offline PF needs the PRM dir (pooling model)"
        self.variant = "separate PRM, LLM + LLM(runner=pooling)"
        log = log_dir / "vllm-offline.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log, "w")
        self.log_path = log
        cmd = [str(VLLM_PYTHON), str(REPO / "bench" / "vllm_pf.py"), "--policy", ck.policy, "--prm", ck.prm_dir,
               "--step-tag-id", str(ck.step_tag_id), "--max-model-len", str(max_model_len)]
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True,
                                     env=vllm_env(), start_new_session=True, bufsize=1)
        ready = self._read()
        if not ready.get("ready"):
            self.close()
            raise RuntimeError(f"vLLM offline worker failed to start: {ready.get('error')}\n{ready.get('traceback', '')}")
        self.startup_s = time.perf_counter() - t0

    def _read(self) -> dict:
        from bench.vllm_pf import PREFIX

        for line in self.proc.stdout:
            if line.startswith(PREFIX):
                return json.loads(line[len(PREFIX):])
            self._log.write(line)
        raise RuntimeError(f"vLLM offline worker exited ({self.proc.wait()}); see {self.log_path}")

    def warmup(self, wl: Workload, prompt_ids: list[list[int]]) -> None:
        from dataclasses import replace

        self.run(replace(wl, steps=1, particles=min(wl.particles, 4)), prompt_ids, seed=10_000)

    def run(self, wl: Workload, prompt_ids: list[list[int]], seed: int) -> dict:
        from dataclasses import asdict

        self.proc.stdin.write(json.dumps({"workload": asdict(wl), "prompt_ids": prompt_ids, "seed": seed}) + "\n")
        self.proc.stdin.flush()
        out = self._read()
        if "error" in out:
            raise RuntimeError(f"vLLM offline PF failed: {out['error']}\n{out.get('traceback', '')}")
        return out

    def process_groups(self) -> list[int]:
        return [self.proc.pid]

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"quit": True}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(60)
            except (BrokenPipeError, subprocess.TimeoutExpired, OSError):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self._log.close()
