"""A thin layer over Hugging Face `tokenizers`: train, load, save, encode/decode, special ids.

All tokenization is done by the Rust `tokenizers` library; this module only
records which token plays which role (pad, bos, eos, ...) and reads/writes the
Hugging Face file layout (`tokenizer.json` + `tokenizer_config.json`).
"""
from __future__ import annotations

import codecs
import json
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

from lmforge.atomic import atomic_write
from lmforge.progress import say

ROLES = ("pad", "bos", "eos", "unk", "cls", "sep", "mask")
# Well-known token strings, used to guess roles when a tokenizer.json comes without a config.
_KNOWN = {"[PAD]": "pad", "<pad>": "pad", "[UNK]": "unk", "<unk>": "unk", "[CLS]": "cls", "[SEP]": "sep",
          "[MASK]": "mask", "<mask>": "mask", "<s>": "bos", "</s>": "eos", "<|endoftext|>": "eos"}


class Tokenizer:
    """A `tokenizers.Tokenizer` (`.hf`) plus special-token roles and an optional chat template."""

    def __init__(self, hf: HFTokenizer, special_tokens: dict[str, str], chat_template: str | None = None,
                 model_max_length: int | None = None):
        unknown = set(special_tokens) - set(ROLES)
        if unknown:
            raise ValueError(f"special_tokens has unknown roles {sorted(unknown)}; allowed: {ROLES}")
        missing = [t for t in special_tokens.values() if hf.token_to_id(t) is None]
        if missing:
            raise ValueError(f"special tokens {missing} are not in the vocabulary")
        self.hf, self.special_tokens = hf, dict(special_tokens)
        self.chat_template, self.model_max_length = chat_template, model_max_length

    @classmethod
    def from_hf(cls, hf: HFTokenizer, special_tokens: dict[str, str], chat_template: str | None = None) -> Tokenizer:
        """Wrap an existing `tokenizers.Tokenizer`; `special_tokens` maps role -> token string."""
        return cls(hf, special_tokens, chat_template)

    # ---- ids -------------------------------------------------------------------------------
    def _role_id(self, role: str) -> int | None:
        token = self.special_tokens.get(role)
        return None if token is None else self.hf.token_to_id(token)

    pad_id = property(lambda self: self._role_id("pad"))
    bos_id = property(lambda self: self._role_id("bos"))
    eos_id = property(lambda self: self._role_id("eos"))
    unk_id = property(lambda self: self._role_id("unk"))
    cls_id = property(lambda self: self._role_id("cls"))
    sep_id = property(lambda self: self._role_id("sep"))
    mask_id = property(lambda self: self._role_id("mask"))

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    @property
    def sentinel_ids(self) -> list[int]:
        """Ids of `<extra_id_0>`, `<extra_id_1>`, ... in that order (T5 span-corruption sentinels)."""
        ids = []
        while (i := self.hf.token_to_id(f"<extra_id_{len(ids)}>")) is not None:
            ids.append(i)
        return ids

    @property
    def special_ids(self) -> frozenset[int]:
        added = {i for i, tok in self.hf.get_added_tokens_decoder().items() if tok.special}
        roles = {self.hf.token_to_id(t) for t in self.special_tokens.values()}
        return frozenset(added | roles | set(self.sentinel_ids))

    def token_to_id(self, token: str) -> int | None:
        return self.hf.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.hf.id_to_token(int(i))

    # ---- encode / decode ---------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.hf.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def encode_pair(self, a: str, b: str) -> tuple[list[int], list[int]]:
        """Encode a sentence pair with the post-processor's pair template; returns (ids, token_type_ids)."""
        enc = self.hf.encode(a, b)
        return enc.ids, enc.type_ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def decode_batch(self, batch: Iterable[Iterable[int]], skip_special_tokens: bool = True) -> list[str]:
        return self.hf.decode_batch([[int(i) for i in ids] for ids in batch], skip_special_tokens=skip_special_tokens)

    # ---- files -------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> None:
        """Write `tokenizer.json` and `tokenizer_config.json` (each atomically), loadable by HF
        `AutoTokenizer` too."""
        directory = Path(directory)
        atomic_write(directory / "tokenizer.json", lambda tmp: self.hf.save(str(tmp)))
        config = {"tokenizer_class": "PreTrainedTokenizerFast"}
        config.update({f"{role}_token": tok for role, tok in self.special_tokens.items()})
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        if self.model_max_length is not None:
            config["model_max_length"] = self.model_max_length
        text = json.dumps(config, indent=2, ensure_ascii=False)
        atomic_write(directory / "tokenizer_config.json", lambda tmp: Path(tmp).write_text(text))

    @classmethod
    def load(cls, directory: str | Path) -> Tokenizer:
        """Load a directory written by `save` or a Hugging Face model directory (tokenizer.json or BERT vocab.txt)."""
        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"tokenizer directory {directory} does not exist")
        config = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the config wins
            if (directory / name).is_file():
                config.update(_json_object(directory / name))
        roles = {}
        for role in ROLES:
            value = config.get(f"{role}_token")
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                roles[role] = value
        template = config.get("chat_template")
        if template is None and (directory / "chat_template.jinja").is_file():
            template = (directory / "chat_template.jinja").read_text(encoding="utf-8")
        if (directory / "tokenizer.json").is_file():
            try:
                hf = HFTokenizer.from_file(str(directory / "tokenizer.json"))
            except Exception as e:  # the Rust library raises a bare Exception on a damaged file
                raise ValueError(f"{directory / 'tokenizer.json'}: not a readable tokenizer file: {e}") from None
            hf.no_padding(), hf.no_truncation()  # as HF transformers does: padding is done per batch, by pad_batch
        elif (directory / "vocab.txt").is_file():
            hf = _bert_from_vocab(directory / "vocab.txt", config)
            roles = {**{"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"}, **roles}
        else:
            raise FileNotFoundError(f"no tokenizer in {directory}: looked for tokenizer.json and vocab.txt")
        if not roles:  # a bare tokenizer.json: guess roles from well-known special tokens
            for tok in hf.get_added_tokens_decoder().values():
                if tok.special and tok.content in _KNOWN:
                    roles.setdefault(_KNOWN[tok.content], tok.content)
        roles = {r: t for r, t in roles.items() if hf.token_to_id(t) is not None}
        max_len = config.get("model_max_length")
        max_len = max_len if isinstance(max_len, int) and max_len < 10**9 else None  # HF uses 1e30 for "unset"
        return cls(hf, roles, template, max_len)


