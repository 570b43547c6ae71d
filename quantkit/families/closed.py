"""Models that are only served through their makers' APIs (no weights were ever published): asked for by name
or hub id, they get one line saying so instead of a hub error. Checked only for names that are not a local
path. Community repos that merely borrow a name ("someone/claude-distill") are not refused: a name is refused
bare or under its maker's organisation; Anthropic's whole organisation (it has published no weights)."""

from __future__ import annotations

import re

# (pattern on the model name, lower-cased; makers' hub organisations; what the model is; the open alternative)
_CLOSED = (
    # GPT-3/3.5/4/4o/4.1/4.5/5 ... but not gpt2 / gpt-2 (open), gpt-j, gpt-neo(x), gpt-oss
    (r"(chat)?gpt-?(3(\.5)?|4(\.\d+)?o?|5(\.\d+)?)([-_.].*)?", ("openai",), "OpenAI's GPT models",
     "OpenAI's open-weight models are gpt-oss (openai/gpt-oss-20b, openai/gpt-oss-120b)"),
    (r"o[134](-.*)?", ("openai",), "OpenAI's o-series models",
     "OpenAI's open-weight models are gpt-oss (openai/gpt-oss-20b, openai/gpt-oss-120b)"),
    (r"claude.*", ("anthropic", "anthropics"), "Anthropic's Claude models", "Anthropic has published no weights"),
    (r".*", ("anthropic", "anthropics"), "Anthropic's models", "Anthropic has published no weights"),
    (r"gemini.*", ("google", "deepmind", "google-deepmind"), "Google's Gemini models",
     "Google's open-weight models are Gemma (e.g. google/gemma-3-4b-it)"),
    # Grok-1 and Grok-2 were released (xai-org/grok-1, xai-org/grok-2); later ones were not
    (r"grok(?!-?[12]([-_.].*)?$).*", ("xai-org", "xai"), "xAI's Grok models after Grok-2",
     "xAI published Grok-1 and Grok-2 only (xai-org/grok-1, xai-org/grok-2)"),
    (r"doubao.*", ("bytedance", "bytedance-seed", "volcengine"), "ByteDance's Doubao models",
     "ByteDance's open-weight models are Seed-OSS (ByteDance-Seed/Seed-OSS-36B-Instruct)"),
    (r"qwen[\d.]*-(max|plus|turbo)([-_.].*)?", ("qwen", "alibaba", "alibaba-cloud"),
     "Alibaba's Qwen-Max/Plus/Turbo API models", "Qwen's open-weight models are e.g. Qwen/Qwen3-8B, Qwen/Qwen3-235B-A22B"),
)

_ORG_ONLY = (r".*", r"o[134](-.*)?")  # too generic to refuse without the maker's organisation


def closed_model(source: str) -> str | None:
    """The one-line refusal for a closed model's name or hub id, or None (an open model, or any other name)."""
    s = str(source).strip().rstrip("/")
    if not s or s.startswith((".", "/", "~")) or s.count("/") > 1 or s.lower().endswith((".gguf", ".safetensors")):
        return None
    org, _, name = s.rpartition("/")
    org_l, name_l = org.lower(), name.lower()
    for pat, orgs, what, alt in _CLOSED:
        if (org and org_l not in orgs) or not re.fullmatch(pat, name_l):
            continue
        if not org and pat in _ORG_ONLY:
            continue
        return (f"{s}: {what} have no open weights (served only through the maker's API), so there is nothing to "
                f"download, convert or quantize; {alt}")
    return None
