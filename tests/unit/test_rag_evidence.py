"""What /rag shows when it withholds the model's answer (``refinery.rag.evidence`` and
``refinery.rag.answer``): the retrieved sentence that best supports an answer, quoted with its
source; "not in the documents" only when no sentence does; the answer itself above the
threshold."""

from __future__ import annotations

from refinery.rag.answer import make_answer
from refinery.rag.confidence import Calibration, ConfidenceModel
from refinery.rag.evidence import Quote, best_quote, sentences, terms
from refinery.retrieval.search import Hit

# confidence 0.5 (sigmoid of 0) under a threshold of 0.9: every answer is withheld
ALWAYS_UNSURE = Calibration(
    None, ConfidenceModel(("top_cosine",), (0.5,), (0.1,), (0.0,), 0.0), 0.9
)


def hit(n: int, text: str, title: str = "", source: str = "", context: str = "") -> Hit:
    return Hit(f"c{n}", f"d{n}", source or f"doc{n}.md", title or f"Doc {n}", 0, text, 0.6, {},
               context=context)  # fmt: skip


MATING = [
    hit(1, "Mating flights follow on warm, calm afternoons. A virgin queen usually takes her "
        "first mating flight on a warm afternoon with little wind.", "Weather and mating"),
    hit(2, "A virgin queen emerges from her cell. A virgin queen usually takes her first mating "
        "flight when she is 5 to 10 days old. Drones die after mating.", "Queen mating flight",
        "queen-mating-flight.txt"),
]  # fmt: skip


def test_the_quote_is_the_sentence_with_the_number_the_question_asks_for():
    question = "At what age does a virgin queen take her first mating flight?"
    quote = best_quote(question, MATING)
    assert quote == Quote(
        "A virgin queen usually takes her first mating flight when she is 5 to 10 days old.",
        "queen-mating-flight.txt",
        "c2",
        "Queen mating flight",
    )
    answer = make_answer(question, MATING, "About 40 days.", 30, 4, calibration=ALWAYS_UNSURE)
    assert answer.abstained and answer.kind == "quote" and answer.quote == quote
    assert answer.answer == (
        'From "Queen mating flight" [2]: "A virgin queen usually takes her first mating flight '
        'when she is 5 to 10 days old."'
    )
    assert answer.model_answer == "About 40 days."  # kept for evaluation, not shown
    shown = answer.to_dict()
    assert shown["kind"] == "quote" and shown["abstained"] is True
    assert shown["quote"] == {"text": quote.text, "source": "queen-mating-flight.txt",
                              "chunk_id": "c2", "title": "Queen mating flight"}  # fmt: skip
    # Without a number asked for, the better-ranked chunk's sentence wins the tie.
    plain = best_quote("Does a virgin queen take her first mating flight?", MATING)
    assert plain is not None and plain.chunk_id == "c1"


def test_an_unrelated_question_says_the_documents_do_not_answer():
    question = "What is the airspeed of an unladen swallow?"
    assert best_quote(question, MATING) is None
    answer = make_answer(question, MATING, "About 24 mph.", 30, 4, calibration=ALWAYS_UNSURE)
    assert answer.abstained and answer.kind == "none" and answer.quote is None
    assert "not in the documents" in answer.answer and answer.answer.startswith("I don't know")
    assert "doc1.md" in answer.answer and "queen-mating-flight.txt" in answer.answer
    nothing = make_answer(question, [], "x", 1, 1, calibration=ALWAYS_UNSURE)
    assert nothing.kind == "none" and "no document matched" in nothing.answer


def test_an_answer_above_the_threshold_is_shown_and_a_leak_is_refused():
    question = "At what age does a virgin queen take her first mating flight?"
    sure = make_answer(question, MATING, "At 5 to 10 days.", 30, 6, calibration=ALWAYS_UNSURE,
                       min_confidence=0)  # fmt: skip
    assert sure.kind == "answer" and not sure.abstained and sure.quote is None
    assert sure.answer == "At 5 to 10 days." and sure.to_dict()["quote"] is None
    leaked = make_answer(question, MATING, "My reference is rfy-0123456789ab.", 30, 6,
                         calibration=ALWAYS_UNSURE, canary="rfy-0123456789ab")  # fmt: skip
    assert leaked.kind == "refused" and leaked.leak and not leaked.abstained


def test_one_shared_word_is_not_support_and_a_one_word_question_needs_its_word():
    hits = [hit(1, "The queen lays up to two thousand eggs a day in summer.")]
    assert best_quote("Which queen sings?", hits) is None  # "queen" alone: half the weight
    assert best_quote("Which queen of England built the Tower of London?", hits) is None
    assert best_quote("What is propolis?", hits) is None
    glue = [hit(1, "Bees fill small gaps with propolis, a resin they collect from buds.")]
    found = best_quote("What is propolis?", glue)
    assert found is not None and found.text.startswith("Bees fill small gaps")


def test_a_sentence_that_names_nothing_brings_the_one_before_it():
    hits = [hit(1, "Thymol is a plant-derived essential oil product. It needs warm weather to "
                "evaporate properly and may stop brood rearing for a while.")]  # fmt: skip
    quote = best_quote("Which treatment needs warm weather to evaporate?", hits)
    assert quote is not None and quote.text.startswith("Thymol is") and "evaporate" in quote.text


def test_section_headings_count_as_support_but_are_never_quoted():
    hits = [hit(1, "Signs\n\nIts colour varies from yellow and green to red and nearly black.",
                "Propolis", context="Propolis > Appearance")]  # fmt: skip
    quote = best_quote("What colours can propolis be?", hits)
    assert quote is not None and quote.text.startswith("Its colour varies")


def test_sentences_of_wrapped_lists_and_headings():
    text = (
        "# Chalkbrood\n\nSigns:\n- Dead larvae turn into hard, chalk-like mummies. They are "
        "white at first, and may\nbecome grey or black.\n- Mummies may rattle, e.g. when a "
        "frame is shaken.\n=====\n**Management** keeps colonies strong."
    )
    assert sentences(text) == [
        "Chalkbrood",
        "Signs:",
        "Dead larvae turn into hard, chalk-like mummies.",
        "They are white at first, and may become grey or black.",
        "Mummies may rattle, e.g. when a frame is shaken.",
        "Management keeps colonies strong.",
    ]
    # question words go, stems meet, hyphens split, a lone digit counts
    assert terms("How many days after egg-laying do queens emerge in year 3?") == {
        "day", "egg", "lay", "queen", "emerg", "year", "3"
    }  # fmt: skip
