"""Tokenization of RL task items: right-padded prompts for the rollout engine, prompt + demonstration
rows with masks for SFT, completions decoded back to text; a tokenizer.json's chat template applied
when one sits beside it. Text that does not survive the tokenizer raises, naming task and field."""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
from typing import Sequence

import numpy as np

from moejax.rl.tasks import TaskItem, demonstration

@dataclasses.dataclass(frozen=True)
class PromptBatch:
    """Right-padded prompt ids for a rollout engine: tokens int32 [B, P], lengths int32 [B]."""

    tokens: np.ndarray
    lengths: np.ndarray


@dataclasses.dataclass(frozen=True)
class DemoBatch:
    """SFT rows ``prompt + completion + eos``: tokens int32 [B, T] (pad_id after ``lengths``),
    prompt_mask / completion_mask bool [B, T] (the loss uses completion_mask only)."""

    tokens: np.ndarray
    prompt_mask: np.ndarray
    completion_mask: np.ndarray
    lengths: np.ndarray


def load_chat_template(tokenizer) -> dict | None:
    """{"template", "bos_token", "eos_token"} from the ``tokenizer_config.json`` (or
    ``chat_template.jinja``) beside a loaded tokenizer.json; None when it has no chat template."""
    path = getattr(tokenizer, "path", None)
    if path is None:
        return None
    from etils import epath

    folder = epath.Path(path).parent
    config_file, jinja_file = folder / "tokenizer_config.json", folder / "chat_template.jinja"
    config = json.loads(config_file.read_text()) if config_file.exists() else {}
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        template = {t.get("name"): t.get("template") for t in template}.get("default")
    if template is None and jinja_file.exists():
        template = jinja_file.read_text()
    if not template:
        return None

    def token_text(key: str) -> str:
        tok = config.get(key) or ""
        return tok.get("content", "") if isinstance(tok, dict) else str(tok)

    return {"template": template, "bos_token": token_text("bos_token"),
            "eos_token": token_text("eos_token")}


@functools.lru_cache(maxsize=8)
def _compiled_chat_template(template: str):
    """A Hugging Face chat template compiled like transformers does (sandboxed jinja2)."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(template)


def render_chat(prompt: str, chat: dict) -> str:
    """One user turn through the tokenizer's chat template, generation prompt on."""
    return _compiled_chat_template(chat["template"]).render(
        messages=[{"role": "user", "content": prompt}], add_generation_prompt=True,
        bos_token=chat["bos_token"], eos_token=chat["eos_token"])


def encode_checked(tokenizer, text: str, where: str) -> list[int]:
    """Token ids of ``text``; fails naming ``where`` when the tokenizer cannot represent it (ids
    that do not decode back to the text, e.g. characters missing from a BPE vocabulary)."""
    ids = tokenizer.encode(text)
    back = tokenizer.decode(ids)
    if back != text and " ".join(back.split()) != " ".join(text.split()):
        raise ValueError(f"{where}: the tokenizer cannot represent {text!r} (it decodes back as "
                         f"{back!r}); use the byte tokenizer or a vocabulary covering these "
                         "characters")
    return ids


def _prompt_ids(item: TaskItem, tokenizer, chat: dict | None) -> list[int]:
    """Prompt ids; the answer is checked too (an answer the policy cannot emit fails early)."""
    encode_checked(tokenizer, item.answer, f"task {item.tier} field 'answer'")
    where = f"task {item.tier} field 'prompt'"
    if chat is None:
        return [tokenizer.bos_id] + encode_checked(tokenizer, item.prompt, where)
    encode_checked(tokenizer, item.prompt, where)
    return tokenizer.encode(render_chat(item.prompt, chat))


def _resolve_chat(tokenizer, chat_template) -> dict | None:
    return load_chat_template(tokenizer) if chat_template == "auto" else chat_template


def _pad(rows: Sequence[Sequence[int]], width: int | None, pad_id: int, what: str) -> np.ndarray:
    longest = max(len(r) for r in rows)
    width = longest if width is None else width
    if longest > width:
        raise ValueError(f"{what}: a row has {longest} tokens but pad_to={width}; raise pad_to")
    out = np.full((len(rows), width), pad_id, np.int32)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


def encode_prompts(items: Sequence[TaskItem], tokenizer, *, chat_template="auto",
                   pad_to: int | None = None) -> PromptBatch:
    """Prompt ids for a rollout engine: ``<bos> + prompt``, or the chat-templated prompt when the
    tokenizer has a template (``chat_template``: "auto", None for off, or a ``load_chat_template``
    dict). ``pad_to`` fixes the width (shape buckets)."""
    chat = _resolve_chat(tokenizer, chat_template)
    rows = [_prompt_ids(it, tokenizer, chat) for it in items]
    return PromptBatch(_pad(rows, pad_to, tokenizer.pad_id, "encode_prompts"),
                       np.array([len(r) for r in rows], np.int32))


def encode_demonstrations(items: Sequence[TaskItem], tokenizer, *, scratchpad: bool = True,
                          chat_template="auto", pad_to: int | None = None) -> DemoBatch:
    """SFT rows: prompt ids (as ``encode_prompts``), then the demonstration's ids and eos."""
    chat = _resolve_chat(tokenizer, chat_template)
    rows, n_prompt = [], []
    for it in items:
        p = _prompt_ids(it, tokenizer, chat)
        c = encode_checked(tokenizer, demonstration(it, scratchpad),
                           f"task {it.tier} field 'demonstration'")
        rows.append(p + c + [tokenizer.eos_id])
        n_prompt.append(len(p))
    tokens = _pad(rows, pad_to, tokenizer.pad_id, "encode_demonstrations")
    cols = np.arange(tokens.shape[1])[None, :]
    lengths = np.array([len(r) for r in rows], np.int32)
    prompt_mask = cols < np.array(n_prompt)[:, None]
    return DemoBatch(tokens, prompt_mask, ~prompt_mask & (cols < lengths[:, None]), lengths)


def decode_completions(tokens: np.ndarray, tokenizer) -> list[str]:
    """Completion texts of generated ids [N, T] (prompt removed), each cut at its first eos."""
    out = []
    for row in np.asarray(tokens):
        eos = np.flatnonzero(row == tokenizer.eos_id)
        row = row[:eos[0]] if eos.size else row
        out.append(tokenizer.decode(row[row != tokenizer.pad_id].tolist()))
    return out
