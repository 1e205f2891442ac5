"""Sentence embeddings, similarity and semantic search.

Pretraining places sentences in a vector space where similar meanings lie close
(Reimers & Gurevych 2019, Sentence-BERT). `embed` pools the top hidden states of a
model (mean, [CLS], or the last token for decoders); `SemanticIndex` stores the
vectors with their texts and the model's identity, and searches them exactly with a
matrix product (or with an HNSW graph from hnswlib for very large collections).
"""

from __future__ import annotations

import copy
import hashlib
import json
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lmforge.atomic import atomic_write
from lmforge.models.heads import Model, pool
from lmforge.nn.attention import QKV
from lmforge.nn.measure import bf16_pays

EMBED_DTYPES = ("float32", "bfloat16", "auto")
# model -> (its weights' identity, its bfloat16 copy): made once, remade when the weights change
_BF16_COPIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def default_pooling(model: Model) -> str:
    if model.cfg.task == "embed" or model.cfg.family != "decoder":
        return model.cfg.pooling if model.cfg.task == "embed" else "mean"
    return "last"


def embed_dtype(model: Model, dtype: str) -> str:
    """The precision `embed` runs in for `dtype`: "float32", "bfloat16", or for "auto" bfloat16
    where `bf16_pays` measures it at least 1.25x as fast on the model's feed-forward product
    here (CPUs with AVX512-BF16 or AMX), else float32."""
    if dtype not in EMBED_DTYPES:
        raise ValueError(f"dtype={dtype!r}; expected one of {', '.join(EMBED_DTYPES)}")
    if dtype != "auto":
        return dtype
    cfg = model.cfg
    return "bfloat16" if bf16_pays(cfg.d_model, cfg.d_ff, 256, next(model.parameters()).device) else "float32"


@torch.inference_mode()
def embed(model: Model, tokenizer, texts: list[str], *, batch_size: int = 32, normalize: bool = True,
          pooling: str | None = None, max_length: int | None = 256, progress: bool = False,
          dtype: str = "float32") -> torch.Tensor:
    """Embed `texts` → (N, d) float32, in input order.

    Texts are sorted by length so each batch carries little padding; inputs longer
    than `max_length` tokens are truncated (keeping the final special token, as
    sentence-transformers does). dtype="bfloat16" runs a bfloat16 copy of the model
    (`bf16_copy`: weights and activations in bfloat16, norms and softmax accumulating in
    float32 inside torch's kernels; pooling in float32): faster where the CPU has bfloat16
    matrix instructions, far slower where it has not; "auto" measures which (`embed_dtype`).
    The layers skip the padding (`Transformer.encode(..., unpad=True)`) for encoders."""
    if isinstance(texts, str):
        raise TypeError("embed() takes a list of texts, not a single string")
    if not texts:
        raise ValueError("no texts to embed: texts is an empty list")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise ValueError(f"texts[{i}] is a {type(t).__name__}, not a string")
        if not t.strip():
            raise ValueError(f"texts[{i}] is an empty string (or only whitespace); every text needs some words")
    pooling = pooling or default_pooling(model)
    run = bf16_copy(model) if embed_dtype(model, dtype) == "bfloat16" else model
    limit = min(max_length or model.cfg.max_len, model.cfg.max_len)
    encoded = [_truncate(ids, limit, tokenizer) for ids in tokenizer.encode_batch(list(texts))]
    order = sorted(range(len(texts)), key=lambda i: -len(encoded[i]))
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    device = next(model.parameters()).device
    out = torch.empty(len(texts), model.cfg.d_model)
    bar = _progress(len(texts), progress)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        n = len(encoded[idx[0]])  # longest of this batch (sorted descending)
        ids = torch.full((len(idx), n), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), n), dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, :len(encoded[i])] = torch.tensor(encoded[i])
            mask[row, :len(encoded[i])] = 1
        ids, mask = ids.to(device), mask.to(device)
        h = _hidden(run, ids, mask)
        vec = pool(h.float(), mask, pooling)
        out[idx] = (F.normalize(vec, dim=-1) if normalize else vec).cpu()
        if bar is not None:
            bar.update(len(idx))
    if bar is not None:
        bar.close()
    return out


def bf16_copy(model: Model) -> Model:
    """A bfloat16 copy of `model` for inference, kept while the model lives and made anew when
    its parameters change (trained, or loaded into). No casts per product, as autocast makes:
    on a 2-core Zen 4 EPYC (AVX512-BF16) 1.4x the sentences/s of bfloat16 autocast. Each
    attention's q, k and v weights are laid out as one (`QKV.stack`)."""
    key = tuple((id(p), p._version) for p in model.parameters())
    held = _BF16_COPIES.get(model)
    if held is None or held[0] != key:
        twin = copy.deepcopy(model).to(torch.bfloat16)
        for m in twin.modules():  # q, k and v as one product
            if isinstance(m, QKV):
                m.stack()
        _BF16_COPIES[model] = held = (key, twin)
    return held[1].train(model.training)


