"""Sentence splitting for TTS (voicemesh/pipeline/text.py: SentenceSplitter)."""

from __future__ import annotations

from voicemesh.pipeline.text import SentenceSplitter


def test_sentence_comes_out_as_soon_as_complete() -> None:
    s = SentenceSplitter()
    assert s.push("Hello") == []
    assert s.push(" there") == []
    assert s.push(".") == []  # the end mark needs the next whitespace to be sure
    assert s.push(" How") == ["Hello there."]
    assert s.push(" are you?") == []
    assert s.push(" I am") == ["How are you?"]
    assert s.push(" fine! Great") == ["I am fine!"]
    assert s.flush() == ["Great"]
    assert s.flush() == []


def test_several_sentences_in_one_piece() -> None:
    s = SentenceSplitter()
    assert s.push("One. Two! Three? Four") == ["One.", "Two!", "Three?"]
    assert s.flush() == ["Four"]


def test_token_by_token_stream() -> None:
    s = SentenceSplitter()
    text = "It is sunny today. Take a hat, and some water! Bye."
    out: list[str] = []
    for token in text.replace(" ", " \0").split("\0"):
        out += s.push(token)
    out += s.flush()
    assert out == ["It is sunny today.", "Take a hat, and some water!", "Bye."]


def test_decimal_point_and_closing_quote() -> None:
    s = SentenceSplitter()
    assert s.push("It costs 3.50 dollars. ") == ["It costs 3.50 dollars."]
    assert s.push('He said "stop." Then') == ['He said "stop."']


def test_first_unit_ends_at_the_first_comma() -> None:
    """On main the first comma cut only past six words: "Well," waited for the sentence's end."""
    s = SentenceSplitter()
    assert s.push("Well") == []
    assert s.push(", I") == ["Well,"]  # the comma needs the next whitespace, then goes at once
    # later commas never cut
    assert s.push(" think, as you say, it rains") == []
    assert s.push(". Ok") == ["I think, as you say, it rains."]


def test_first_unit_ends_at_semicolon_colon_and_dash() -> None:
    for text, first in [
        ("Right; that works. ", "Right;"),
        ("Note: it rains. ", "Note:"),
        ("Sure - here it is. ", "Sure -"),
        ("Sure -- here it is. ", "Sure --"),
        ("Sure\u2014here it is. ", "Sure\u2014"),  # an em dash inside a word
        ("Sure \u2013 here it is. ", "Sure \u2013"),
    ]:
        s = SentenceSplitter()
        assert s.push(text)[0] == first, text
    # a hyphen inside a word is no break
    s = SentenceSplitter()
    assert s.push("A well-known fact. ") == ["A well-known fact."]


def test_first_unit_ends_after_first_words() -> None:
    """No clause boundary yet: the first unit goes to TTS after five words (main waited for the
    sentence's end, or a clause word past six words), later units stay sentences."""
    s = SentenceSplitter()
    out: list[str] = []
    text = "The fun fact about cats is that they nap and they purr a lot and then sleep. Cats nap."
    for word in text.split(" "):
        out += s.push(word + " ")
        if not out:
            assert len(s.buf.split()) <= 6  # out as soon as the sixth word begins
    out += s.flush()
    assert out == [
        "The fun fact about cats",
        "is that they nap and they purr a lot and then sleep.",
        "Cats nap.",
    ]
    assert " ".join(out) == text
    s = SentenceSplitter(first_words=3)
    assert s.push("one two three four") == ["one two three"]
    s = SentenceSplitter(first_words=3)
    assert s.push("one two three") == []  # the third word may go on ("three" + "teen")


def test_first_unit_does_not_end_on_a_word_that_leans_on_the_next() -> None:
    """ "A good way to" would be spoken as if it were done: the cut waits up to two more words
    for one that can end it."""
    s = SentenceSplitter(first_words=4)
    assert s.push("A good way to relax is to walk. ") == ["A good way to relax", "is to walk."]
    s = SentenceSplitter()
    assert s.push("I want to go to the shop now please. ") == [
        "I want to go to the shop",  # "to", "the": two more words at most
        "now please.",
    ]
    s = SentenceSplitter(first_words=3)
    assert s.push("The sun is the star at noon. ") == ["The sun is the star", "at noon."]


def test_a_short_first_sentence_is_the_first_unit() -> None:
    s = SentenceSplitter()
    assert s.push("Hi there. How are you doing today my friend? ") == [
        "Hi there.",
        "How are you doing today my friend?",
    ]


def test_first_words_zero_or_a_resumed_reply_keeps_sentences() -> None:
    for s in (SentenceSplitter(first_words=0), SentenceSplitter(early_first=False)):
        assert s.push("Well, I think that this is a good idea, but ok. ") == [
            "Well, I think that this is a good idea, but ok."
        ]