def _json_object(path: Path) -> dict:
    """A JSON object from a file; anything else is a ValueError naming the file."""
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:  # bad JSON, or bytes that are not UTF-8
        raise ValueError(f"{path}: not a readable JSON file: {e}") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(d).__name__}")
    return d


def _bert_from_vocab(vocab_file: Path, config: dict) -> HFTokenizer:
    """BERT's WordPiece pipeline built from a `vocab.txt`, as HF's BertTokenizerFast converter does."""
    unk, cls_, sep = (config.get(f"{r}_token", d) for r, d in (("unk", "[UNK]"), ("cls", "[CLS]"), ("sep", "[SEP]")))
    hf = HFTokenizer(models.WordPiece(models.WordPiece.read_file(str(vocab_file)), unk_token=unk))
    hf.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=config.get("tokenize_chinese_chars", True),
        strip_accents=config.get("strip_accents"), lowercase=config.get("do_lower_case", True))
    hf.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    hf.decoder = decoders.WordPiece(prefix="##")
    specials = [config.get(f"{r}_token", d) for r, d in (("pad", "[PAD]"), ("unk", unk), ("cls", cls_),
                                                          ("sep", sep), ("mask", "[MASK]"))]
    hf.add_special_tokens([t for t in specials if hf.token_to_id(t) is not None])
    hf.post_processor = _template(f"{cls_} $A {sep}", f"{cls_} $A {sep} $B:1 {sep}:1", hf)
    return hf


def _template(single: str, pair: str, hf: HFTokenizer) -> processors.TemplateProcessing:
    tokens = {t for t in (single + " " + pair).split() if not t.startswith("$")}
    tokens = {t.split(":")[0] for t in tokens}
    return processors.TemplateProcessing(single=single, pair=pair,
                                         special_tokens=[(t, hf.token_to_id(t)) for t in sorted(tokens)])


