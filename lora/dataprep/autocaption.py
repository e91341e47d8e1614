"""``prepare_data --auto_caption``: captions written from CLAP zero-shot tags.

A CLAP model (transformers' ``ClapModel``, default laion/larger_clap_music; a hub id or a local
folder, loaded as the evaluation loads its CLAP: lora.modeling.clap) scores the labels of each
vocabulary (genre, mood, instruments, ...: ``caption_vocabulary.yaml`` next to this file, or the
user's own ``--caption_vocabulary``) against the audio: the softmax over the vocabulary's labels of
``logit_scale_a.exp() * cos(audio, text)``, with each label put into the vocabulary's prompt, which
is what ``pipeline("zero-shot-audio-classification")`` computes for one clip
(tests/dataprep/test_autocaption.py). A recording's audio embedding is the mean of its clips'
(each the mean of its 10-second windows'), renormalised; ``--auto_caption_per_clip`` tags each clip
on its own. The best ``pick`` labels of a vocabulary (the first always, the others when their score
reaches ``min_score``) are its tags; ``render`` puts them into the caption template with the clip's
tempo and key (librosa).
"""

from __future__ import annotations

import hashlib
import json
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np

from lora.common.cli import UserError, log
from lora.config import Config
from lora.dataprep import audio as A
from lora.modeling import clap

if TYPE_CHECKING:
    import torch

DEFAULT_VOCABULARY = Path(__file__).with_name("caption_vocabulary.yaml")
PIPELINE_PROMPT = "This is a sound of {}."  # transformers' zero-shot-audio-classification default
RESERVED = ("bpm", "key", "stem")
NAME = re.compile(r"^[a-z][a-z0-9_]*$")
VOCAB_KEYS = ("labels", "pick", "min_score", "prompt")


@dataclass
class Vocabulary:
    name: str
    labels: list[str]
    pick: int = 1
    min_score: float = 0.0
    prompt: str = PIPELINE_PROMPT


@dataclass
class Vocabularies:
    path: Path
    items: list[Vocabulary]
    digest: str  # of the vocabularies' content (tags made with another vocabulary are made again)

    @property
    def names(self) -> list[str]:
        return [v.name for v in self.items]


def _prompt_problem(prompt, where: str) -> Optional[str]:
    if not isinstance(prompt, str) or prompt.count("{}") != 1 or re.search(r"\{[^}]", prompt):
        return (f"{where}: {prompt!r} must be a sentence with one {{}} where the label goes, e.g. "
                f"'This is {{}} music.'")
    return None


def _vocabulary(name, spec, path: Path, prompt: str, problems: list[str]) -> Optional[Vocabulary]:
    where = f"{path}: vocabularies.{name}"
    if not isinstance(name, str) or not NAME.match(name) or name in RESERVED:
        problems.append(f"{where}: the name must be a lower-case word (letters, digits, _) other "
                        f"than {', '.join(RESERVED)}; it is the template's placeholder {{{name}}}.")
        return None
    if not isinstance(spec, dict):
        problems.append(f"{where}: expected the keys {', '.join(VOCAB_KEYS)}, got {spec!r}.")
        return None
    unknown = sorted(set(spec) - set(VOCAB_KEYS))
    if unknown:
        problems.append(f"{where}: unknown key(s) {', '.join(map(str, unknown))} (allowed: "
                        f"{', '.join(VOCAB_KEYS)}).")
    labels = spec.get("labels")
    if not isinstance(labels, list) or not labels:
        problems.append(f"{where}.labels: give a non-empty list of labels, e.g. [rock, jazz].")
        return None
    bad = [x for x in labels if not isinstance(x, (str, int, float)) or not str(x).strip()]
    if bad:
        problems.append(f"{where}.labels: every label must be a non-empty word or phrase, got {bad!r}.")
        return None
    labels = [" ".join(str(x).split()) for x in labels]
    seen, dup = set(), []
    for x in labels:
        if x.lower() in seen:
            dup.append(x)
        seen.add(x.lower())
    if dup:
        problems.append(f"{where}.labels: duplicate label(s) {', '.join(sorted(set(dup)))}: list each "
                        f"label once.")
    pick, min_score = spec.get("pick", 1), spec.get("min_score", 0.0)
    if isinstance(pick, bool) or not isinstance(pick, int) or not 1 <= pick <= len(labels):
        problems.append(f"{where}.pick: a whole number from 1 to the number of labels "
                        f"({len(labels)}), got {pick!r}.")
    if isinstance(min_score, bool) or not isinstance(min_score, (int, float)) or not 0 <= min_score <= 1:
        problems.append(f"{where}.min_score: a number from 0 to 1, got {min_score!r}.")
    own = spec.get("prompt", prompt)
    problem = _prompt_problem(own, f"{where}.prompt")
    if problem:
        problems.append(problem)
    return Vocabulary(name, labels, pick if isinstance(pick, int) else 1,
                      float(min_score) if isinstance(min_score, (int, float)) else 0.0, str(own))