def _hidden(model: Model, ids, mask):
    if model.cfg.family in ("encoder", "encoder-decoder"):  # the layers skip the padding (pooling ignores it)
        return model.backbone.encode(ids, mask, unpad=True)  # a full batch too: attention on the rows
    return model.backbone.decode(ids, attention_mask=None if bool(mask.all()) else mask)


def _truncate(ids: list[int], limit: int, tokenizer) -> list[int]:
    if len(ids) <= limit:
        return ids
    last = ids[-1]
    return ids[:limit - 1] + [last] if last in tokenizer.special_ids else ids[:limit]


def _progress(total: int, on: bool):
    if not on:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, unit="text", desc="embedding")


# The files `write_embeddings` can write, by extension; anything else is refused up front.
EMBEDDING_FORMATS = {".npy": "a float32 matrix, one row per text (numpy.load)",
                     ".jsonl": "one JSON object per line: {\"text\": ..., \"embedding\": [...]}",
                     ".csv": "comma-separated: the text, then one column per dimension (with a header)",
                     ".tsv": "tab-separated: the text, then one column per dimension (with a header)"}


def check_embedding_path(path: str | Path) -> Path:
    """`path` as a Path if its extension names a format of `EMBEDDING_FORMATS`; else a ValueError
    naming the extension and the accepted ones (call it before the slow work)."""
    p = Path(path)
    if p.suffix.lower() not in EMBEDDING_FORMATS:
        found = f"extension {p.suffix!r}" if p.suffix else "no extension"
        raise ValueError(f"{p}: {found}; the output format follows the extension, one of "
                         f"{', '.join(EMBEDDING_FORMATS)}")
    return p