def test_decimals_and_abbreviations_do_not_end_a_unit() -> None:
    s = SentenceSplitter()
    assert s.push("Pi is 3.14159 or so. ") == ["Pi is 3.14159 or so."]
    s = SentenceSplitter(early_first=False)
    assert s.push("Ask Dr. Smith and Mrs. Jones. ") == ["Ask Dr. Smith and Mrs. Jones."]
    assert s.push("J. R. R. Tolkien wrote it, e.g. in 1954. ") == [
        "J. R. R. Tolkien wrote it, e.g. in 1954."
    ]
    assert s.push("The U.S. is big. It is 3 p.m. now. ") == [
        "The U.S. is big.",
        "It is 3 p.m. now.",
    ]
    assert s.push("Wait... what? ") == ["Wait...", "what?"]
    assert s.push("No. It is not. ") == ["No.", "It is not."]  # "No." is an answer, not "No. 5"
    s = SentenceSplitter()
    # in pieces, as an LLM streams it: "Dr." is the second word, no sentence end
    out = [u for p in ["Dr", ".", " Smith", " is", " in", "."] for u in s.push(p)]
    assert out == []
    assert s.flush() == ["Dr. Smith is in."]


def test_a_very_long_first_word_is_cut_at_max_chars() -> None:
    s = SentenceSplitter(max_chars=20)
    assert s.push("y" * 45) == ["y" * 20]
    assert s.flush() == ["y" * 20, "y" * 5]  # the rest, never past max_chars either


def test_comma_without_following_space_does_not_cut() -> None:
    s = SentenceSplitter()
    assert s.push("It is 1,000") == []
    assert s.push(" ") == []  # three words, no comma ends a word
    assert s.push("miles") == []


def test_clause_cut_only_before_first_sentence() -> None:
    s = SentenceSplitter()
    assert s.push("Hi. ") == ["Hi."]
    assert s.push("one two three four five six seven, eight") == []
    assert s.push(" - nine \u2014 ten") == []


def test_punctuation_only_pieces_are_not_sentences() -> None:
    s = SentenceSplitter()
    assert s.push("... ") == []
    assert s.push("Okay. ") == ["Okay."]
    assert s.push("!? ") == []
    assert s.flush() == []
    assert s.emitted == 1


def test_flush_emits_rest_and_resets() -> None:
    s = SentenceSplitter()
    assert s.push("no end mark") == []
    assert s.flush() == ["no end mark"]
    assert s.buf == ""
    assert s.push("Next. ") == ["Next."]


def test_20k_words_without_punctuation_in_one_word_pieces_are_read_once() -> None:
    """Quadratic before: each piece rescanned the whole buffer (~60 s of CPU for 20k words). Now
    each character is read about once, and the text goes out in pieces of bounded size."""
    words = [f"w{i % 97}" for i in range(20_000)]
    s = SentenceSplitter()
    out: list[str] = []
    for i, word in enumerate(words):
        out += s.push(word if i == 0 else " " + word)
        assert len(s.buf) < s.max_chars + 64  # the buffer stays bounded too
    out += s.flush()
    text = " ".join(words)
    assert " ".join(out) == text  # nothing lost, nothing doubled, cut between words only
    assert len(out) >= len(text) // s.max_chars
    assert all(0 < len(piece) <= s.max_chars for piece in out)
    assert s.scanned <= 2 * len(text)


def test_a_long_sentence_is_cut_at_its_last_word_boundary_within_max_chars() -> None:
    s = SentenceSplitter(max_chars=20)
    assert s.push("Hi. ") == ["Hi."]  # past the first sentence: no clause rules
    # 19 characters: "eeee" would end past 20
    assert s.push("aaaa bbbb cccc dddd eeee ffff gggg hhhh") == ["aaaa bbbb cccc dddd"]
    assert s.flush() == ["eeee ffff gggg hhhh"]
    # one word longer than the limit: cut inside it, nothing lost (the rest, under the limit
    # plus its look-ahead, waits for more text or the flush, which cuts it at the limit too:
    # on main the flush gave 30 characters)
    s = SentenceSplitter(max_chars=20)
    assert s.push("x" * 50) == ["x" * 20]
    assert s.flush() == ["x" * 20, "x" * 10]  # nothing past max_chars


def test_an_end_mark_just_past_max_chars_wins_in_any_pieces() -> None:
    text = "aaaa bbbb cccc dddd ee. ffff"
    whole = SentenceSplitter(max_chars=20)
    got = whole.push(text) + whole.flush()
    pieces = SentenceSplitter(max_chars=20)
    assert [p for ch in text for p in pieces.push(ch)] + pieces.flush() == got
    assert got == ["aaaa bbbb cccc dddd ee.", "ffff"]
