"""Text datasets -> packed token blocks.

`load_blocks(cfg, tokenizer)` turns a text source into `Splits` of fixed-length `TokenBlocks`:

  1. Resolve the source. A local path is a ``.txt`` file (the ``text`` builder, one file = one
     document), a ``.jsonl``/``.json`` file (the ``json`` builder, one record = one document, text in
     ``cfg.text_field``), a ``.parquet`` file (one row = one document), or a directory holding such files
     (its direct children with a supported extension, sorted by name; subdirectories are not searched).
     Anything else that is not a path is a Hugging Face Hub dataset name, loaded as
     ``load_dataset(name, cfg.hub_config, split=cfg.split, streaming=True)``; Hub datasets run no remote
     code (``datasets`` >= 4 refuses dataset scripts and we never pass ``trust_remote_code``).
  2. Stream the documents through ``datasets`` (``streaming=True`` for local files too: no Arrow copy
     is written, no progress bars are drawn, and reading stops once ``cfg.max_tokens`` tokens are in
     hand). Local reads get a throwaway cache dir; Hub reads use ``$HF_DATASETS_CACHE`` or
     ``~/.cache/spartan/datasets`` (``$XDG_CACHE_HOME`` respected), never the working directory.
  3. Tokenise each document with ``add_special_tokens=False`` and join consecutive documents with the
     tokenizer's eos token id between them (nothing between them if it has none); cut at ``max_tokens``.
  4. Pack the token stream into contiguous blocks of ``seq_len`` tokens, dropping the remainder.
     Every position is scored: labels equal input_ids (the model shifts them itself).
  5. Split (`split_blocks`): a seeded random choice of ``heldout_blocks`` blocks is held out (kept in
     corpus order); the other blocks, shuffled with the same seed, are the training set, capped at
     ``max_train_blocks``. The held-out choice depends only on the number of blocks and the seed, so
     changing ``max_train_blocks`` never moves a block between the two sets.

Timing (2 CPU cores): ``import datasets`` costs ~0.5 s once per process; after that a small local file
loads, tokenises and packs in ~10 ms. The first streamed read also imports torch (`datasets` looks for
DataLoader workers), free here since this module imports it. A Hub name with no network fails only
after huggingface_hub's retries (~25 s); with ``HF_HUB_OFFLINE=1`` it fails at once.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from spartan_cli.blocks import Splits, TokenBlocks
from spartan_cli.errors import ConfigError, DataError

log = logging.getLogger(__name__)

# File extension -> `datasets` builder that reads it.
SUPPORTED_EXTENSIONS: dict[str, str] = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
# Extensions that mark a source as a (possibly missing) file rather than a Hub dataset name.
_FILE_LIKE_EXTENSIONS = {*SUPPORTED_EXTENSIONS, ".csv", ".tsv", ".arrow", ".md", ".gz", ".zst", ".xz", ".zip"}
_TOKENIZE_BATCH_DOCS = 64  # documents per tokenizer call
_TOKENIZE_BATCH_CHARS = 1 << 18  # ... or fewer, once they hold this many characters


def _supported() -> str:
    return ", ".join(sorted(SUPPORTED_EXTENSIONS))


# ------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class DataConfig:
    """Where the text comes from and how it is cut into blocks."""

    source: str  # local file or directory, or a Hugging Face Hub dataset name
    text_field: str = "text"  # field holding the text in .jsonl/.json/.parquet/Hub rows (.txt: always "text")
    split: str = "train"  # split of a Hub dataset (local files have only "train")
    seq_len: int = 128  # tokens per block
    heldout_blocks: int = 64  # blocks set aside to measure the held-out loss and density
    max_train_blocks: int | None = None  # cap on training blocks (None: all that remain)
    max_tokens: int | None = None  # cap on tokens read; streaming stops there (None: read everything)
    seed: int = 0  # seeds the held-out choice and the training order
    hub_config: str | None = None  # configuration name of a Hub dataset (e.g. "wikitext-2-raw-v1")

    def __post_init__(self):
        if isinstance(self.source, os.PathLike):
            object.__setattr__(self, "source", os.fspath(self.source))
        for name in ("source", "text_field", "split"):
            _check_text(name, getattr(self, name))
        if self.hub_config is not None:
            _check_text("hub_config", self.hub_config)
        _check_int("seq_len", self.seq_len, minimum=2)
        _check_int("heldout_blocks", self.heldout_blocks, minimum=1)
        _check_int("seed", self.seed, minimum=0)
        for name in ("max_train_blocks", "max_tokens"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), minimum=1)
        if self.max_tokens is not None and self.max_tokens < self.tokens_needed:
            raise ConfigError(
                f"max_tokens={self.max_tokens} is fewer than the {self.tokens_needed} tokens needed for "
                f"heldout_blocks + 1 = {self.heldout_blocks + 1} blocks of seq_len {self.seq_len}; "
                f"raise max_tokens to at least {self.tokens_needed} or lower seq_len / heldout_blocks"
            )

    @property
    def tokens_needed(self) -> int:
        """The fewest tokens that give every held-out block and one training block."""
        return (self.heldout_blocks + 1) * self.seq_len

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DataConfig":
        """Build from a plain mapping (a YAML/JSON section); unknown or missing keys are errors."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"data config must be a mapping of settings, got {type(d).__name__}: {d!r}")
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(valid))
        if unknown:
            raise ConfigError(f"unknown data config key(s) {unknown}; valid keys: {valid}")
        if "source" not in d:
            raise ConfigError(f"data config needs 'source' (a .txt/.jsonl/.json/.parquet path, a directory "
                              f"or a Hub dataset name); got keys {sorted(d)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_text(name: str, value: Any) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{name} must be a non-empty string, got {value!r}")