# ---- training ------------------------------------------------------------------------------
# family -> (special tokens in id order, role -> token, single template, pair template)
_FAMILIES = {
    "decoder": (["<|endoftext|>"], {r: "<|endoftext|>" for r in ("bos", "eos", "pad", "unk")}, None, None),
    "encoder": (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
                {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"},
                "[CLS] $A [SEP]", "[CLS] $A [SEP] $B:1 [SEP]:1"),
    "encoder-decoder": (["<pad>", "<s>", "</s>", "<unk>"],
                        {"pad": "<pad>", "bos": "<s>", "eos": "</s>", "unk": "<unk>"},
                        "$A </s>", "$A </s> $B:1 </s>:1"),
    "t5": (["<pad>", "</s>", "<unk>"], {"pad": "<pad>", "eos": "</s>", "unk": "<unk>"},
           "$A </s>", "$A </s> $B:1 </s>:1"),
    "bart": (["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
             {"bos": "<s>", "pad": "<pad>", "eos": "</s>", "unk": "<unk>", "mask": "<mask>",
              "cls": "<s>", "sep": "</s>"},
             "<s> $A </s>", "<s> $A </s> </s> $B </s>"),
}


def _pipeline(kind: str, family: str, vocab_size: int, min_frequency: int, lowercase: bool, n_sentinels: int,
              progress: bool = True):
    """An untrained `tokenizers.Tokenizer`, its trainer and the role map for a kind x family."""
    if family not in _FAMILIES:
        raise ValueError(f"family={family!r}; expected one of {sorted(_FAMILIES)}")
    specials, roles, single, pair = _FAMILIES[family]
    progress = progress and sys.stderr.isatty()  # the trainers' bar writes blank lines to a pipe or file
    specials = specials + [f"<extra_id_{i}>" for i in range(n_sentinels if family == "t5" else 0)]
    unk = roles["unk"]
    if kind == "bpe":  # GPT-2 byte-level BPE: 256 byte symbols, never an unknown token
        if vocab_size < 256 + len(specials):
            raise ValueError(f"vocab_size={vocab_size} is smaller than {len(specials)} special tokens + 256 bytes")
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=progress)
    elif kind == "wordpiece":  # BERT
        hf = HFTokenizer(models.WordPiece(unk_token=unk))
        hf.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
        hf.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        hf.decoder = decoders.WordPiece(prefix="##")
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
                                            show_progress=progress)
    elif kind == "unigram":  # T5 / SentencePiece
        hf = HFTokenizer(models.Unigram())
        hf.normalizer = normalizers.Sequence([normalizers.NFKC()] + ([normalizers.Lowercase()] if lowercase else []))
        hf.pre_tokenizer = pre_tokenizers.Metaspace()
        hf.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=specials, unk_token=unk,
                                          show_progress=progress)
    else:
        raise ValueError(f"kind={kind!r}; expected 'bpe', 'wordpiece' or 'unigram'")
    if lowercase and kind == "bpe":
        hf.normalizer = normalizers.Lowercase()
    return hf, trainer, roles, (single, pair), len(specials)


def _finish(hf, roles, templates, n_special, vocab_size, kind) -> Tokenizer:
    if hf.get_vocab_size() > vocab_size:  # trainers keep the whole alphabet even past vocab_size
        raise ValueError(f"vocab_size={vocab_size} is smaller than {n_special} special tokens + the "
                         f"alphabet of the corpus (needs {hf.get_vocab_size()} for {kind})")
    if templates[0] is not None:
        hf.post_processor = _template(*templates, hf)
    return Tokenizer(hf, roles)


def _say(on: bool, line: str) -> float:
    """Print a progress line on stderr (plain, so a log file gets it too); returns the time."""
    if on:
        say(line)
    return time.time()


# A longer line is refused by check_text_file and lmforge.data.corpus.text_lines: it is minified
# or binary data, not text, and reading it whole would hold it all in memory.
MAX_LINE_BYTES = 16 << 20


