"""Demo artifacts built locally: a tiny GPT-2-style model, demo Python functions, a TorchScript module.

Nothing here downloads anything: the model's weights come from a fixed seed and its
tokenizer is a byte-level BPE trained with the ``tokenizers`` library on a small built-in
English corpus. The model directory has the same layout as a production Hugging Face
model (``config.json``, ``model.safetensors``, ``tokenizer.json`` ...), so it loads with
``AutoTokenizer.from_pretrained`` + ``AutoModelForCausalLM.from_pretrained`` and exercises
the same code paths (transformers runtime, vLLM on a GPU) as a real model.
"""

from __future__ import annotations

import json
import logging
import textwrap
from pathlib import Path
from typing import Any

__all__ = [
    "DEMO_MODEL_FAMILY",
    "DEMO_MODEL_VERSION",
    "DEMO_FUNCTIONS_FAMILY",
    "DEMO_FUNCTIONS_VERSION",
    "DEMO_FUNCTIONS_CONFIG",
    "DEMO_TORCHSCRIPT_FAMILY",
    "DEMO_TORCHSCRIPT_VERSION",
    "DEMO_SEED",
    "EOS_TOKEN",
    "build_demo_model",
    "build_demo_functions",
    "build_demo_torchscript",
]

logger = logging.getLogger("mnemos.registry.demo")

DEMO_MODEL_FAMILY = "demo-gpt2"
DEMO_MODEL_VERSION = "v1"
DEMO_FUNCTIONS_FAMILY = "demo-fn"
DEMO_FUNCTIONS_VERSION = "v1"
#: How ``demo-fn:v1`` is registered: its entrypoint and the functions jobs may call by name.
DEMO_FUNCTIONS_CONFIG: dict[str, Any] = {
    "entrypoint": "functions.py:echo",
    "functions": ["echo", "noop", "add", "sleep", "fail", "stream_words", "count", "flaky"],
}
DEMO_TORCHSCRIPT_FAMILY = "demo-linear"
DEMO_TORCHSCRIPT_VERSION = "v1"
DEMO_SEED = 1234
#: The one special token: beginning/end of text, padding and unknown (as in GPT-2).
EOS_TOKEN = "<|endoftext|>"

_VOCAB_SIZE = 800
_N_POSITIONS = 1024
_N_EMBD = 64
_N_LAYER = 2
_N_HEAD = 2
#: Std of the output head's weights: large enough that the untrained model's next-token
#: distribution is peaked (logits spread ~3), so sampled text is not uniform noise.
_LM_HEAD_STD = 0.4

# Public-domain style English prose; enough distinct words for a few hundred BPE merges.
_CORPUS = """
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a
single step. It was the best of times, it was the worst of times, it was the age of wisdom,
it was the age of foolishness. All happy families are alike; each unhappy family is unhappy
in its own way. Call me Ishmael. Some years ago, never mind how long precisely, having little
or no money in my purse, and nothing particular to interest me on shore, I thought I would
sail about a little and see the watery part of the world. In the beginning the universe was
created. This has made a lot of people very angry and been widely regarded as a bad move.
The sky above the port was the color of television, tuned to a dead channel. It is a truth
universally acknowledged, that a single man in possession of a good fortune, must be in want
of a wife. Once upon a time there was a little girl who lived in a village near the forest.
Whenever she went out, the little girl wore a red riding cloak, so everyone in the village
called her Little Red Riding Hood. The worker pulls a job from the queue, loads the model
into memory, runs the inference, and streams every token back to the client as soon as it
is generated. Machines learn from data; models predict the next word; engineers measure
latency, throughput, memory and cost. We choose to go to the moon in this decade and do the
other things, not because they are easy, but because they are hard. To be, or not to be,
that is the question: whether it is nobler in the mind to suffer the slings and arrows of
outrageous fortune, or to take arms against a sea of troubles. The rain in Spain stays
mainly in the plain. Four score and seven years ago our fathers brought forth on this
continent a new nation, conceived in liberty. Hello world! How are you today? I am fine,
thank you, and you? Numbers like 0 1 2 3 4 5 6 7 8 9 10 42 100 2024 appear in text too.
Questions, answers, stories, poems, recipes, letters, reports and songs are all made of
words, and words are made of letters, and letters are made of bytes.
"""