def _check_int(name: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")


# -------------------------------------------------------------------------------------------- verbs


def load_blocks(cfg: DataConfig, tokenizer, *, max_positions: int | None = None) -> Splits:
    """Read ``cfg.source``, tokenise, pack into ``cfg.seq_len`` blocks and split train / held-out.

    ``tokenizer`` is a Hugging Face tokenizer. ``max_positions`` is the model's context length; a
    ``seq_len`` beyond it is refused before any data is read. Raises `DataError` for anything the user
    can fix (missing path, unsupported file, empty text, too little text, unreachable Hub).
    Returns blocks of shape (batch, seq_len) int64 with labels == input_ids.
    """
    if max_positions is not None and cfg.seq_len > max_positions:
        raise DataError(
            f"seq_len {cfg.seq_len} exceeds the model's max_positions {max_positions}; "
            f"use --seq-len {max_positions} or less"
        )
    ids = tokenize_texts(read_texts(cfg), tokenizer, max_tokens=cfg.max_tokens)  # (n_tokens,)
    if ids.numel() < cfg.tokens_needed:
        fits = ids.numel() // (cfg.heldout_blocks + 1)
        shorter = f" (--seq-len {fits} would fit)" if fits >= 2 else ""
        raise DataError(
            f"'{cfg.source}' gave {ids.numel()} tokens, but heldout_blocks + 1 = "
            f"{cfg.heldout_blocks + 1} blocks of seq_len {cfg.seq_len} need {cfg.tokens_needed}; "
            f"use a smaller --seq-len{shorter}, fewer held-out blocks, or more data"
        )
    blocks = pack_tokens(ids, cfg.seq_len)
    splits = split_blocks(blocks, heldout_blocks=cfg.heldout_blocks, seed=cfg.seed,
                          max_train_blocks=cfg.max_train_blocks)
    log.info("%s: %d tokens -> %d blocks of %d (train %d, held-out %d)", cfg.source, ids.numel(),
             len(blocks), cfg.seq_len, len(splits.train), len(splits.heldout))
    return splits


def read_texts(cfg: DataConfig) -> Iterator[str]:
    """Yield the source's documents in order (lazily: stop iterating and reading stops).

    Empty and whitespace-only documents and null values are skipped. Raises `DataError` when the
    source is missing or unsupported, a row lacks ``cfg.text_field``, or no document holds text.
    """
    groups = _local_groups(cfg.source)
    if groups is None:
        rows = ((cfg.text_field, row) for row in _hub_rows(cfg))
    else:
        rows = _local_rows(cfg, groups)
    n_rows = n_docs = 0
    for field, row in rows:
        n_rows += 1
        if field not in row:
            raise DataError(
                f"'{cfg.source}' has no field '{field}'; fields present: {sorted(row)}; "
                f"set text_field (--text-field) to the one holding the text"
            )
        text = row[field]
        if text is None:
            continue
        if not isinstance(text, str):
            raise DataError(
                f"field '{field}' of '{cfg.source}' holds {type(text).__name__} values, not text; "
                f"fields present: {sorted(row)}; set text_field (--text-field) to a text field"
            )
        if text.strip():
            n_docs += 1
            yield text
    if n_rows == 0:
        raise DataError(f"'{cfg.source}' is empty: it holds no rows; pass a file or dataset with text in it")
    if n_docs == 0 and groups is not None and all(builder == "text" for builder, _ in groups):
        raise DataError(f"'{cfg.source}' holds no text: its {n_rows} file(s) are empty or whitespace only; "
                        f"pass a file with text in it")
    if n_docs == 0:
        raise DataError(
            f"field '{cfg.text_field}' of '{cfg.source}' holds no text in any of its {n_rows} rows; "
            f"fields present: {sorted(row)}; set text_field (--text-field) to the one holding the text"
        )


def tokenize_texts(texts: Iterable[str], tokenizer, *, max_tokens: int | None = None) -> torch.Tensor:
    """Tokenise documents (no special tokens) and join them with eos between; return (n_tokens,) int64.

    Stops pulling documents once ``max_tokens`` tokens are in hand and cuts the stream there.
    """
    eos = getattr(tokenizer, "eos_token_id", None)
    chunks: list[torch.Tensor] = []
    total = 0
    for batch in _batches(texts):
        enc = tokenizer(batch, add_special_tokens=False, return_attention_mask=False, verbose=False)
        flat: list[int] = []
        for doc in enc["input_ids"]:
            if not doc:
                continue
            if eos is not None and (total or flat):
                flat.append(eos)
            flat.extend(doc)
        chunks.append(torch.tensor(flat, dtype=torch.long))
        total += len(flat)
        if max_tokens is not None and total >= max_tokens:
            break
    ids = torch.cat(chunks) if chunks else torch.empty(0, dtype=torch.long)  # (n_tokens,)
    return ids[:max_tokens] if max_tokens is not None else ids


def _batches(texts: Iterable[str]) -> Iterator[list[str]]:
    batch: list[str] = []
    chars = 0
    for text in texts:
        batch.append(text)
        chars += len(text)
        if len(batch) >= _TOKENIZE_BATCH_DOCS or chars >= _TOKENIZE_BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def pack_tokens(ids: torch.Tensor, seq_len: int) -> TokenBlocks:
    """Cut a (n_tokens,) stream into contiguous (n_tokens // seq_len, seq_len) blocks, all scored."""
    n_blocks = ids.numel() // seq_len
    input_ids = ids[: n_blocks * seq_len].reshape(n_blocks, seq_len).clone()  # (batch, pos)
    return TokenBlocks(input_ids=input_ids, labels=input_ids.clone())


def split_blocks(blocks: TokenBlocks, *, heldout_blocks: int, seed: int,
                 max_train_blocks: int | None = None) -> Splits:
    """Hold out a seeded random choice of blocks (in corpus order); train on the rest, shuffled, capped."""
    if not 0 < heldout_blocks < len(blocks):
        raise DataError(f"cannot hold out {heldout_blocks} of {len(blocks)} blocks and keep one to train on; "
                        f"lower heldout_blocks or give more data")
    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed))  # (n_blocks,)
    held = order[:heldout_blocks].sort().values
    train = order[heldout_blocks:]
    if max_train_blocks is not None:
        train = train[:max_train_blocks]
    return Splits(
        train=TokenBlocks(blocks.input_ids[train], blocks.labels[train]),
        heldout=TokenBlocks(blocks.input_ids[held], blocks.labels[held]),
    )


