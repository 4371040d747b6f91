"""Words for BM25 (docs/knowledge.md, "Retrieval"): Chinese runs segmented by jieba, other scripts split into
letter / digit runs, lower-cased, common function words dropped.

    words("Which planet has rings?")  -> ["planet", "rings"]
    words("布达拉宫建在哪里？")          -> ["布达拉宫", "建", "哪里"]

`chars` is the baseline that needs no segmenter: every Chinese character a word.
"""

from __future__ import annotations

import logging
import re

import jieba

jieba.setLogLevel(logging.WARNING)  # its dictionary-loading messages are not ours to print

_RUNS = re.compile(r"([\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+)|([^\W_]+)", re.UNICODE)

# Function words that carry no topic: BM25's IDF lowers them anyway, but at a few dozen passages it cannot.
STOPWORDS = frozenset("""
a an the and or but if of to in on at by for from with as is are was were be been being it its this that these
those there here what which who whom whose when where why how do does did done has have had not no so than then
into onto about over under can could will would shall should may might must also any all each every some such
one ones i you he she we they me him her us them my your his our their much many s t
的 了 是 在 和 与 及 或 也 都 就 而 又 这 那 哪 哪个 哪种 哪座 哪些 哪里 什么 怎样 怎么 如何 吗 呢 吧 啊 把 被 从 对 向 由 为 以 于 之 其 有 个 种 座 些 年 用
""".split())


def words(text: str, *, stopwords: frozenset[str] = STOPWORDS) -> list[str]:
    """BM25 terms of `text`: jieba's words for Chinese, letter / digit runs for everything else, lower-cased."""
    out = []
    for han, other in _RUNS.findall(text):
        pieces = jieba.lcut_for_search(han) if han else [other.lower()]
        out.extend(w for w in pieces if w.strip() and w not in stopwords)
    return out


def chars(text: str, *, stopwords: frozenset[str] = STOPWORDS) -> list[str]:
    """The baseline without a segmenter: each Chinese character is a term; other scripts as `words`."""
    out = []
    for han, other in _RUNS.findall(text):
        pieces = list(han) if han else [other.lower()]
        out.extend(w for w in pieces if w not in stopwords)
    return out


SEGMENTERS = {"jieba": words, "chars": chars}