def write_embeddings(path: str | Path, texts: list[str], vectors: torch.Tensor | np.ndarray) -> Path:
    """Write (N, d) `vectors` with their `texts` in the format of the file's extension
    (`EMBEDDING_FORMATS`), in one rename: an interrupted write leaves no partial file."""
    import csv

    p = check_embedding_path(path)
    vecs = np.asarray(vectors, dtype=np.float32)
    if len(texts) != vecs.shape[0]:
        raise ValueError(f"{len(texts)} texts but {vecs.shape[0]} vectors")
    suffix = p.suffix.lower()

    def write(tmp: str) -> None:
        if suffix == ".npy":
            with open(tmp, "wb") as f:  # a file object: np.save would append .npy to a name
                np.save(f, vecs)
            return
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            if suffix == ".jsonl":
                for t, v in zip(texts, vecs.tolist()):
                    f.write(json.dumps({"text": t, "embedding": v}, ensure_ascii=False) + "\n")
                return
            w = csv.writer(f, delimiter="," if suffix == ".csv" else "\t", lineterminator="\n")
            w.writerow(["text"] + [f"e{j}" for j in range(vecs.shape[1])])
            for t, v in zip(texts, vecs.tolist()):
                w.writerow([t] + [format(x, ".9g") for x in v])  # 9 digits round-trip a float32

    atomic_write(p, write)
    return p


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise cosine similarity: (N, d), (M, d) → (N, M)."""
    return F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T


def model_identity(model_dir: str | Path) -> dict:
    """What an index must agree on with the model that queries it: the path and a
    fingerprint of the weights file."""
    p = Path(model_dir)
    weights = p if p.is_file() else next((p / n for n in ("model.safetensors", "pytorch_model.bin")
                                          if (p / n).is_file()), None)
    h = hashlib.sha256()
    if weights is not None:
        with open(weights, "rb") as f:
            h.update(f.read(1 << 20))  # the header and first MiB fingerprint the weights cheaply
        h.update(str(weights.stat().st_size).encode())
    return {"model": str(p.resolve()), "fingerprint": h.hexdigest()[:16]}


@dataclass
class Hit:
    rank: int
    score: float
    index: int
    text: str


class SemanticIndex:
    """Embeddings + texts + model identity in one directory; exact or HNSW search."""

    ANN_THRESHOLD = 1_000_000

    def __init__(self, vectors: np.ndarray, texts: list[str], meta: dict):
        self.vectors, self.texts, self.meta = vectors, texts, meta
        self._ann = None

    @classmethod
    def build(cls, model: Model, tokenizer, texts: list[str], model_dir: str | Path, *, batch_size: int = 32,
              ann: bool | None = None, progress: bool = False) -> "SemanticIndex":
        if model.cfg.family == "decoder" and model.cfg.task != "embed":
            raise ValueError(f"{model_dir}: index build needs a model with an encoder (or one fine-tuned for "
                             f"embeddings); this is a decoder-only {model.cfg.task} model")
        vecs = embed(model, tokenizer, texts, batch_size=batch_size, normalize=True, progress=progress).numpy()
        meta = {**model_identity(model_dir), "count": len(texts), "dim": int(vecs.shape[1]),
                "pooling": default_pooling(model),
                "ann": bool(ann if ann is not None else len(texts) >= cls.ANN_THRESHOLD)}
        return cls(vecs.astype(np.float32), list(texts), meta)

    def save(self, directory: str | Path) -> Path:
        d = Path(directory)
        atomic_write(d / "embeddings.npy", lambda tmp: np.save(open(tmp, "wb"), self.vectors))
        atomic_write(d / "texts.jsonl", lambda tmp: Path(tmp).write_text(
            "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in self.texts)))
        atomic_write(d / "index.json", lambda tmp: Path(tmp).write_text(json.dumps(self.meta, indent=2)))
        return d

    @classmethod
    def load(cls, directory: str | Path) -> "SemanticIndex":
        d = Path(directory)
        for name in ("index.json", "embeddings.npy", "texts.jsonl"):
            if not (d / name).is_file():
                raise FileNotFoundError(f"{d / name} not found: {d} is not an lmforge index (lmforge index build)")
        name = "index.json"
        try:  # a damaged file is named (np.load refuses pickled arrays: loading runs no code)
            meta = json.loads((d / name).read_text(encoding="utf-8"))
            count = meta["count"]
            name = "embeddings.npy"
            vecs = np.load(d / name, mmap_mode="r")
            if vecs.ndim != 2 or vecs.dtype.kind != "f":
                raise ValueError(f"expected a 2-d float array, got shape {vecs.shape} of {vecs.dtype}")
            name = "texts.jsonl"
            texts = [json.loads(line)["text"] for line in (d / name).read_text(encoding="utf-8").splitlines() if line]
        except (ValueError, KeyError, TypeError, OSError) as e:
            raise ValueError(f"{d / name}: damaged index file ({type(e).__name__}: {e}); "
                             f"rebuild the index with lmforge index build") from None
        if len(texts) != vecs.shape[0] or vecs.shape[0] != count:
            raise ValueError(f"{d}: index is inconsistent ({vecs.shape[0]} vectors, {len(texts)} texts, "
                             f"index.json says {count})")
        return cls(np.array(vecs, dtype=np.float32), texts, meta)

    def check_model(self, model_dir: str | Path) -> None:
        ident = model_identity(model_dir)
        if ident["fingerprint"] != self.meta["fingerprint"]:
            raise ValueError(f"index was built with model {self.meta['model']} (fingerprint "
                             f"{self.meta['fingerprint']}), but is queried with {ident['model']} "
                             f"(fingerprint {ident['fingerprint']}); rebuild the index with this model")

    def search(self, query_vectors: torch.Tensor | np.ndarray, top_k: int = 10) -> list[list[Hit]]:
        """query_vectors (Q, d), L2-normalised → top_k hits per query, best first."""
        q = np.asarray(query_vectors, dtype=np.float32)
        if q.ndim == 1:
            q = q[None]
        if q.shape[1] != self.vectors.shape[1]:
            raise ValueError(f"query dimension {q.shape[1]} != index dimension {self.vectors.shape[1]}")
        k = min(top_k, len(self.texts))
        if k < 1:
            raise ValueError(f"top_k={top_k} must be >= 1")
        if self.meta.get("ann"):
            idx, scores = self._ann_search(q, k)
        else:
            sims = torch.from_numpy(q) @ torch.from_numpy(self.vectors).T  # (Q, N) exact
            s, i = sims.topk(k, dim=1)
            idx, scores = i.numpy(), s.numpy()
        return [[Hit(r + 1, float(scores[j, r]), int(idx[j, r]), self.texts[int(idx[j, r])]) for r in range(k)]
                for j in range(q.shape[0])]

    def _ann_search(self, q: np.ndarray, k: int):
        try:
            import hnswlib
        except ImportError as e:
            raise ImportError("approximate search over large indexes needs hnswlib: pip install 'lmforge[ann]'") from e
        if self._ann is None:
            n, dim = self.vectors.shape
            self._ann = hnswlib.Index(space="ip", dim=dim)
            self._ann.init_index(max_elements=n, ef_construction=200, M=32)
            self._ann.add_items(self.vectors, np.arange(n))
            self._ann.set_ef(max(64, 2 * k))
        labels, dist = self._ann.knn_query(q, k=k)
        return labels, 1.0 - dist  # hnswlib's "ip" distance is 1 - dot
