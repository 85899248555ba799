"""Generate from, score with, or chat with a trained checkpoint.

    python -m jaxlm.tools.generate --workdir=/tmp/jaxlm_tiny --prompt="def" --max_new_tokens=64
    python -m jaxlm.tools.generate --workdir=DIR --prompt="import " --temperature=0.8 --top_p=0.95
    python -m jaxlm.tools.generate --workdir=DIR --prompt="def" --num_beams=4 --length_penalty=1.0
    python -m jaxlm.tools.generate --workdir=DIR --prompt="def" --draft_workdir=SMALL_RUN
    python -m jaxlm.tools.generate --workdir=DIR --prompt="def" --kv_cache=int8
    python -m jaxlm.tools.generate --workdir=DIR --score --input=texts.txt   # JSON lines out
    python -m jaxlm.tools.generate --workdir=DIR --score --input=docs.jsonl  # {"text": ...} in
    python -m jaxlm.tools.generate --workdir=SFT_RUN --chat

Flags only; the work is done by `run(options)`, which tests call directly. Every flag is
checked before the checkpoint is read, and the KV cache that the prompts and --max_new_tokens
need is checked against the free memory before it is allocated.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from typing import IO, Any

from absl import app, flags

from jaxlm.run import errors

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (or its checkpoints/ directory).")
flags.DEFINE_alias("checkpoint", "workdir")  # e.g. a convert_hf import directory
_STEP = flags.DEFINE_integer("step", -1, "Checkpoint step; -1 = the newest.")
_PROMPT = flags.DEFINE_multi_string("prompt", [], "Prompt text; repeat for a batch.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate per prompt at most.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample from the k most likely tokens (0 = off).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1 = off).")
_MIN_P = flags.DEFINE_float("min_p", 0.0, "Drop tokens below min_p * top probability (0 = off).")
_REP = flags.DEFINE_float("repetition_penalty", 1.0, "Penalty on seen tokens (1 = off).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_BEAMS = flags.DEFINE_integer("num_beams", 1, "Beam search with this many beams (1 = off).")
_LENGTH_PENALTY = flags.DEFINE_float("length_penalty", 1.0,
                                     "Finished beams score logprob / length**this (length: new "
                                     "tokens, the stop token included), as in transformers.")
# --early_stopping values -> beam search's early_stopping (transformers' True / False / "never").
EARLY_STOPPING = {"false": False, "true": True, "never": "never"}
_EARLY_STOPPING = flags.DEFINE_enum(
    "early_stopping", "false", list(EARLY_STOPPING), "Beam search stops a prompt: true = as "
    "soon as num_beams hypotheses finished; false = when no open beam can beat them at the "
    "current length; never = when none can at the full length (transformers' semantics).")
_BEST_OF = flags.DEFINE_integer("best_of", 1, "Sample this many, print the most likely.")
_DRAFT = flags.DEFINE_string("draft_workdir", "", "A smaller model's run directory: "
                             "speculative decoding with it as the draft (greedy, or sampling "
                             "with the target's distribution at --temperature > 0).")
_DRAFT_STEP = flags.DEFINE_integer("draft_step", -1, "Checkpoint step of the draft; -1 = newest.")
_NUM_DRAFT = flags.DEFINE_integer("num_draft", 4, "Draft tokens proposed per target call.")
_STOP = flags.DEFINE_multi_string("stop", [], "Extra stop token (a piece of the vocabulary); "
                                  "EOS always stops.")
_SCORE = flags.DEFINE_bool("score", False, "Print per-token log-probs of each line of --input.")
_INPUT = flags.DEFINE_string("input", None, "For --score: a text file, one text per line, or "
                             "JSON lines of {\"text\": ...} (multi-line texts such as code).")
_CHAT = flags.DEFINE_bool("chat", False, "Interactive chat with the run's chat template "
                          "(chat.*), token ids exactly as SFT rendered them.")
_SYSTEM = flags.DEFINE_string("system", "", "System message of --chat.")
_KV_CACHE = flags.DEFINE_string("kv_cache", "", "KV cache of decoding: int8 (k and v as int8 "
                                "with a scale per slot and kv head), compute (the compute "
                                "dtype); empty = the run's model.kv_cache_dtype.")
_TENSOR = flags.DEFINE_integer("tensor", 1, "Tensor-parallel mesh size (heads over devices).")
_JSON = flags.DEFINE_bool("json", False, "Print generations as JSON lines.")
_QUANTIZE = flags.DEFINE_string("quantize", "", "Quantize the weights after loading: int8, "
                                "int4, nf4 or int8_dynamic (docs/quantization.md); '' = as "
                                "stored.")
_QUANT_TILE = flags.DEFINE_integer("quant_tile_size", 0, "--quantize: inputs per scale (0 = "
                                   "one scale per output channel).")


@dataclasses.dataclass
class Options:
    workdir: str
    step: int = -1
    prompts: tuple[str, ...] = ()
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int = 0
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: str = "false"
    best_of: int = 1
    draft_workdir: str = ""
    draft_step: int = -1
    num_draft: int = 4
    stop: tuple[str, ...] = ()
    score: bool = False
    input: str | None = None
    chat: bool = False
    system: str = ""
    kv_cache: str = ""
    tensor: int = 1
    json: bool = False
    quantize: str = ""
    quant_tile_size: int = 0


def _options_from_flags() -> Options:
    return Options(
        workdir=_WORKDIR.value, step=_STEP.value, prompts=tuple(_PROMPT.value),
        max_new_tokens=_MAX_NEW.value, temperature=_TEMPERATURE.value, top_k=_TOP_K.value,
        top_p=_TOP_P.value, min_p=_MIN_P.value, repetition_penalty=_REP.value, seed=_SEED.value,
        num_beams=_BEAMS.value, length_penalty=_LENGTH_PENALTY.value,
        early_stopping=_EARLY_STOPPING.value, best_of=_BEST_OF.value,
        draft_workdir=_DRAFT.value, draft_step=_DRAFT_STEP.value, num_draft=_NUM_DRAFT.value,
        stop=tuple(_STOP.value), score=_SCORE.value, input=_INPUT.value, chat=_CHAT.value,
        system=_SYSTEM.value, kv_cache=_KV_CACHE.value, tensor=_TENSOR.value, json=_JSON.value,
        quantize=_QUANTIZE.value, quant_tile_size=_QUANT_TILE.value)


class _Session:
    """A loaded model with its tokenizer and sampler, and the prompt conventions of its run."""

    def __init__(self, opts: Options):
        from jaxlm.inference.sampler import Sampler
        from jaxlm.models.kv_cache import with_kv_cache
        from jaxlm.parallel import sharding
        from jaxlm.weights.restore import restore

        self.opts = opts
        self.mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": opts.tensor,
                                        "pipeline": 1})
        self.loaded = restore(opts.workdir, None if opts.step < 0 else opts.step, self.mesh)
        if opts.quantize:
            from jaxlm.models.quant.convert import quantize_loaded

            self.loaded = quantize_loaded(self.loaded, opts.quantize, opts.quant_tile_size,
                                          self.mesh)
        self.tok = self.loaded.tokenizer
        self.sampler = Sampler(with_kv_cache(self.loaded.model_cfg, opts.kv_cache),
                               self.loaded.params, mesh=self.mesh, pad_id=self.tok.pad_id)
        self.add_bos = bool(self.loaded.config.data.add_bos) and self.tok.bos_id >= 0
        self.stop_ids = tuple(i for i in [self.tok.eos_id] if i >= 0) + tuple(
            self._piece_id(s) for s in opts.stop)

    def _piece_id(self, piece: str) -> int:
        token = self.tok.piece_to_id(piece)
        if token == self.tok.unk_id or self.tok.id_to_piece(token) != piece:
            ids = self.tok.encode(piece)
            if len(ids) != 1:
                raise errors.ConfigError(f"--stop={piece!r} is not one token of the vocabulary "
                                 f"(it encodes to {len(ids)} tokens)")
            token = ids[0]
        return token

    def encode_prompt(self, text: str) -> list[int]:
        ids = ([self.tok.bos_id] if self.add_bos else []) + self.tok.encode(text)
        trained = int(self.loaded.config.data.seq_len)
        if len(ids) > trained and not getattr(self, "_warned_long", False):
            self._warned_long = True
            print(f"warning: a prompt of {len(ids)} tokens is longer than the {trained} tokens "
                  "the model was trained on (data.seq_len); expect worse continuations",
                  file=sys.stderr)
        return ids

    def decode_new(self, tokens: list[int]) -> str:
        return self.tok.decode([t for t in tokens if t not in self.stop_ids])

    def generate(self, texts: list[str], extra_stop: tuple[int, ...] = ()) -> list[str]:
        return self.generate_ids([self.encode_prompt(t) for t in texts], extra_stop)

    def generate_ids(self, prompts: list[list[int]], extra_stop: tuple[int, ...] = ()
                     ) -> list[str]:
        """Completions (text, stop tokens left out) of prompts given as token ids; their ids
        are in `last_tokens`."""
        from jaxlm.inference.processing import SamplingParams
        from jaxlm.inference.sampler import Request

        o = self.opts
        requests = [Request(ids, o.max_new_tokens, self.stop_ids + extra_stop)
                    for ids in prompts]
        draft = None
        if o.draft_workdir:
            from jaxlm.weights.restore import restore
            draft = restore(o.draft_workdir, None if o.draft_step < 0 else o.draft_step,
                            self.mesh)
        self.check_memory(prompts, draft.model_cfg if draft is not None else None)
        sampling = SamplingParams(o.temperature, o.top_k, o.top_p, o.min_p, o.repetition_penalty)
        self.acceptance_rate = None
        if draft is not None:
            from jaxlm.models.kv_cache import with_kv_cache

            out = self.sampler.speculative(requests, with_kv_cache(draft.model_cfg, o.kv_cache),
                                           draft.params, o.num_draft, sampling, o.seed)
            self.acceptance_rate = self.sampler.last_acceptance_rate
        elif o.num_beams > 1:
            out = [beams[0] for beams in self.sampler.beam_search(
                requests, o.num_beams, o.length_penalty, EARLY_STOPPING[o.early_stopping])]
        elif o.best_of > 1:
            out = self.sampler.best_of(requests, o.best_of, sampling, o.seed)
        else:
            out = self.sampler.generate(requests, sampling, o.seed)
        self.last_tokens = [c.tokens for c in out]
        return [self.decode_new([t for t in c.tokens if t not in extra_stop]) for c in out]


    def check_memory(self, prompts: list[list[int]], draft_cfg: Any = None) -> None:
        """Refuses, naming --max_new_tokens, prompts whose decoding would outgrow the model's
        learned position table, or whose KV cache (all rows, prompt + new tokens) would not
        fit in the memory that is free; before anything is allocated."""
        from jaxlm.models.kv_cache import with_kv_cache

        o = self.opts
        cfg = self.sampler.cfg
        longest = max(len(p) for p in prompts)
        if cfg.position_embedding == "learned" and longest + o.max_new_tokens > cfg.max_seq_len:
            raise errors.ConfigError(
                f"--max_new_tokens={o.max_new_tokens}: a prompt of {longest} tokens plus that "
                f"many new ones exceeds the model's {cfg.max_seq_len} learned positions")
        rows = len(prompts) * max(o.num_beams, o.best_of)
        length = longest + o.max_new_tokens * (o.num_draft + 1 if draft_cfg else 1)
        padded = -(-longest // self.sampler.bucket) * self.sampler.bucket
        need = decode_bytes(cfg, rows, padded, length)
        if draft_cfg is not None:
            need += decode_bytes(with_kv_cache(draft_cfg, o.kv_cache), rows, padded, length)
        free, where = free_memory(self.mesh)
        if need > free:
            raise errors.ConfigError(
                f"--max_new_tokens={o.max_new_tokens}: decoding {rows} row(s) of {length} "
                f"positions needs about {need / 2**30:.1f} GiB, more than the "
                f"{free / 2**30:.1f} GiB free {where}; ask for fewer new tokens or prompts")


def kv_cache_bytes(cfg: Any, rows: int, length: int) -> int:
    """Bytes of the KV cache of `rows` sequences of `length` positions of the model `cfg`
    (shapes only: nothing is allocated)."""
    import jax
    import numpy as np

    from jaxlm.inference.decode import TransformerLM

    shapes = jax.eval_shape(lambda: TransformerLM(cfg).init_cache(rows, length))
    return sum(int(np.prod(x.shape, dtype=np.int64)) * x.dtype.itemsize
               for x in jax.tree.leaves(shapes))


def decode_bytes(cfg: Any, rows: int, prompt: int, length: int) -> int:
    """About the device memory that decoding `rows` prompts of `prompt` tokens to `length`
    positions takes beyond the params: the KV cache twice (the decode loop's carry and its
    update) and the prefill's float32 attention scores of the prompt against the cache
    (compiled programs of a 1-layer model measured 3.5x the cache; this gives 3x)."""
    scores = rows * cfg.num_heads * prompt * length * 4
    return 2 * kv_cache_bytes(cfg, rows, length) + scores


def free_memory(mesh: Any) -> tuple[int, str]:
    """(bytes free for arrays spread over the mesh, where): the devices' free memory times
    their number on accelerators; the host's available memory on CPU."""
    devices = list(mesh.devices.flat)
    stats = [d.memory_stats() or {} for d in devices]
    if devices[0].platform != "cpu" and all("bytes_limit" in s for s in stats):
        per_device = min(s["bytes_limit"] - s.get("bytes_in_use", 0) for s in stats)
        return per_device * len(devices), f"on {len(devices)} {devices[0].platform} device(s)"
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024, "in host memory"
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "in host memory"


