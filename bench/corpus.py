"""Deterministic, realistic chat text for the benchmarks: English mixed with Japanese and Chinese."""

from __future__ import annotations

import random

ENGLISH = [
    "Can you check why the deploy failed on staging?",
    "The Redis cluster ran out of memory last night around 2am.",
    "I think we should rotate the credentials before the audit.",
    "Here is the stack trace from the worker, it fails in the retry loop.",
    "Could you summarize the discussion so far for the people who just joined?",
    "We moved the cron job to the new scheduler, but the timezone is off by an hour.",
    "Latency went up after the last release; p99 is now 480 ms instead of 120 ms.",
    "Please write a short announcement for the maintenance window on Saturday.",
]
JAPANESE = [
    "本番環境のデプロイが失敗した原因を調べてもらえますか。",
    "昨夜、キャッシュサーバーのメモリが不足しました。",
    "監査の前に認証情報をローテーションするべきだと思います。",
    "このスレッドの内容を簡単にまとめてください。",
]
CHINESE = [
    "请帮我检查一下为什么测试环境的部署失败了。",
    "昨天晚上缓存集群的内存用完了。",
    "我们应该在审计之前更换密码。",
    "请把到目前为止的讨论总结一下。",
]


def message(rng: random.Random) -> str:
    """One chat message of one to four sentences, mostly English, sometimes Japanese or Chinese."""
    sentences = []
    for _ in range(rng.randint(1, 4)):
        pool = rng.choices([ENGLISH, JAPANESE, CHINESE], weights=[6, 2, 2])[0]
        sentences.append(rng.choice(pool))
    return " ".join(sentences)


def answer(rng: random.Random) -> str:
    """A longer assistant answer in Markdown."""
    lines = [message(rng) for _ in range(rng.randint(2, 5))]
    return "\n\n".join([*lines[:-1], "- " + lines[-1]])