def read_vocabularies(path: Optional[str]) -> Vocabularies:
    """The vocabularies of a YAML file (None: the shipped defaults). UserError naming the file and
    the key for anything wrong (bad YAML, an empty list, a duplicate label, ...)."""
    import yaml

    p = Path(path) if path else DEFAULT_VOCABULARY
    try:
        doc = yaml.safe_load(p.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise UserError(f"data.caption_vocabulary: {p} not found. Pass an existing YAML file (copy "
                        f"{DEFAULT_VOCABULARY} and edit it), or leave the key null for the "
                        f"defaults.") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"caption vocabulary {p} cannot be read ({e}); save it as UTF-8.") from None
    except yaml.YAMLError as e:
        raise UserError(f"caption vocabulary {p} is not valid YAML: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("vocabularies"), dict) or not doc["vocabularies"]:
        raise UserError(f"{p}: vocabularies: expected a mapping of vocabulary names to their labels, "
                        f"e.g.\nvocabularies:\n  genre:\n    labels: [rock, jazz]\n(see "
                        f"{DEFAULT_VOCABULARY}).")
    unknown = sorted(set(map(str, doc)) - {"prompt", "vocabularies"})
    problems = [f"{p}: unknown top-level key(s) {', '.join(unknown)} (allowed: prompt, vocabularies)."
                ] if unknown else []
    prompt = doc.get("prompt", PIPELINE_PROMPT)
    if _prompt_problem(prompt, f"{p}: prompt"):
        problems.append(_prompt_problem(prompt, f"{p}: prompt"))
        prompt = PIPELINE_PROMPT
    items = [_vocabulary(n, s, p, prompt, problems) for n, s in doc["vocabularies"].items()]
    if problems:
        raise UserError(f"caption vocabulary {p}:\n  " + "\n  ".join(problems))
    digest = hashlib.sha1(json.dumps([v.__dict__ for v in items], sort_keys=True).encode()).hexdigest()
    return Vocabularies(p, [v for v in items if v is not None], digest[:16])


def template_fields(template: str) -> list[str]:
    """The placeholders of a caption template; ValueError for a malformed one."""
    return [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]


def template_problems(template: str, names: list[str], key: str = "data.auto_caption_template") -> list[str]:
    try:
        fields = template_fields(template)
    except ValueError as e:
        return [f"{key} {template!r} is not a valid pattern ({e})."]
    allowed = list(names) + list(RESERVED)
    bad = sorted({f for f in fields if f not in allowed})
    if bad:
        return [f"{key} {template!r}: unknown placeholder(s) {', '.join('{' + b + '}' for b in bad)}; "
                f"use the vocabularies' names ({', '.join(names)}) and {{bpm}}, {{key}}, {{stem}}."]
    return []


def render(template: str, values: dict[str, str]) -> str:
    """The template's comma-separated parts with their placeholders filled; a part whose
    placeholder has no value is left out (e.g. no BPM estimate)."""
    out = []
    for part in template.split(","):
        fields = template_fields(part)
        if any(not values.get(f) for f in fields):
            continue
        text = " ".join(part.format(**{f: values[f] for f in fields}).split())
        if text:
            out.append(text)
    return ", ".join(out)


def choose(probs: np.ndarray, v: Vocabulary) -> list[dict]:
    """The tags of one vocabulary from its label probabilities: the best always, then up to
    ``pick`` in all whose score reaches ``min_score``."""
    order = np.argsort(-probs, kind="stable")
    keep = [int(order[0])] + [int(i) for i in order[1:v.pick] if probs[i] >= v.min_score]
    return [{"label": v.labels[i], "score": round(float(probs[i]), 4)} for i in keep]


def caption_values(tags: dict, clip: dict, stem: str) -> dict[str, str]:
    """Template values of a clip: each vocabulary's tags joined, its tempo and key, the file's
    stem."""
    values = {name: ", ".join(t["label"] for t in chosen) for name, chosen in (tags or {}).items()}
    if clip.get("bpm"):
        values["bpm"] = f"{float(clip['bpm']):.0f}"
    if clip.get("key"):
        values["key"] = str(clip["key"])
    values["stem"] = stem
    return values


class Tagger:
    """A CLAP model with the text embeddings of every vocabulary's prompts."""

    def __init__(self, vocab: Vocabularies, model_path: str, *, local_files_only: bool = False,
                 device: str = "cpu"):
        self.vocab = vocab
        self.model, self.processor = clap.load_clap(model_path, device=device,
                                                    local_files_only=local_files_only,
                                                    what="the auto-caption CLAP model")
        self.text = {v.name: clap.text_embeddings(self.model, self.processor,
                                                  [v.prompt.format(x) for x in v.labels])
                     for v in vocab.items}
        self.scale = clap.audio_scale(self.model)

    def embed(self, wav: np.ndarray, sample_rate: int) -> "torch.Tensor":
        """A clip's embedding: the mean of its 10-second windows' embeddings, renormalised."""
        import torch.nn.functional as F

        wins = clap.window_embeddings(self.model, self.processor, clap.audio_windows(wav, sample_rate))
        return F.normalize(wins.mean(dim=0), dim=-1)

    def probabilities(self, emb: "torch.Tensor") -> dict[str, np.ndarray]:
        """Per vocabulary: the softmax over its labels of logit_scale_a.exp() * cos."""
        return {name: (self.scale * (t @ emb)).softmax(dim=0).numpy().astype(np.float64)
                for name, t in self.text.items()}

    def tags(self, emb: "torch.Tensor") -> dict[str, list[dict]]:
        probs = self.probabilities(emb)
        return {v.name: choose(probs[v.name], v) for v in self.vocab.items}


def mean_embedding(embs: list) -> "torch.Tensor":
    """A recording's embedding: the mean of its clips' embeddings, renormalised."""
    import torch
    import torch.nn.functional as F

    return F.normalize(torch.stack(embs).mean(dim=0), dim=-1)


def tags_key(cfg: Config, vocab: Vocabularies) -> dict:
    d = cfg.data
    return {"model": d.auto_caption_model, "vocabulary": vocab.digest, "per_clip": d.auto_caption_per_clip}


def tag_recordings(cfg: Config, data_dir: Path, results: dict[str, dict], rels: list[str]) -> int:
    """Tag the recordings ``rels`` whose tags are missing or were made otherwise (another model,
    vocabulary or per-clip setting): r["tags"] (per recording) or each clip's c["tags"]. Returns
    how many were tagged now."""
    from tqdm import tqdm

    d = cfg.data
    vocab = read_vocabularies(d.caption_vocabulary)
    key = tags_key(cfg, vocab)
    need = [rel for rel in rels if results[rel].get("tags_key") != key]
    if not need:
        return 0
    import torch

    tagger = Tagger(vocab, d.auto_caption_model, local_files_only=cfg.model.local_files_only,
                    device="cuda" if torch.cuda.is_available() else "cpu")
    for rel in tqdm(need, desc="auto captions (CLAP)", unit="file", disable=None):
        r = results[rel]
        r.pop("tags", None)
        embs = []
        for c in r["clips"]:
            c.pop("tags", None)
            if c.get("duplicate"):
                continue
            emb = tagger.embed(A.load_audio(data_dir / c["file"], d.sample_rate, 1), d.sample_rate)
            embs.append(emb)
            if d.auto_caption_per_clip:
                c["tags"] = tagger.tags(emb)
        if embs and not d.auto_caption_per_clip:
            r["tags"] = tagger.tags(mean_embedding(embs))
        r["tags_key"] = key
    log.info("auto captions: tagged %d recording(s) with %s", len(need), d.auto_caption_model)
    return len(need)


# ---- tags as text (captions.csv, the web UI) -------------------------------------------------
def tags_text(tags: Optional[dict]) -> str:
    """'genre: rock (0.81); mood: calm (0.40), dreamy (0.22)'."""
    return "; ".join(f"{name}: " + ", ".join(f"{t['label']} ({t['score']:.2f})" if "score" in t
                                             else t["label"] for t in chosen)
                     for name, chosen in (tags or {}).items())


def parse_tags_text(text: str, where: str) -> dict[str, list[dict]]:
    """The inverse of ``tags_text``; scores in parentheses are optional. UserError naming
    ``where`` for a part without 'name:'."""
    out: dict[str, list[dict]] = {}
    for part in (p.strip() for p in str(text or "").split(";")):
        if not part:
            continue
        name, sep, labels = part.partition(":")
        name = name.strip()
        if not sep or not NAME.match(name):
            raise UserError(f"{where}: tags {part!r} must read 'name: label, label' (e.g. 'genre: "
                            f"rock; mood: calm, dreamy').")
        chosen = []
        for item in (x.strip() for x in labels.split(",")):
            m = re.match(r"^(.*?)\s*\(\s*([0-9.]+)\s*\)$", item)
            label, score = (m.group(1), float(m.group(2))) if m else (item, None)
            if label:
                chosen.append({"label": " ".join(label.split())} | ({"score": score} if score is not None
                                                                  else {}))
        out[name] = chosen
    return out