# ------------------------------------------------------------------------------------ local sources


def _looks_like_path(source: str) -> bool:
    return (
        Path(source).expanduser().exists()
        or source.startswith((".", "/", "~", "\\"))
        or Path(source).suffix.lower() in _FILE_LIKE_EXTENSIONS
        or source.count("/") > 1
    )


def _local_groups(source: str) -> list[tuple[str, list[str]]] | None:
    """[(builder, files)] in file order for a local source; None when it names a Hub dataset."""
    if not _looks_like_path(source):
        return None
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(
            f"data path '{source}' does not exist (looked at {path.absolute()}); "
            f"pass an existing {_supported()} file or a directory of them"
        )
    if path.is_dir():
        files = sorted(p for p in path.iterdir()
                       if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in SUPPORTED_EXTENSIONS)
        if not files:
            others = sorted(p.name for p in path.iterdir() if not p.name.startswith("."))
            shown = ", ".join(others[:8]) + (", ..." if len(others) > 8 else "") if others else "nothing"
            raise DataError(
                f"directory '{source}' holds no {_supported()} files (subdirectories are not searched; "
                f"found: {shown}); point --data at a directory or file with text"
            )
    else:
        if path.suffix.lower() not in SUPPORTED_EXTENSIONS:
            raise DataError(
                f"data file '{source}' has unsupported extension '{path.suffix or '(none)'}'; "
                f"supported: {_supported()}"
            )
        files = [path]
    groups: list[tuple[str, list[str]]] = []
    for f in files:  # consecutive files read by the same builder share one load_dataset call
        builder = SUPPORTED_EXTENSIONS[f.suffix.lower()]
        if groups and groups[-1][0] == builder:
            groups[-1][1].append(str(f))
        else:
            groups.append((builder, [str(f)]))
    return groups


