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


def test_first_clause_cut_at_comma_after_six_words() -> None:
    s = SentenceSplitter()
    # First comma after 1 word: too short to cut.
    assert s.push("Well, I think that this is") == []
    # Second comma after 8 words: the first clause goes out at once.
    assert s.push(" a good idea, but") == ["Well, I think that this is a good idea,"]
    # Later commas never cut.
    assert s.push(" only if, as you say, it rains") == []
    assert s.push(". Ok") == ["but only if, as you say, it rains."]


def test_first_clause_threshold_is_exactly_six_words() -> None:
    s = SentenceSplitter()
    assert s.push("one two three four five, six") == []
    s = SentenceSplitter()
    assert s.push("one two three four five six, seven") == ["one two three four five six,"]
    s = SentenceSplitter(first_clause_words=2)
    assert s.push("Yes indeed, and") == ["Yes indeed,"]


def test_comma_without_following_space_does_not_cut() -> None:
    s = SentenceSplitter()
    assert s.push("one two three four five six,seven") == []
    assert s.push(" eight") == []


def test_clause_cut_only_before_first_sentence() -> None:
    s = SentenceSplitter()
    assert s.push("Hi. ") == ["Hi."]
    assert s.push("one two three four five six seven, eight") == []


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


def test_a_long_first_sentence_is_cut_before_a_clause_word() -> None:
    """No punctuation yet: the first chunk goes to TTS before "that"/"and"/... once it holds six
    words, so the first audio does not wait for a long sentence; later sentences stay whole."""
    s = SentenceSplitter()
    out: list[str] = []
    text = "The fun fact about cats is that they nap and they purr a lot and then sleep. Cats nap."
    for word in text.split(" "):
        out += s.push(word + " ")
    out += s.flush()
    assert out == [
        "The fun fact about cats is",
        "that they nap and they purr a lot and then sleep.",
        "Cats nap.",
    ]
    assert " ".join(out) == text


def test_a_clause_word_too_early_does_not_cut() -> None:
    s = SentenceSplitter()
    out = s.push("It is that we know the answer well enough ")
    assert out == []  # "that" comes after two words only; nothing to cut yet
    assert s.flush() == ["It is that we know the answer well enough"]


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
    # plus its look-ahead, waits for more text or the flush)
    s = SentenceSplitter(max_chars=20)
    assert s.push("x" * 50) == ["x" * 20]
    assert s.flush() == ["x" * 30]


def test_an_end_mark_just_past_max_chars_wins_in_any_pieces() -> None:
    text = "aaaa bbbb cccc dddd ee. ffff"
    whole = SentenceSplitter(max_chars=20)
    got = whole.push(text) + whole.flush()
    pieces = SentenceSplitter(max_chars=20)
    assert [p for ch in text for p in pieces.push(ch)] + pieces.flush() == got
    assert got == ["aaaa bbbb cccc dddd ee.", "ffff"]
