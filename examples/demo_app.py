"""The demo app ``make up`` deploys: a function, and the demo model as a class.

    mnemos run examples/demo_app.py::add 2 3
    mnemos run examples/demo_app.py::Generator.generate "Once upon a time"

``Generator`` loads the tiny demo GPT-2 (``demo-gpt2:v1``, registered by ``make up``) once
per worker process in its ``@mnemos.enter`` method, streams tokens from ``generate`` and
embeds texts in batches: calls of ``embed`` made by any clients within 10 ms of each other
run as one forward pass of up to 8 texts (``embed_one`` is the same without batching).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import mnemos

app = mnemos.App("demo")


@app.function(timeout=60, retries=2, max_concurrency=8)
def add(a: int, b: int) -> int:
    """The sum of two numbers."""
    return a + b


@app.cls(runtime="transformers", max_concurrency=8, scaledown_window=120)
class Generator:
    """The demo model: streaming generation and batched embeddings."""

    @mnemos.enter()
    def load(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = mnemos.model_path("demo-gpt2:v1")  # from the worker's disk cache
        self.torch: Any = torch
        self.tokenizer: Any = AutoTokenizer.from_pretrained(path)
        self.model: Any = AutoModelForCausalLM.from_pretrained(path)
        self.model.eval()

    @mnemos.method()
    def generate(self, prompt: str, max_tokens: int = 32, seed: int = 0) -> Iterator[str]:
        """Stream the continuation of ``prompt`` token by token (sampled with ``seed``)."""
        torch = self.torch
        rng = torch.Generator().manual_seed(seed)
        ids = self.tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            for _ in range(max_tokens):  # the whole sequence each step: tiny model, no cache API to track
                logits = self.model(input_ids=ids).logits[0, -1]
                token = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=rng)
                if int(token) == self.tokenizer.eos_token_id:
                    return
                ids = torch.cat([ids, token[None]], dim=1)
                yield self.tokenizer.decode(token)

    @mnemos.batched(max_batch_size=8, wait_ms=10)
    def embed(self, texts: list[str]) -> list[list[float]]:
        """The mean of the last hidden states of each text: one forward pass per batch."""
        torch = self.torch
        batch = self.tokenizer(texts, return_tensors="pt", padding=True)
        with torch.no_grad():
            hidden = self.model(**batch, output_hidden_states=True).hidden_states[-1]
        mask = batch["attention_mask"].unsqueeze(-1)
        return ((hidden * mask).sum(dim=1) / mask.sum(dim=1)).tolist()  # type: ignore[no-any-return]

    @mnemos.method()
    def embed_one(self, text: str) -> list[float]:
        """``embed`` of one text, one forward pass per call (the baseline batching beats)."""
        return self.embed([text])[0]
