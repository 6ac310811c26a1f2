"""Captioning metrics (COCO / NoCaps): BLEU-1..4 and CIDEr through pycocoevalcap, plus METEOR and
SPICE when Java is available and their jars work. Nothing is ever downloaded."""
from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import logging
import os
import re
import shutil
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

log = logging.getLogger(__name__)

# simple_tokenize: the clitics PTB splits off, then the tokens it keeps once punctuation is dropped.
_CLITIC = re.compile(r"(\w)'(s|re|ll|ve|d|m)\b")
_NOT = re.compile(r"(\w)n't\b")
_TOKEN = re.compile(r"-[lr][rsc]b-|n't|'(?:s|re|ll|ve|d|m)\b|\d+(?:[.,:]\d+)+|\w+(?:[-/]\w+)*|[&%$#+*]")
# PTB spells brackets as -LRB- etc.; pycocoevalcap lowercases them and so never drops them.
_BRACKETS = str.maketrans({"(": " -lrb- ", ")": " -rrb- ", "[": " -lsb- ", "]": " -rsb- ",
                           "{": " -lcb- ", "}": " -rcb- "})


def load_coco_captions(path: str | os.PathLike) -> dict[Hashable, list[str]]:
    """COCO caption ground truth ``{"annotations": [{"image_id", "caption"}, ...]}`` ->
    ``{image_id: [caption, ...]}``."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    anns = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(anns, list):
        raise ValueError(f"{path}: expected a COCO captions JSON with an 'annotations' list")
    captions: dict[Hashable, list[str]] = {}
    for i, ann in enumerate(anns):
        if not isinstance(ann, dict) or "image_id" not in ann or not isinstance(ann.get("caption"), str):
            raise ValueError(f"{path}: annotations[{i}] needs 'image_id' and a string 'caption', got {ann!r}")
        captions.setdefault(ann["image_id"], []).append(ann["caption"])
    return captions


def simple_tokenize(caption: str) -> str:
    """Java-free stand-in for pycocoevalcap's PTBTokenizer: lowercase, split the clitics PTB
    splits ("dog's" -> "dog 's", "isn't" -> "is n't"), keep words, hyphenated words, numbers,
    brackets as PTB spells them and a few symbols (& % $ # + *), drop other punctuation. Matches
    PTB on ordinary captions; abbreviations ("u.s.") and rarer symbols may differ."""
    text = caption.lower().replace("\u2019", "'").translate(_BRACKETS)
    text = _CLITIC.sub(r"\1 '\2", _NOT.sub(r"\1 n't", text))
    return " ".join(_TOKEN.findall(text))


def java_available() -> bool:
    """Whether METEOR, SPICE and the PTB tokenizer can run (each starts a JVM per call)."""
    return shutil.which("java") is not None


def caption_scores(predictions: Mapping[Hashable, str], ground_truth: Mapping[Hashable, Sequence[str]],
                   use_java: bool | None = None) -> dict[str, float]:
    """Corpus caption scores of ``predictions`` ({image_id: caption}) against ``ground_truth``
    ({image_id: [reference, ...]}); both must cover the same images.

    Returns ``BLEU-1`` .. ``BLEU-4`` and ``CIDEr`` (pycocoevalcap scale: CIDEr 1.3 is the "130"
    papers print), and ``METEOR`` / ``SPICE`` when they could run. ``use_java=None`` uses Java
    when it is on PATH; with Java, text goes through PTBTokenizer, without it through
    :func:`simple_tokenize`. CIDEr's IDF comes from the evaluated references, so it is only
    comparable across runs on the same image set.
    """
    _check_captions(predictions, ground_truth)
    use_java = java_available() if use_java is None else use_java
    gts = _tokenize(ground_truth, use_java)
    res = _tokenize({k: [v] for k, v in predictions.items()}, use_java)
    res = {k: res[k] for k in gts}  # the scorers want the same key order
    bleu, _ = _scorer("bleu.bleu", "Bleu")(4).compute_score(gts, res, verbose=0)
    cider, _ = _scorer("cider.cider", "Cider")().compute_score(gts, res)
    scores = {f"BLEU-{n + 1}": float(b) for n, b in enumerate(bleu)}
    scores["CIDEr"] = float(cider)
    if use_java:
        scores.update(_java_scores(gts, res))
    return scores


def _tokenize(captions: Mapping[Hashable, Sequence[str]], use_java: bool) -> dict[Hashable, list[str]]:
    if use_java:
        try:
            tokenizer = _scorer("tokenizer.ptbtokenizer", "PTBTokenizer")()
            out = tokenizer.tokenize({k: [{"caption": c} for c in v] for k, v in captions.items()})
            if sum(map(len, out.values())) == sum(map(len, captions.values())):
                return out
            log.warning("PTBTokenizer returned the wrong number of captions; using simple_tokenize")
        except (OSError, RuntimeError) as e:
            log.warning("PTBTokenizer failed (%s); using simple_tokenize", e)
    return {k: [simple_tokenize(c) for c in v] for k, v in captions.items()}


def _java_scores(gts: dict, res: dict) -> dict[str, float]:
    """METEOR and SPICE, each skipped with a warning when its Java side fails."""
    scores, meteor = {}, None
    try:
        meteor = _scorer("meteor.meteor", "Meteor")()
        scores["METEOR"] = float(meteor.compute_score(gts, res)[0])
    except (OSError, ValueError, RuntimeError) as e:
        log.warning("METEOR skipped: %s", e)
        if meteor is not None:
            _stop_failed_meteor(meteor)
    del meteor  # Meteor.__del__ stops its Java process
    missing = [str(p) for p in spice_corenlp_jars() if not p.exists()]
    if missing:
        # pycocoevalcap's Spice() would download Stanford CoreNLP here; we never download.
        log.warning("SPICE skipped: %s missing (copy them from stanford-corenlp-full-2015-12-09 by hand)",
                    " and ".join(missing))
        return scores
    try:
        scores["SPICE"] = float(_scorer("spice.spice", "Spice")().compute_score(gts, res)[0])
    except Exception as e:  # noqa: BLE001 -- a Java subprocess can fail in many ways; SPICE is optional
        log.warning("SPICE skipped: %s", e)
    return scores


def _stop_failed_meteor(meteor) -> None:
    """A failed ``Meteor.compute_score`` leaves its lock held, and ``Meteor.__del__`` takes that
    lock (the garbage collector would hang forever) and then closes a broken pipe: release the
    lock and stop the Java process here, so ``__del__`` finds nothing left to do."""
    if meteor.lock.locked():
        meteor.lock.release()
    with contextlib.suppress(OSError):
        meteor.meteor_p.stdin.close()
    meteor.meteor_p.kill()
    meteor.meteor_p.wait()


def _scorer(module: str, name: str):
    try:
        mod = importlib.import_module(f"pycocoevalcap.{module}")
    except ImportError as e:
        raise ImportError("caption metrics need pycocoevalcap (pip install pycocoevalcap==1.2)") from e
    return getattr(mod, name)


def spice_corenlp_jars() -> list[Path]:
    """The Stanford CoreNLP jars SPICE needs beside pycocoevalcap's spice-1.0.jar."""
    lib = Path(inspect.getfile(_scorer("spice.spice", "Spice"))).parent / "lib"
    return [lib / "stanford-corenlp-3.6.0.jar", lib / "stanford-corenlp-3.6.0-models.jar"]


def _check_captions(predictions: Mapping, ground_truth: Mapping) -> None:
    missing = [k for k in ground_truth if k not in predictions]
    extra = [k for k in predictions if k not in ground_truth]
    if missing or extra or not predictions:
        raise ValueError(f"predictions and ground truth must cover the same non-empty image set: "
                         f"{len(missing)} images lack a prediction (e.g. {missing[:3]}), "
                         f"{len(extra)} predictions have no ground truth (e.g. {extra[:3]})")
    for k, refs in ground_truth.items():
        if isinstance(refs, str) or not refs or not all(isinstance(r, str) for r in refs):
            raise ValueError(f"ground truth for image {k!r} must be a non-empty list of strings, got {refs!r}")
        if not isinstance(predictions[k], str):
            raise ValueError(f"prediction for image {k!r} must be a string, got {predictions[k]!r}")