def _local_rows(cfg: DataConfig, groups: list[tuple[str, list[str]]]) -> Iterator[tuple[str, dict]]:
    """Yield (text field, row) from local files, streamed; parse errors become DataError."""
    import datasets
    import pyarrow
    from datasets.exceptions import DatasetsError

    for builder, files in groups:
        kwargs = {"sample_by": "document"} if builder == "text" else {}
        field = "text" if builder == "text" else cfg.text_field
        # Streaming local files caches no data, but `datasets` still leaves a lock file per file set in
        # its cache dir: give it a throwaway one, removed when reading ends.
        try:
            with tempfile.TemporaryDirectory(prefix="spartan-datasets-") as cache_dir:
                ds = datasets.load_dataset(builder, data_files=files, split="train", streaming=True,
                                           cache_dir=cache_dir, **kwargs)
                for row in ds:
                    yield field, row
        except StopIteration:  # `datasets` lets this escape for an empty .jsonl
            continue
        except UnicodeDecodeError as e:
            raise DataError(f"{_describe(files)} is not UTF-8 text ({e.reason} at byte {e.start}); "
                            f"re-encode it as UTF-8") from None
        except (pyarrow.ArrowException, DatasetsError) as e:
            raise DataError(f"cannot read {_describe(files)} as {builder}: {_first_line(e)}; "
                            f"check the file is valid {builder}") from None


def _describe(files: list[str]) -> str:
    return f"'{files[0]}'" if len(files) == 1 else f"one of {len(files)} files ('{files[0]}', ...)"


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _cache_dir() -> Path:
    """Where `datasets` caches Hub metadata: ``$HF_DATASETS_CACHE`` or ``~/.cache/spartan/datasets``."""
    if os.environ.get("HF_DATASETS_CACHE"):
        return Path(os.environ["HF_DATASETS_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "spartan" / "datasets"


# -------------------------------------------------------------------------------------- Hub sources


def _hub_rows(cfg: DataConfig) -> Iterator[dict]:
    """Stream rows of a Hub dataset; unreachable / missing datasets become DataError."""
    import datasets
    from datasets.exceptions import DatasetNotFoundError
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    offline = (ConnectionError, TimeoutError, OfflineModeIsEnabled, LocalEntryNotFoundError)
    try:
        import httpx  # huggingface_hub >= 1.0 talks through httpx

        offline = (*offline, httpx.TransportError)
    except ImportError:  # pragma: no cover - older huggingface_hub
        pass
    name = f"'{cfg.source}'" + (f" (config '{cfg.hub_config}')" if cfg.hub_config else "")
    try:
        ds = datasets.load_dataset(cfg.source, cfg.hub_config, split=cfg.split, streaming=True,
                                   cache_dir=str(_cache_dir()))
    except offline as e:
        raise _unreachable(cfg, e) from None
    except DatasetNotFoundError as e:
        raise DataError(
            f"Hub dataset '{cfg.source}' was not found ({_first_line(e)}); check the name, or pass a "
            f"local file instead, e.g. --data ./file.txt"
        ) from None
    except HfHubHTTPError as e:
        raise DataError(f"Hub dataset {name} could not be read ({_first_line(e)}); "
                        f"pass a local file instead, e.g. --data ./file.txt") from None
    except ValueError as e:  # unknown config or split: datasets lists the valid ones in the message
        raise DataError(f"Hub dataset {name}, split '{cfg.split}': {_first_line(e)}") from None
    try:
        yield from ds
    except offline as e:  # the connection dropped while streaming
        raise _unreachable(cfg, e) from None


def _unreachable(cfg: DataConfig, e: BaseException) -> DataError:
    return DataError(
        f"'{cfg.source}' is not a local path and the Hugging Face Hub is unreachable "
        f"({_first_line(e)}); pass a local file instead, e.g. --data ./file.txt "
        f"(.txt, .jsonl, .json, .parquet or a directory of them)"
    )
