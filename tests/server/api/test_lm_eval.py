"""lm-evaluation-harness, unmodified, against a live server serving the demo bank.

Its `local-completions` model with the default tokenizer backend must find the server's own
tokenizer (`/tokenizer_info`, `/tokenize`, `/detokenize`), never the Hugging Face hub, and score
the three small tasks in `lm_eval_tasks/`, one per request type: loglikelihood, multiple choice
and generate_until with six stop strings. lm-eval runs in a subprocess, offline, once with token-id
prompts (`tokenized_requests=True`) and once with text prompts (False).

A fourth task, `hmem_elements_chat`, asks every element's atomic number as a chat question with
lm-eval's `local-chat-completions` model and `apply_chat_template`: the server renders the message
with the anchor's chat template, and the demo, trained on conversations in that template as well as
documents, must answer at least 80% of them.

Every figure lm-eval reports must be the server's own answer for the same text, asked directly:
a loglikelihood is the sum of the logprobs the server echoes for the continuation, a generation is
the server's greedy completion of the prompt with the same stop strings. So a score is the same
whichever way lm-eval sends its prompts. lm-eval tokenizes with `add_special_tokens: false`, so
its token-id prompts carry no BOS where the server adds one to a text prompt: the server must
run the two alike for that to hold.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.server.api.live import demo_settings, serving

pytestmark = pytest.mark.slow

TASK_DIR = Path(__file__).parent / "lm_eval_tasks"
LOGLIKELIHOOD = "hmem_elements_loglikelihood"
CHOICE = "hmem_elements_choice"
GENERATE = "hmem_elements_generate"
TASKS = (LOGLIKELIHOOD, CHOICE, GENERATE)
CHAT = "hmem_elements_chat"
MODES = pytest.mark.parametrize("tokenized", [True, False], ids=["token-ids", "text"])

# lm-eval's Python API in a child process, so the offline switches hold from its first import and
# nothing it loads stays in this one. argv: base URL, model name, output file. The data paths in
# the task files are relative to their folder, the child's working directory.
_RUN_LM_EVAL = """
import json, sys
import lm_eval
from lm_eval.tasks import TaskManager

base_url, model, out = sys.argv[1:4]
runs = {}
for tokenized in (True, False):
    results = lm_eval.simple_evaluate(
        model="local-completions",
        model_args=f"base_url={base_url}/v1/completions,model={model},num_concurrent=1,"
        f"max_retries=1,tokenized_requests={tokenized}",
        tasks=sys.argv[4:],
        task_manager=TaskManager(include_path=".", include_defaults=False),
        bootstrap_iters=0,
        log_samples=True,
    )
    runs[str(tokenized)] = {
        "results": results["results"],
        "samples": {
            task: [
                {"doc_id": s["doc_id"], "arguments": s["arguments"], "resps": s["resps"],
                 "target": s["target"]}
                for s in samples
            ]
            for task, samples in results["samples"].items()
        },
    }
with open(out, "w") as f:
    json.dump(runs, f, default=str)
"""

# The chat task through the chat-completions API, its messages rendered by the server. argv as
# above, then the task.
_RUN_LM_EVAL_CHAT = """
import json, sys
import lm_eval
from lm_eval.tasks import TaskManager

base_url, model, out, task = sys.argv[1:5]
results = lm_eval.simple_evaluate(
    model="local-chat-completions",
    model_args=f"base_url={base_url}/v1/chat/completions,model={model},num_concurrent=1,"
    "max_retries=1",
    tasks=[task],
    task_manager=TaskManager(include_path=".", include_defaults=False),
    apply_chat_template=True,
    bootstrap_iters=0,
    log_samples=True,
)
samples = [
    {"doc_id": s["doc_id"], "arguments": s["arguments"], "resps": s["resps"],
     "filtered_resps": s["filtered_resps"], "target": s["target"]}
    for s in results["samples"][task]
]
with open(out, "w") as f:
    json.dump({"results": results["results"], "samples": samples}, f, default=str)
