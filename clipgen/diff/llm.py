"""Optional LLM backend (off by default): paraphrase hypotheses and act as the diffing paper's autorater.

Judging stays programmatic (verify.py): the LLM only rewrites a hypothesis's text and rates its interestingness
and abstraction (1-5), and we report how well those ratings agree with the rule-based scores (scores.py).

Backends (``diff.llm_backend``):
- ``none`` (default): nothing is imported or contacted.
- ``openai``: an OpenAI-compatible chat endpoint on this machine (``diff.llm_endpoint``, e.g. llama.cpp's
  ``llama-server`` at http://127.0.0.1:8080/v1); any host other than localhost / 127.0.0.1 / ::1 is refused.
- ``llama_cpp``: a local GGUF model file (``diff.llm_model_path``) through the ``llama_cpp`` package, if it is
  installed. Nothing is ever downloaded: a missing file or package is an error naming it.
"""
from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from clipgen.errors import ClipgenError

BACKENDS = ("none", "openai", "llama_cpp")
_LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1"}

PARAPHRASE_PROMPT = ("Rewrite this finding about two image classifiers (run A and run B) as one clear sentence for "
                     "a machine-learning researcher. Keep every class, domain and run name. Reply with the "
                     "sentence only.\n\nFinding: {text}")
RATE_PROMPT = ("You rate hypotheses about how two CLIP models (run A, run B) trained on different data mixtures "
               "behave differently. Rate on 1-5 scales:\n"
               "interestingness: 1 = trivial or expected from the training-data design, 5 = surprising, impactful "
               "and actionable;\n"
               "abstraction: 1 = a narrow, concrete observation about a few images, 5 = a broad, general "
               "behavioural pattern.\n"
               'Reply with JSON only, e.g. {{"interestingness": 3, "abstraction": 2}}.\n\nHypothesis: {text}')


class LLM:
    def __init__(self, backend: str, endpoint: str | None = None, model: str | None = None,
                 model_path: str | None = None, timeout: float = 60.0, max_tokens: int = 128):
        if backend not in BACKENDS:
            raise ClipgenError(f"diff.llm_backend={backend!r}: expected one of {', '.join(BACKENDS)}")
        self.backend, self.model, self.timeout, self.max_tokens = backend, model, timeout, max_tokens
        self._llama = None
        if backend == "openai":
            host = urlparse(endpoint or "").hostname
            if host not in _LOCAL_HOSTS:
                raise ClipgenError(f"diff.llm_endpoint={endpoint!r}: expected an OpenAI-compatible endpoint on "
                                   "localhost (e.g. http://127.0.0.1:8080/v1); remote hosts are never contacted")
            self.url = endpoint.rstrip("/") + "/chat/completions"
        elif backend == "llama_cpp":
            if not model_path or not Path(model_path).is_file():
                raise ClipgenError(f"diff.llm_model_path={model_path!r}: expected an existing local GGUF file "
                                   "(nothing is downloaded)")
            try:
                from llama_cpp import Llama
            except ImportError:
                raise ClipgenError("diff.llm_backend=llama_cpp needs the llama_cpp package (llama-cpp-python), "
                                   "which is not installed: install it or use diff.llm_backend=openai with a "
                                   "local llama-server") from None
            self._llama = Llama(model_path=str(model_path), n_ctx=2048, verbose=False, seed=0)

    def chat(self, prompt: str) -> str:
        messages = [{"role": "user", "content": prompt}]
        if self._llama is not None:
            out = self._llama.create_chat_completion(messages=messages, temperature=0.0, max_tokens=self.max_tokens)
            return str(out["choices"][0]["message"]["content"]).strip()
        body = json.dumps({"model": self.model or "local", "messages": messages, "temperature": 0.0,
                           "max_tokens": self.max_tokens}).encode("utf-8")
        req = urllib.request.Request(self.url, data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                data = json.loads(resp.read().decode("utf-8"))
            return str(data["choices"][0]["message"]["content"]).strip()
        except (urllib.error.URLError, OSError, KeyError, IndexError, json.JSONDecodeError) as e:
            raise ClipgenError(f"diff.llm_endpoint {self.url!r} gave no chat completion ({e})") from None


def parse_rating(reply: str) -> dict | None:
    """``{"interestingness": i, "abstraction": a}`` (integers 1-5) from a reply, or None if it has none."""
    m = re.search(r"\{.*?\}", reply, flags=re.S)
    try:
        obj = json.loads(m.group(0)) if m else {}
    except json.JSONDecodeError:
        obj = {}
    out = {}
    for k in ("interestingness", "abstraction"):
        v = obj.get(k)
        if v is None:
            mm = re.search(rf"{k}\D{{0,5}}([1-5])", reply, flags=re.I)
            v = mm.group(1) if mm else None
        try:
            v = int(v)
        except (TypeError, ValueError):
            return None
        if not 1 <= v <= 5:
            return None
        out[k] = v
    return out


def agreement(rule: list[int], llm: list[int]) -> dict:
    """Exact agreement, agreement within one point, mean absolute difference and Spearman correlation."""
    from scipy.stats import spearmanr

    r, l_ = np.asarray(rule, dtype=float), np.asarray(llm, dtype=float)
    if len(r) == 0:
        return {"n": 0, "exact": None, "within_1": None, "mean_abs_diff": None, "spearman": None}
    rho = spearmanr(r, l_).statistic if len(r) > 1 and r.std() > 0 and l_.std() > 0 else float("nan")
    return {"n": int(len(r)), "exact": float((r == l_).mean()), "within_1": float((np.abs(r - l_) <= 1).mean()),
            "mean_abs_diff": float(np.abs(r - l_).mean()), "spearman": None if np.isnan(rho) else float(rho)}


def annotate(hyps: list[dict], llm: LLM) -> dict:
    """Adds ``paraphrase`` and ``llm_rating`` to every hypothesis; returns the agreement with the rule-based
    scores per scale."""
    pairs = {"interestingness": ([], []), "abstraction": ([], [])}
    for h in hyps:
        h["paraphrase"] = llm.chat(PARAPHRASE_PROMPT.format(text=h["text"]))
        rating = parse_rating(llm.chat(RATE_PROMPT.format(text=h["text"])))
        h["llm_rating"] = rating
        if rating:
            for k, (rule, other) in pairs.items():
                rule.append(h[k]["score"])
                other.append(rating[k])
    return {k: agreement(*v) for k, v in pairs.items()}
