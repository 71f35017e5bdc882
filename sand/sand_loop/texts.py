"""Checks on the texts the base model writes (critique insights, deliberation thoughts): sentences, repeats,
echoes of the prompt, whether a sentence calls an action good or bad, and whether it says the task moved."""
from __future__ import annotations

import re

_SENTENCE = re.compile(r"[^.!?\n]+(?:[.!?]+[\"”')]*|\n|$)")
_WORD = re.compile(r"[a-z0-9]+")
_QUOTED = re.compile(r"\"[^\"\n]*\"")
_HIDE = str.maketrans(".!?", "\x01\x02\x03")  # sentence ends inside quotes, hidden from the splitter
_SHOW = str.maketrans("\x01\x02\x03", ".!?")
ECHO_WORDS = 8  # a run of this many words shared with the prompt is a copy, not a judgement
# Words that praise or blame an action; a negation up to three words before one turns it off ("did not help",
# "can not go on to complete").
_GOOD = re.compile(r"\b(?:good|best|better|right|correct|useful|helps?|helped|helpful|works?|worked|succeed\w*|"
                   r"advanc\w*|progress\w*|promising|wise|smart)\b", re.IGNORECASE)
_BAD = re.compile(r"\b(?:bad|worse|worst|wrong|useless|wasted?|wastes|wasting|hinder\w*|fail\w*|pointless|"
                  r"mistake|harm\w*|avoid)\b", re.IGNORECASE)
# What an action led to, as an insight claims it ("the score goes up" / "nothing happens").
_GAIN = re.compile(r"\b(?:score\s+(?:goes|went|will\s+go)\s+up|score\s+(?:rises|rose|increases|increased)|"
                   r"(?:raises?|raised|increases?|increased)\s+(?:the\s+|my\s+)?score|complet\w*|finish\w*|win|"
                   r"won(?!')|closer|advanc\w*|progress\w*|succeed\w*|success\w*|achiev\w*|helps?|helped)\b",
                   re.IGNORECASE)
_LOSS = re.compile(r"\b(?:nothing\s+happen\w*|(?:can\s*not|can't|unable\s+to|not\s+be\s+able\s+to)\s+do\b|"
                   r"lose\s+a\s+step|wast\w*|score\s+(?:goes|went)\s+down|"
                   r"(?:lowers?|decreases?)\s+(?:the\s+|my\s+)?score|fail\w*|no\s+effect|hinder\w*|useless|"
                   r"pointless)\b", re.IGNORECASE)
_NEGATION = re.compile(r"\b(?:not|no|never|nothing|without|cannot|n't)\W+(?:\w+\W+){0,3}$|n't\W+(?:\w+\W+){0,3}$",
                       re.IGNORECASE)


def sentences(text: str) -> list[str]:
    """The text's sentences (split at . ! ? and line breaks, never inside double quotes: a quoted observation
    belongs to the sentence quoting it), stripped, empty ones left out."""
    masked = _QUOTED.sub(lambda m: m.group(0).translate(_HIDE), text)
    return [s.strip().translate(_SHOW) for s in _SENTENCE.findall(masked) if s.strip(" \n.!?\"'")]


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def repeats_sentence(text: str) -> bool:
    """Whether a sentence occurs twice (compared by its words, so case and punctuation do not hide a repeat)."""
    seen = [tuple(words(s)) for s in sentences(text)]
    seen = [s for s in seen if s]
    return len(set(seen)) < len(seen)


def _runs(text: str, run: int, allowed: tuple[str, ...]) -> set[tuple[str, ...]]:
    """Every `run` consecutive words of `text`, none spanning a phrase of `allowed` (cut out first)."""
    pieces = re.split("|".join(re.escape(a) for a in allowed if a), text, flags=re.IGNORECASE) if allowed else [text]
    found = set()
    for piece in map(words, pieces):
        found.update(tuple(piece[i:i + run]) for i in range(len(piece) - run + 1))
    return found


def echoes(text: str, prompt: str, allowed: tuple[str, ...] = (), run: int = ECHO_WORDS) -> bool:
    """Whether `text` copies `run` consecutive words of `prompt`, or a placeholder such as "..." from it.
    Phrases in `allowed` (the action a text is about) may be repeated: they do not count towards a run."""
    if "..." in text or "…" in text:
        return True
    return not _runs(text, run, allowed).isdisjoint(_runs(prompt, run, allowed))


def _judges(sentence: str, pattern: re.Pattern) -> bool:
    return any(not _NEGATION.search(sentence[:m.start()]) for m in pattern.finditer(sentence))


def praises(sentence: str) -> bool:
    """Whether the sentence calls something good (a praise word not negated just before it)."""
    return _judges(sentence, _GOOD)


def blames(sentence: str) -> bool:
    """Whether the sentence calls something bad (a blame word not negated just before it)."""
    return _judges(sentence, _BAD)


def claims_gain(sentence: str) -> bool:
    """Whether the sentence says the action moved the task on (the score rose, the task got done or closer)."""
    return _judges(sentence, _GAIN)


def claims_loss(sentence: str) -> bool:
    """Whether the sentence says the action led nowhere or backwards ("nothing happens", "the task does not
    progress": a negated gain counts)."""
    return _judges(sentence, _LOSS) or any(_NEGATION.search(sentence[:m.start()]) for m in _GAIN.finditer(sentence))
