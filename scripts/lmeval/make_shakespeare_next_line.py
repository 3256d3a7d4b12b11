"""Builds the `shakespeare_next_line` multiple-choice task for lm-evaluation-harness from
Tiny Shakespeare (public-domain text): the speaker and first two lines of a speech are the
context, and the choices are the speech's true third line and three third lines of other
speeches of similar length. Deterministic (fixed seed); writes 100 items as JSON lines.

    python3 scripts/lmeval/make_shakespeare_next_line.py ../shared/data/tinyshakespeare/input.txt \
        > scripts/lmeval/shakespeare_next_line.jsonl

Standard library only.
"""

import json
import random
import sys

ITEMS = 100


def speeches(text):
    for block in text.split("\n\n"):
        lines = [l.strip() for l in block.strip().split("\n")]
        if len(lines) >= 4 and lines[0].endswith(":"):
            yield lines[0], lines[1:]


def main():
    text = open(sys.argv[1], encoding="utf-8").read()
    rng = random.Random(1234)
    pool = [(s, l) for s, l in speeches(text) if 20 <= len(l[2]) <= 60 and l[2] not in (l[0], l[1])]
    picks = rng.sample(range(len(pool)), ITEMS)
    for n, i in enumerate(picks):
        speaker, lines = pool[i]
        answer = lines[2]
        near = [j for j in range(len(pool))
                if j != i and abs(len(pool[j][1][2]) - len(answer)) <= 6
                and pool[j][1][2] != answer]
        distractors = []
        for j in rng.sample(near, len(near)):
            line = pool[j][1][2]
            if line not in distractors:
                distractors.append(line)
            if len(distractors) == 3:
                break
        label = rng.randrange(4)
        choices = distractors[:label] + [answer] + distractors[label:]
        context = f"{speaker}\n{lines[0]}\n{lines[1]}\n"
        print(json.dumps({"id": n, "context": context, "choices": choices, "label": label}))


if __name__ == "__main__":
    main()
