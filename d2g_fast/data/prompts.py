"""Prompt sources: a text file (one prompt per line), a JSON or JSONL caption file (the COCO
captions layout included), or the small bundled list for quick tries."""
from __future__ import annotations

import json
import os

BUNDLED = "bundled"
_TEXT_KEYS = ("caption", "prompt", "text")


def bundled_prompts_path() -> str:
    return os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "prompts.txt")


def _clean(text: str) -> str:
    return " ".join(text.split())  # COCO captions hold newlines and double spaces


def _from_item(item, where: str) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, dict):
        for key in _TEXT_KEYS:
            if isinstance(item.get(key), str):
                return item[key]
    raise ValueError(f"prompts (--prompts): {where}: expected a string or an object with one of "
                     f"the keys {list(_TEXT_KEYS)}, got {type(item).__name__}")


def _from_json(data, path: str) -> list[str]:
    if isinstance(data, dict):
        # COCO captions: {"images": [...], "annotations": [{"image_id", "id", "caption"}, ...]}
        for key in ("annotations", "prompts", "captions", "data"):
            if isinstance(data.get(key), list):
                data = data[key]
                break
        else:
            raise ValueError(f"prompts (--prompts): {path}: a JSON object needs a list under one "
                             f"of 'annotations' (COCO), 'prompts', 'captions', 'data'")
    if not isinstance(data, list):
        raise ValueError(f"prompts (--prompts): {path}: expected a JSON list of prompts")
    return [_from_item(item, f"{path} item {k}") for k, item in enumerate(data)]


def load_prompts(source: str | None = None) -> list[str]:
    """The prompts of ``source``: None or "bundled" (the bundled list), a ``.json`` file (a list
    of strings or of objects with "caption"/"prompt"/"text", or the COCO captions layout), a
    ``.jsonl`` file (one string or object per line), or any other file as text, one prompt per
    line. Whitespace is normalised and blank entries are dropped; an empty result is an error."""
    path = bundled_prompts_path() if source in (None, BUNDLED) else str(source)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompts (--prompts): no such file {path!r}")
    try:
        with open(path, encoding="utf-8") as f:
            raw = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"prompts (--prompts): cannot read {path!r}: {exc}") from exc
    lower = path.lower()
    if lower.endswith(".jsonl"):
        prompts = []
        for line_no, line in enumerate(raw.splitlines(), 1):
            if line.strip():
                try:
                    prompts.append(_from_item(json.loads(line), f"{path} line {line_no}"))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"prompts (--prompts): {path} line {line_no} is not JSON: "
                                     f"{exc}") from exc
    elif lower.endswith(".json"):
        try:
            data = json.loads(raw) if raw.strip() else []
        except json.JSONDecodeError as exc:
            raise ValueError(f"prompts (--prompts): {path} is not valid JSON: {exc}") from exc
        prompts = _from_json(data, path)
    else:
        prompts = raw.splitlines()
    prompts = [p for p in (_clean(p) for p in prompts) if p]
    if not prompts:
        raise ValueError(f"prompts (--prompts): {path!r} holds no prompts (empty or blank)")
    return prompts