"""


@dataclass
class Run:
    """One lm-eval run: its metrics per task, and per task its samples in doc order."""

    results: dict[str, dict[str, Any]]
    samples: dict[str, list[dict[str, Any]]]


@dataclass
class Server:
    """The server asked directly, the way lm-eval's requests should be answered."""

    client: httpx.Client
    model: str
    _scores: dict[tuple[str, str], tuple[float, bool]] = field(default_factory=dict)

    def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        response = self.client.post("/v1/completions", json={"model": self.model, **body})
        assert response.status_code == 200, response.text
        done: dict[str, Any] = response.json()
        return done

    def loglikelihood(self, context: str, continuation: str) -> tuple[float, bool]:
        """The continuation's logprob after the context, and whether greedy decoding writes it,
        from the logprobs the server echoes for the whole text (OpenAI's prompt logprobs)."""
        key = (context, continuation)
        if key not in self._scores:
            done = self.complete(
                {
                    "prompt": context + continuation,
                    "max_tokens": 1,
                    "temperature": 0,
                    "echo": True,
                    "logprobs": 1,
                }
            )
            lp = done["choices"][0]["logprobs"]
            start, end = len(context), len(context) + len(continuation)
            picked = [i for i, at in enumerate(lp["text_offset"]) if start <= at < end]
            assert "".join(lp["tokens"][i] for i in picked) == continuation, lp
            chosen = [lp["token_logprobs"][i] for i in picked]
            tops = [lp["top_logprobs"][i] for i in picked]
            greedy = all(c == max(top.values()) for c, top in zip(chosen, tops, strict=True))
            self._scores[key] = (sum(chosen), greedy)
        return self._scores[key]

    def generate(self, context: str, gen_kwargs: dict[str, Any]) -> str:
        done = self.complete(
            {
                "prompt": context,
                "max_tokens": gen_kwargs["max_gen_toks"],
                "temperature": 0,
                "stop": gen_kwargs["until"],
            }
        )
        text: str = done["choices"][0]["text"]
        return text


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with serving(demo_settings(tmp_path_factory.mktemp("lm_eval") / "state")) as url:
        yield url


@pytest.fixture(scope="module")
def server(base_url: str) -> Iterator[Server]:
    with httpx.Client(base_url=base_url, trust_env=False, timeout=60) as client:
        (card,) = client.get("/v1/models").json()["data"]
        yield Server(client, card["id"])