def _train_tokenizer() -> object:
    """Train a byte-level BPE (GPT-2 style) on the built-in corpus; deterministic."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=_VOCAB_SIZE,
        min_frequency=1,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Several copies so pair counts dominate ties; one line per sentence keeps it fast.
    lines = [line.strip() for line in _CORPUS.strip().splitlines() if line.strip()]
    tok.train_from_iterator(lines * 4, trainer=trainer)
    return tok


def build_demo_model(dest: Path) -> Path:
    """Write the tiny demo causal LM and its tokenizer into ``dest`` and return ``dest``.

    The configuration is fixed and the weights come from :data:`DEMO_SEED`, so every build
    gives the same model. The output head's rows for end-of-text and for tokens that are
    not printable ASCII (raw control or partial UTF-8 bytes) are zero, so their logits are
    exactly 0 while the others are spread wide: the untrained model rarely ends early (so
    streaming and cancellation are observable on long outputs) and writes readable text.
    """
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)

    tokenizer: Any = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=_train_tokenizer(),
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        model_max_length=_N_POSITIONS,
    )
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    if not isinstance(eos_id, int):
        raise RuntimeError(f"demo tokenizer has no {EOS_TOKEN} token")

    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=_N_POSITIONS,
        n_embd=_N_EMBD,
        n_layer=_N_LAYER,
        n_head=_N_HEAD,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        tie_word_embeddings=False,
    )
    # fork_rng: building the demo must not change the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(DEMO_SEED)
        model = GPT2LMHeadModel(config)
        with torch.no_grad():
            model.lm_head.weight.normal_(0.0, _LM_HEAD_STD)
            model.lm_head.weight[_rare_token_ids(tokenizer)] = 0.0
    model.eval()  # type: ignore[no-untyped-call]
    model.generation_config.pad_token_id = eos_id
    model.generation_config.eos_token_id = eos_id
    model.generation_config.bos_token_id = eos_id

    model.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)
    _portable_tokenizer_config(dest / "tokenizer_config.json")
    logger.info("built demo model %s:%s in %s", DEMO_MODEL_FAMILY, DEMO_MODEL_VERSION, dest)
    return dest


def _rare_token_ids(tokenizer: Any) -> list[int]:
    """Ids of end-of-text and of tokens that do not decode to printable ASCII."""
    rare = []
    for token_id in range(len(tokenizer)):
        text = tokenizer.decode([token_id])
        if token_id == tokenizer.eos_token_id or not (text.isascii() and text.isprintable()):
            rare.append(token_id)
    return rare


def _portable_tokenizer_config(path: Path) -> None:
    """Name the tokenizer class every transformers release knows (4.x and 5.x, and vLLM).

    transformers 5 writes its new ``TokenizersBackend`` class name, which 4.x (the one a
    vLLM install may pin) cannot resolve; ``PreTrainedTokenizerFast`` loads the same
    ``tokenizer.json`` on both.
    """
    config = json.loads(path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config.pop("backend", None)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


_FUNCTIONS_SOURCE = '''\
"""MNEMOS demo functions, run by the ``python`` runtime (entrypoint ``functions.py:<name>``)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any


def echo(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """Return the call's arguments."""
    return {"args": list(args), "kwargs": kwargs}


async def noop() -> None:
    """Do nothing (measures platform overhead; async, so no thread hop)."""
    return None


def add(a: float, b: float) -> float:
    """Add two numbers."""
    return a + b


async def sleep(seconds: float) -> float:
    """Sleep without blocking the worker, then return ``seconds``."""
    await asyncio.sleep(seconds)
    return seconds


def fail(message: str = "boom") -> None:
    """Raise, to exercise error reporting and retries."""
    raise RuntimeError(message)


async def stream_words(text: str, delay: float = 0.0) -> AsyncIterator[str]:
    """Stream ``text`` word by word (each word is one chunk, with its trailing space)."""
    words = text.split()
    for i, word in enumerate(words):
        if delay:
            await asyncio.sleep(delay)
        yield word + (" " if i < len(words) - 1 else "")


def count(n: int) -> Iterator[int]:
    """Yield 0 .. n-1 (a sync generator; each number is a data chunk)."""
    for i in range(n):
        yield i


_calls: dict[str, int] = {}


def flaky(key: str, failures: int) -> int:
    """Fail the first ``failures`` calls for ``key`` in this worker process, then return the
    number of calls (exercises retries: list ``execution_error`` in ``retry_on_errors``)."""
    _calls[key] = _calls.get(key, 0) + 1
    if _calls[key] <= failures:
        raise RuntimeError(f"flaky call {_calls[key]} of {key} fails")
    return _calls[key]
'''


def build_demo_functions(dest: Path) -> Path:
    """Write ``functions.py`` with the demo callables into ``dest`` and return ``dest``."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "functions.py").write_text(textwrap.dedent(_FUNCTIONS_SOURCE), encoding="utf-8")
    logger.info("built demo functions %s:%s in %s", DEMO_FUNCTIONS_FAMILY, DEMO_FUNCTIONS_VERSION, dest)
    return dest


def build_demo_torchscript(dest: Path) -> Path:
    """Write a TorchScript ``Linear(4, 2)`` (fixed seed) as ``dest/model.pt``; return ``dest``."""
    import torch

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(DEMO_SEED)
        module = torch.nn.Linear(4, 2)
    module.eval()
    scripted = torch.jit.script(module)
    scripted.save(str(dest / "model.pt"))  # type: ignore[no-untyped-call]
    logger.info("built demo TorchScript module %s:%s in %s", DEMO_TORCHSCRIPT_FAMILY, DEMO_TORCHSCRIPT_VERSION, dest)
    return dest