def check_text_file(path: Path) -> None:
    """Raise if `path` is missing, empty, binary (NUL bytes), not UTF-8 or has a line longer than
    MAX_LINE_BYTES, naming the file, the line and the byte offset."""
    if not path.is_file():
        raise FileNotFoundError(f"training file {path} does not exist")
    decoder, offset, lines, content = codecs.getincrementaldecoder("utf-8")(), 0, 0, False
    newline, run = b"\n", 0  # run: bytes since the last newline
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):  # a chunk is shorter than MAX_LINE_BYTES: only a line across chunks can exceed it
            first = chunk.find(newline)
            if run + (len(chunk) if first < 0 else first) > MAX_LINE_BYTES:
                raise ValueError(f"{path}: line {lines + 1} (byte offset {offset - run}) is longer than "
                                 f"{MAX_LINE_BYTES:,} bytes; lines of text are expected (split the file)")
            run = run + len(chunk) if first < 0 else len(chunk) - chunk.rfind(newline) - 1
            if (nul := chunk.find(b"\0")) >= 0:
                raise ValueError(f"{path} looks binary: NUL byte at offset {offset + nul} "
                                 f"(line {lines + chunk.count(newline, 0, nul) + 1})")
            held = len(decoder.getstate()[0])  # bytes of a character cut by the previous chunk
            try:
                content |= bool(decoder.decode(chunk).strip())
            except UnicodeDecodeError as e:
                at = offset - held + e.start
                line = lines + chunk.count(newline, 0, max(at - offset, 0)) + 1
                raise ValueError(f"{path} is not valid UTF-8: line {line}, byte offset {at}; "
                                 f"save it as UTF-8") from None
            offset += len(chunk)
            lines += chunk.count(newline)
    if pending := decoder.getstate()[0]:  # the file ends inside a multi-byte character
        raise ValueError(f"{path} is not valid UTF-8: truncated character at byte offset {offset - len(pending)} "
                         f"(line {lines + 1})")
    if not content:
        raise ValueError(f"training file {path} is empty")


def train_tokenizer(files: str | Path | Iterable[str | Path], kind: str, vocab_size: int, family: str = "decoder",
                    min_frequency: int = 2, lowercase: bool = False, n_sentinels: int = 100,
                    progress: bool = True) -> Tokenizer:
    """Train a tokenizer on text files. kind: "bpe" | "wordpiece" | "unigram";
    family: "decoder" | "encoder" | "encoder-decoder" | "t5" | "bart" picks the special tokens and template.
    progress: a line on stderr before and after (and the trainer's bar on a terminal)."""
    files = [Path(files)] if isinstance(files, (str, Path)) else [Path(f) for f in files]
    if not files:
        raise ValueError("files is empty: no training files given")
    for f in files:
        check_text_file(f)
    hf, trainer, roles, templates, n_special = _pipeline(kind, family, vocab_size, min_frequency, lowercase,
                                                         n_sentinels, progress)
    size = sum(f.stat().st_size for f in files)
    started = _say(progress, f"training a {kind} tokenizer (vocab {vocab_size}) on {len(files)} "
                             f"file{'s' * (len(files) != 1)} ({size / 1e6:.1f} MB)...")
    try:
        hf.train([str(f) for f in files], trainer)
    except Exception as e:  # e.g. Unigram: "The vocabulary is not large enough to contain all chars"
        raise ValueError(f"training a {kind} tokenizer with vocab_size={vocab_size} failed: {e}") from e
    tok = _finish(hf, roles, templates, n_special, vocab_size, kind)
    _say(progress, f"done: {kind} tokenizer with a vocabulary of {tok.vocab_size} in {time.time() - started:.1f} s")
    return tok


def train_tokenizer_from_iterator(texts: Iterable[str], kind: str, vocab_size: int, family: str = "decoder",
                                  min_frequency: int = 2, lowercase: bool = False, n_sentinels: int = 100,
                                  progress: bool = True) -> Tokenizer:
    """Like `train_tokenizer`, on an iterable of in-memory strings."""
    hf, trainer, roles, templates, n_special = _pipeline(kind, family, vocab_size, min_frequency, lowercase,
                                                         n_sentinels, progress)
    seen, failure, count = [False], [], [0]

    def counted() -> Iterator[str]:
        try:
            for t in texts:
                seen[0] |= bool(t.strip())
                count[0] += 1
                yield t
        except Exception as e:  # the source's own error (missing file, bad UTF-8) is the one to report
            failure.append(e)
            raise
    started = _say(progress, f"training a {kind} tokenizer (vocab {vocab_size})...")
    try:
        hf.train_from_iterator(counted(), trainer)
    except Exception as e:
        if failure:
            raise failure[0] from None
        if not seen[0]:
            raise ValueError("texts is empty: nothing to train on") from e
        raise ValueError(f"training a {kind} tokenizer with vocab_size={vocab_size} failed: {e}") from e
    if not seen[0]:
        raise ValueError("texts is empty: nothing to train on")
    tok = _finish(hf, roles, templates, n_special, vocab_size, kind)
    _say(progress, f"done: {kind} tokenizer with a vocabulary of {tok.vocab_size} from {count[0]:,} texts "
                   f"in {time.time() - started:.1f} s")
    return tok