def _lm_eval(script: str, tmp: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    """lm-eval's Python API run by `script` in a child process, offline, from the task folder."""
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HOME=str(tmp / "hf"),
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
    )
    return subprocess.run(
        [sys.executable, "-c", script, *argv],
        cwd=TASK_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.fixture(scope="module")
def runs(
    base_url: str, server: Server, tmp_path_factory: pytest.TempPathFactory
) -> dict[bool, Run]:
    tmp = tmp_path_factory.mktemp("lm_eval_run")
    out = tmp / "runs.json"
    proc = _lm_eval(_RUN_LM_EVAL, tmp, base_url, server.model, str(out), *TASKS)
    assert proc.returncode == 0, f"lm-eval failed:\n{proc.stderr[-6000:]}"
    data = json.loads(out.read_text())
    return {
        tokenized: Run(data[str(tokenized)]["results"], _by_doc(data[str(tokenized)]["samples"]))
        for tokenized in (True, False)
    }


def _by_doc(samples: dict[str, list[dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    return {task: sorted(s, key=lambda x: int(x["doc_id"])) for task, s in samples.items()}


def test_lm_eval_finds_the_servers_tokenizer(
    base_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What lm-eval reads, as it reads it: without all of it, it would fall back to the hub."""
    from lm_eval.utils import check_remote_tokenizer_support

    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    assert check_remote_tokenizer_support(f"{base_url}/v1/completions")
    with httpx.Client(base_url=base_url, trust_env=False) as client:
        info = client.get("/tokenizer_info").json()
        max_len = client.get("/v1/models").json()["data"][0]["context_length"]
        text = "The atomic number of Iron is 26."
        done = client.post("/tokenize", json={"prompt": text, "add_special_tokens": False}).json()
        assert done["count"] == len(done["tokens"]) > 0
        assert done["max_model_len"] == max_len
        back = client.post("/detokenize", json={"tokens": done["tokens"]}).json()
        assert back == {"prompt": text}
        # lm-eval takes the first id of each special token's text as that token's id.
        for name in ("bos_token", "eos_token"):
            assert isinstance(info[name], str), info
            ids = client.post("/tokenize", json={"prompt": info[name], "add_special_tokens": False})
            assert len(ids.json()["tokens"]) == 1, (name, ids.json())


@MODES
def test_loglikelihoods_are_the_servers(
    runs: dict[bool, Run], server: Server, tokenized: bool
) -> None:
    wrong = []
    for task in (LOGLIKELIHOOD, CHOICE):
        for sample in runs[tokenized].samples[task]:
            for (context, continuation), resp in zip(
                sample["arguments"], sample["resps"], strict=True
            ):
                got = tuple(resp[0])
                want = server.loglikelihood(context, continuation)
                if got[0] != pytest.approx(want[0], abs=1e-3) or got[1] != want[1]:
                    wrong.append(f"{context + continuation!r}: lm-eval {got}, server {want}")
    assert not wrong, "\n".join(wrong)


@MODES
def test_generations_are_the_servers(
    runs: dict[bool, Run], server: Server, tokenized: bool
) -> None:
    wrong = []
    for sample in runs[tokenized].samples[GENERATE]:
        ((context, gen_kwargs),) = sample["arguments"]
        assert len(gen_kwargs["until"]) >= 5
        got = sample["resps"][0][0]
        want = server.generate(context, gen_kwargs)
        if got != want:
            wrong.append(f"{context!r}: lm-eval {got!r}, server {want!r}")
    assert not wrong, "\n".join(wrong)


def test_scores_do_not_depend_on_how_prompts_are_sent(
    runs: dict[bool, Run], server: Server
) -> None:
    tokens, text = runs[True].results, runs[False].results
    for task, metric in [
        (LOGLIKELIHOOD, "acc,none"),
        (LOGLIKELIHOOD, "perplexity,none"),
        (CHOICE, "acc,none"),
        (CHOICE, "acc_norm,none"),
        (GENERATE, "exact_match,none"),
    ]:
        assert tokens[task][metric] == pytest.approx(text[task][metric], rel=1e-3), (task, metric)
    # The scores are the server's: its own greedy answers, scored as exact_match scores them.
    samples = runs[False].samples[GENERATE]
    answers = [server.generate(*s["arguments"][0]) == s["target"] for s in samples]
    assert text[GENERATE]["exact_match,none"] == pytest.approx(sum(answers) / len(answers))
    # The demo bank knows most of these elements (docs/results.md): sane scores, not just equal.
    assert text[GENERATE]["exact_match,none"] >= 0.5
    assert text[LOGLIKELIHOOD]["acc,none"] >= 0.5
    assert text[CHOICE]["acc,none"] >= 0.75


def test_chat_template_run_answers_the_elements(
    base_url: str, server: Server, tmp_path: Path
) -> None:
    """lm-eval's chat run on every element: its replies are the server's own chat answers, and
    the demo's replies give at least 80% of the atomic numbers."""
    out = tmp_path / "chat.json"
    proc = _lm_eval(_RUN_LM_EVAL_CHAT, tmp_path, base_url, server.model, str(out), CHAT)
    assert proc.returncode == 0, f"lm-eval failed:\n{proc.stderr[-6000:]}"
    run = json.loads(out.read_text())
    samples = sorted(run["samples"], key=lambda s: int(s["doc_id"]))
    assert len(samples) == 118
    wrong = []
    for sample in samples:
        ((prompt, gen_kwargs),) = sample["arguments"]
        # The messages as lm-eval sent them: a JSON string (logged inside a list).
        (text,) = prompt if isinstance(prompt, list) else [prompt]
        chat = json.loads(text)
        assert chat == [{"role": "user", "content": chat[-1]["content"]}], chat
        got = sample["resps"][0][0]
        done = server.client.post(
            "/v1/chat/completions",
            json={
                "model": server.model,
                "messages": chat,
                "max_tokens": gen_kwargs["max_gen_toks"],
                "temperature": 0,
                "stop": gen_kwargs["until"],
            },
        )
        assert done.status_code == 200, done.text
        want = done.json()["choices"][0]["message"]["content"]
        if got != want:
            wrong.append(f"{chat!r}: lm-eval {got!r}, server {want!r}")
    assert not wrong, "\n".join(wrong)
    answered = [s["filtered_resps"][0] == s["target"] for s in samples]
    score = run["results"][CHAT]["exact_match,first-number"]
    assert score == pytest.approx(sum(answered) / len(answered))
    assert score >= 0.8, [s["resps"][0][0] for s in samples]