def read_score_input(path: str) -> list[str]:
    """The texts of a --score input: JSON lines when its first line is a JSON object with a
    "text" string (then every line must be one), else one text per non-blank line. Refused
    naming the file when it is missing, not UTF-8 text, or holds no text."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise errors.MissingFileError(f"--input={path} does not exist", path=path) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise errors.DataError(f"--input={path} is not UTF-8 text ({e.reason} at byte "
                               f"{e.start}); give one text per line or JSON lines",
                               path=path) from None
    if "\x00" in text:
        raise errors.DataError(f"--input={path} is binary (NUL bytes), not one text per line",
                               path=path)
    lines = [(n, line) for n, line in enumerate(text.split("\n"), start=1) if line.strip()]
    if not lines:
        raise errors.DataError(f"--input={path} holds no text; give one text per line",
                               path=path)

    def text_of(line: str) -> str | None:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            return None
        return row["text"] if isinstance(row, dict) and isinstance(row.get("text"), str) else None

    if text_of(lines[0][1]) is None:
        return [line for _, line in lines]
    texts = []
    for n, line in lines:
        if (value := text_of(line)) is None:
            raise errors.DataError(f'{path} line {n}: not a JSON object with a "text" string, '
                                   "as the first line is", path=path)
        texts.append(value)
    return texts


def score_lines(session: _Session, lines: list[str]) -> list[dict[str, Any]]:
    """Per-token log-probs and perplexity of each text (BOS-conditioned when the run used BOS;
    otherwise the first token has no context and is not scored)."""
    seqs = [session.encode_prompt(line) for line in lines]
    rows = []
    for line, seq, logp in zip(lines, seqs, session.sampler.score(seqs)):
        scored = seq[1:]
        values = [float(x) for x in logp]
        mean = -sum(values) / max(len(values), 1)
        rows.append({"text": line, "tokens": [session.tok.id_to_piece(t) for t in scored],
                     "token_ids": scored, "logprobs": values, "num_tokens": len(values),
                     "perplexity": math.exp(mean) if values else None})
    return rows


def chat_loop(session: _Session, stdin: IO[str], stdout: IO[str]) -> None:
    """Reads user turns from stdin (one per line; empty line or EOF ends), prints replies.

    The prompt is the run's chat template (its `chat.*` keys: markers, separators, system
    prompt, BOS) rendered piece by piece by `chat.prompt_ids`, exactly the ids SFT trained on;
    an answer ends at the template's turn_end token. A model whose template is its Hugging Face
    tokenizer's own (chat.template="tokenizer") is prompted with that Jinja template and stops
    at the tokenizer's end-of-sequence ids.
    """
    from jaxlm.data import chat

    template = chat.template_from_config(session.loaded.config.chat)
    end_id = None if template.from_tokenizer else chat.special_ids(session.tok, template)[1]
    messages = [{"role": "system", "content": session.opts.system}] if session.opts.system else []
    for line in stdin:
        if not line.strip():
            break
        messages.append({"role": "user", "content": line.rstrip("\n")})
        if end_id is None:
            prompt = chat.generation_prompt(session.tok, messages, add_bos=session.add_bos)
            reply = session.generate([prompt])[0]
        else:
            ids = [int(t) for t in chat.prompt_ids(session.tok, messages, template=template)]
            session.generate_ids([ids], extra_stop=(end_id,))
            tokens = session.last_tokens[0]
            answer = tokens[:tokens.index(end_id)] if end_id in tokens else tokens
            reply = session.decode_new(answer)
        messages.append({"role": "assistant", "content": reply})
        print(f"assistant: {reply}", file=stdout, flush=True)


def check_combination(opts: Options) -> None:
    """Refuses decoding options that cannot be combined, naming them, rather than silently
    dropping one: beam search is deterministic (no sampling, best-of or draft), best-of samples
    (it needs a temperature, and no draft)."""
    sampled = (opts.temperature > 0 or opts.top_k or opts.top_p < 1 or opts.min_p
               or opts.repetition_penalty != 1)
    clashes = [
        (opts.num_beams > 1 and opts.temperature > 0, "--num_beams with --temperature > 0"),
        (opts.num_beams > 1 and sampled, "--num_beams with sampling filters (--top_k, --top_p, "
         "--min_p, --repetition_penalty)"),
        (opts.num_beams > 1 and bool(opts.draft_workdir), "--num_beams with --draft_workdir"),
        (opts.num_beams > 1 and opts.best_of > 1, "--num_beams with --best_of"),
        (opts.best_of > 1 and bool(opts.draft_workdir), "--best_of with --draft_workdir"),
        (opts.best_of > 1 and opts.temperature == 0, "--best_of with --temperature=0 (every "
         "sample would be the same greedy decode)"),
        (bool(opts.draft_workdir) and opts.score, "--draft_workdir with --score"),
    ]
    for clash, what in clashes:
        if clash:
            raise errors.ConfigError(f"{what} cannot be combined; drop one")


def check_options(opts: Options) -> None:
    """Refuses, naming the flag, every option that is out of range or clashes with another;
    called before the checkpoint is read."""
    from jaxlm.inference.processing import SamplingParams
    from jaxlm.models.kv_cache import KV_CACHE_FLAG
    from jaxlm.models.quant.spec import from_preset

    modes = sum([bool(opts.prompts), opts.score, opts.chat])
    if modes != 1:
        raise errors.ConfigError("give exactly one of --prompt, --score (with --input) or "
                                 "--chat")
    if opts.score and not opts.input:
        raise errors.ConfigError("--score needs --input=FILE (one text per line)")
    if opts.input and not opts.score:
        raise errors.ConfigError("--input is read by --score only")
    check_combination(opts)
    if opts.kv_cache and opts.kv_cache not in KV_CACHE_FLAG:
        raise errors.ConfigError(f"--kv_cache={opts.kv_cache!r} is not one of "
                                 f"{list(KV_CACHE_FLAG)}")
    if opts.early_stopping not in EARLY_STOPPING:
        raise errors.ConfigError(f"--early_stopping={opts.early_stopping!r} is not one of "
                                 f"{list(EARLY_STOPPING)}")
    for flag, value in (("max_new_tokens", opts.max_new_tokens), ("num_beams", opts.num_beams),
                        ("best_of", opts.best_of), ("num_draft", opts.num_draft),
                        ("tensor", opts.tensor)):
        if value < 1:
            raise errors.ConfigError(f"--{flag}={value}: must be >= 1")
    if opts.quantize:
        from_preset(opts.quantize, opts.quant_tile_size)
    try:
        SamplingParams(opts.temperature, opts.top_k, opts.top_p, opts.min_p,
                       opts.repetition_penalty).check()
    except ValueError as e:
        raise errors.ConfigError(str(e).replace("sampling setting ", "--")) from None


def run(opts: Options, stdin: IO[str] = sys.stdin, stdout: IO[str] = sys.stdout) -> None:
    check_options(opts)
    texts = read_score_input(opts.input) if opts.score else []
    session = _Session(opts)
    if opts.score:
        for row in score_lines(session, texts):
            print(json.dumps(row), file=stdout)
    elif opts.chat:
        chat_loop(session, stdin, stdout)
    else:
        texts = session.generate(list(opts.prompts))
        for prompt, text, tokens in zip(opts.prompts, texts, session.last_tokens):
            if opts.json:
                row = {"prompt": prompt, "completion": text, "token_ids": tokens}
                if session.acceptance_rate is not None:
                    row["acceptance_rate"] = session.acceptance_rate
                print(json.dumps(row), file=stdout)
            else:
                print(prompt + text, file=stdout)
                print("-" * 40, file=stdout)
        if session.acceptance_rate is not None and not opts.json:
            print(f"speculative decoding: {session.acceptance_rate:.1%} of draft tokens "
                  "accepted", file=sys.stderr)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from jaxlm.run import console

    with console.quiet(None):  # orbax's restore lines and jax's backend probing stay quiet
        errors.run_main(lambda: run(_options_from_flags()))


if __name__ == "__main__":
    flags.mark_flags_as_required(["workdir"])
    app.run(main)
