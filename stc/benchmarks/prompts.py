"""Prompts and answer parsing, following ReKV for multiple choice and OVO-Bench for probes.

Multiple choice (every benchmark, ReKV's protocol):
    query = "Question: {q}\\nOptions:\\n(A) ...\\n(B) ...\\nOnly give the best option."
    answer_prefix = "Best option: ("   (part of the prompt; the model continues after it)
    parse: the character before the first ")" of the response if any, else its first character.

OVO-Bench forward probes (kinds "yesno" and "count") use instructions that say what OVO-Bench's
own prompts say, in our words:
- REC (count): people may repeat one action; count every complete repetition by anyone so far,
  answer with a single number. Parsed as all digits of the response joined ("3 times" -> "3").
- SSR (yesno): a tutorial video; is the person performing the given step right now? Answer Yes/No.
- CRR (yesno): does the video so far, especially its latest frames, hold enough information to
  answer the question? Answer Yes/No.
Yes/No responses parse to "Yes" / "No" by OVO-Bench's rule: an exact "Y"/"N", else whichever
of "Yes"/"No" the response contains ("" when neither or both).
Retrieval always uses the raw question text (for SSR: the step text).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from stc.benchmarks.records import Question

MC_ANSWER_PREFIX = "Best option: ("
MC_MAX_NEW_TOKENS = 16
PROBE_MAX_NEW_TOKENS = 16

_REC_TEMPLATE = (
    "In this video people may perform one kind of action again and again; whoever performs it "
    "is called 'they' below. Count how many times the action has been performed in total so "
    "far, by anyone; one complete motion counts as one.\n"
    "Question: {question}\n"
    "Answer with a single number (0, 1, 2, 3, ...) and nothing else."
)
_SSR_TEMPLATE = (
    "This is a tutorial video made of a sequence of steps. Here is one of its steps:\n"
    "{step}\n"
    "Is the person in the video performing this step right now? "
    'Answer only "Yes" or "No", with no explanation.'
)
_CRR_TEMPLATE = (
    "The following question is about the latest frames of the video, i.e. its end so far.\n"
    "{question}\n"
    "Does the visual content seen so far, especially the latest frames, give enough "
    "information to answer this question? "
    'Answer only "Yes" or "No", with no explanation.'
)


@dataclass(frozen=True)
class Prompt:
    """What the driver passes to `StreamLike.ask`.

    query: the user turn's text; answer_prefix: text that starts the assistant turn;
    retrieval_text: the raw question used to pick memory; max_new_tokens: greedy budget.
    """

    query: str
    answer_prefix: str
    retrieval_text: str
    max_new_tokens: int


def format_options(options: tuple[str, ...] | list[str]) -> str:
    """("x", "y") -> "(A) x\\n(B) y"."""
    return "\n".join(f"({chr(ord('A') + i)}) {option}" for i, option in enumerate(options))


def build_prompt(question: Question) -> Prompt:
    """The prompt for one question, by its kind (and for OVO probes, its task)."""
    if question.kind == "mc":
        options = format_options(question.options)
        query = f"Question: {question.question}\nOptions:\n{options}\nOnly give the best option."
        return Prompt(query, MC_ANSWER_PREFIX, question.question, MC_MAX_NEW_TOKENS)
    if question.kind == "count":
        return Prompt(_REC_TEMPLATE.format(question=question.question), "", question.question, PROBE_MAX_NEW_TOKENS)
    if question.task == "SSR":
        query = _SSR_TEMPLATE.format(step=question.question)
    else:  # CRR, and any other yes/no question
        query = _CRR_TEMPLATE.format(question=question.question)
    return Prompt(query, "", question.question, PROBE_MAX_NEW_TOKENS)


def parse_mc(response: str) -> str:
    """ReKV's rule: the character before the first ")" if any, else the first character."""
    text = response.strip()
    if not text:
        return ""
    close = text.find(")")
    if close > 0:
        return text[close - 1]
    return text[0]


def parse_yesno(response: str) -> str:
    """The answer a yes/no response gives, for the results' `parsed` field: "Y"/"N" exactly, else the one of
    "Yes" and "No" it contains; "" where it contains neither or both. Scoring does not read this: it applies
    OVO-Bench's rule (`stc.benchmarks.scoring.is_correct`), under which a response containing both words
    counts as correct for either answer."""
    text = response.strip()
    if text == "Y":
        return "Yes"
    if text == "N":
        return "No"
    has_yes, has_no = "Yes" in text, "No" in text
    if has_yes != has_no:
        return "Yes" if has_yes else "No"
    return ""


def parse_count(response: str) -> str:
    """OVO-Bench's rule: every digit of the response, joined ("about 1 or 2" -> "12")."""
    return "".join(re.findall(r"\d+", response))


def parse_answer(question: Question, response_text: str) -> str:
    """The answer a response gives, in the form of `question.answer`."""
    if question.kind == "mc":
        return parse_mc(response_text)
    if question.kind == "yesno":
        return parse_yesno(response_text)
    return parse_count(response_text)
